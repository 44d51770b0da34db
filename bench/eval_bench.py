"""Wall time of the held-out evaluation (``flashsae.train.eval.evaluate``) of one SAE.

Two subjects: the bundled ``bytelm`` (its architecture, randomly initialised, so that nothing
is trained first: the time does not depend on the weights) at its default site with the
default ``make train`` evaluation (65536 held-out tokens in sequences of 128, batches of 32),
and a tiny randomly
initialised Hugging Face Llama (4 layers, d_model 256, vocabulary 8192) on random tokens, its
middle-block site. The SAE is a randomly initialised TopK SAE (16 x d latents, k = 32): the
evaluation's cost does not depend on its weights. Each configuration is timed ``--repeats``
times after a warm-up batch; the table gives the median. With ``batched`` False (where the
installed ``evaluate`` has that argument) the three branches run as separate forwards.

    python bench/eval_bench.py [--repeats 3] [--device cpu]

A JSON line per measurement goes to ``bench/results/eval.jsonl``. Run the same script against
an older checkout (its ``flashsae`` first on PYTHONPATH) to time that version's evaluation.
"""

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment  # noqa: E402

import flashsae.train.eval as eval_module  # noqa: E402
from flashsae.cache.models.bytelm import ByteLM, ByteLMConfig  # noqa: E402
from flashsae.cache.models.subjects import get_subject  # noqa: E402
from flashsae.train.sae import make_sae  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "eval.jsonl"


def tiny_llama(device: str) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=8192, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(device).eval()


def cases(device: str) -> list[tuple[str, torch.nn.Module, str, torch.Tensor, int]]:
    """(name, model, site, token sequences, d_model) of each subject."""
    subject = get_subject("bytelm", 128)
    torch.manual_seed(0)
    bytelm = ByteLM(ByteLMConfig()).to(device).eval()  # untrained: the time is the same
    seqs = subject.sequences("val", 65536, 128, seed=0).tokens
    llama = tiny_llama(device)
    tokens = torch.randint(1, 8192, (128, 128), generator=torch.Generator().manual_seed(0))
    return [
        ("bytelm", bytelm, subject.default_site, seqs, subject.d_model),
        ("tiny-llama", llama, "blocks.1.hook_resid_post", tokens, 256),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--label", default="", help="what is timed (e.g. the code's version)")
    args = p.parse_args()
    env = environment()
    has_batched = "batched" in inspect.signature(eval_module.evaluate).parameters
    modes = [True, False] if has_batched else [None]
    print(f"{env['device']}, torch {env['torch']}, {eval_module.__file__}")
    print("| subject | sequences x tokens | mode | median s | runs |")
    print("|---|---|---|---|---|")
    for name, model, site, seqs, d in cases(args.device):
        torch.manual_seed(0)
        sae = make_sae("topk", 16 * d, torch.zeros(d), float(d), k=32, site=site, model=name)
        sae = sae.to(args.device).eval()
        for batched in modes:
            kwargs = {} if batched is None else {"batched": batched}
            eval_module.evaluate(sae, model, seqs[: args.batch_size], args.batch_size, **kwargs)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                eval_module.evaluate(sae, model, seqs, args.batch_size, **kwargs)
                times.append(time.perf_counter() - start)
            mode = {None: "as installed", True: "one forward", False: "separate forwards"}
            median = statistics.median(times)
            shape = f"{seqs.shape[0]} x {seqs.shape[1]}"
            print(f"| {name} | {shape} | {mode[batched]} | {median:.2f} | {len(times)} |")
            record = {**env, "subject": name, "site": site, "shape": list(seqs.shape),
                      "batch_size": args.batch_size, "mode": mode[batched], "label": args.label,
                      "median_s": median, "times_s": times}  # fmt: skip
            RESULTS.parent.mkdir(exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
