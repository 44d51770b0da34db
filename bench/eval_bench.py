"""Wall time of the held-out evaluation (``flashsae.train.eval.evaluate``) of one SAE.

Two subjects: the bundled ``bytelm`` (its architecture, randomly initialised, so that nothing
is trained first: the time does not depend on the weights) at its default site with the
default ``make train`` evaluation (65536 held-out tokens in sequences of 128, batches of 32),
and a tiny randomly
initialised Hugging Face Llama (4 layers, d_model 256, vocabulary 8192) on random tokens, its
middle-block site. The SAE is a randomly initialised TopK SAE (16 x d latents, k = 32): the
evaluation's cost does not depend on its weights. Modes: "one forward" (``evaluate``, the
layers before the site once per batch), "separate forwards" (``batched=False``: clean, SAE and
zero forwards) and, with ``--baseline``, another version's ``evaluate``. After a warm-up batch
each, ``--repeats`` rounds time every mode once (so that a change of load on a shared machine
hits every mode alike); the table gives the median.

    git show main:train/eval.py > /tmp/eval_main.py
    python bench/eval_bench.py --baseline /tmp/eval_main.py --label main [--repeats 3]

A JSON line per measurement goes to ``bench/results/eval.jsonl``.
"""

import argparse
import importlib.util
import json
import statistics
import sys
import time
from functools import partial
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


def load_baseline(path: Path) -> object:
    """The ``evaluate`` of another version's ``train/eval.py`` (e.g. ``git show main:train/eval.py
    > /tmp/eval_main.py``), imported inside ``flashsae.train`` so that its relative imports
    resolve to this checkout's modules."""
    spec = importlib.util.spec_from_file_location("flashsae.train._eval_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="rounds; each times every mode once")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--baseline", type=Path, default=None, help="another version's eval.py")
    p.add_argument("--label", default="", help="what the baseline is (e.g. its commit)")
    args = p.parse_args()
    env = environment()
    modes = {
        "one forward": partial(eval_module.evaluate, batched=True),
        "separate forwards": partial(eval_module.evaluate, batched=False),
    }
    if args.baseline is not None:
        modes = {f"baseline {args.label}".strip(): load_baseline(args.baseline), **modes}
    print(f"{env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads")
    print("| subject | sequences x tokens | mode | median s | runs |")
    print("|---|---|---|---|---|")
    for name, model, site, seqs, d in cases(args.device):
        torch.manual_seed(0)
        sae = make_sae("topk", 16 * d, torch.zeros(d), float(d), k=32, site=site, model=name)
        sae = sae.to(args.device).eval()
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for evaluate in modes.values():
            evaluate(sae, model, seqs[: args.batch_size], args.batch_size)  # warm-up
        for _ in range(args.repeats):  # rounds, so that a change of load hits every mode
            for mode, evaluate in modes.items():
                start = time.perf_counter()
                evaluate(sae, model, seqs, args.batch_size)
                times[mode].append(time.perf_counter() - start)
        for mode, ts in times.items():
            median = statistics.median(ts)
            shape = f"{seqs.shape[0]} x {seqs.shape[1]}"
            print(f"| {name} | {shape} | {mode} | {median:.2f} | {len(ts)} |")
            record = {**env, "subject": name, "site": site, "shape": list(seqs.shape),
                      "batch_size": args.batch_size, "mode": mode, "median_s": median,
                      "times_s": ts, "threads": torch.get_num_threads()}  # fmt: skip
            RESULTS.parent.mkdir(exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
