"""Export a flashsae SAE to the SAELens on-disk layout: ``cfg.json`` + ``sae_weights.safetensors``.

Matches the format of SAELens 6.54.12 (``SAE.load_from_disk``): top-level config keys
d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, architecture (+ k and rescale_acts_by_decoder_norm for "topk"),
and a ``metadata`` dict (model_name, hook_name, hook_layer, hook_head_index,
context_size, prepend_bos, dataset_path, sae_lens_version, sae_lens_training_version).
``metadata.sae_lens_version`` is the format version SAELens uses to skip its
pre-6.0 config conversion. Weights are float32, already acting on raw activations
(the input scale folded in), so normalize_activations = "none".

Tensor names and shapes are the same in both libraries (W_enc [d, n], W_dec [n, d],
b_dec [d], the rest [n]). Each architecture's class holds its layout (``saelens``); for the
built-in ones:

| flashsae   | SAELens architecture | tensors besides W_enc, W_dec, b_dec | apply_b_dec_to_input |
|------------|----------------------|-------------------------------------|----------------------|
| topk       | topk (+ k)           | b_enc                               | true                 |
| batchtopk  | jumprelu             | b_enc, threshold (scalar -> [n])    | true                 |
| matryoshka | jumprelu             | b_enc, threshold (scalar -> [n])    | true                 |
| gated      | gated                | b_gate, r_mag, b_mag                | true                 |
| jumprelu   | jumprelu             | b_enc, threshold                    | false                |
| jumprelu_step | jumprelu          | b_enc, threshold                    | false                |
| relu       | standard             | b_enc                               | false                |
| gated_noaux | gated               | b_gate, r_mag, b_mag                | true                 |

An architecture whose ``saelens`` is None (``gated_sigmoid``) has no SAELens equivalent, and
its export is refused with a ``UserError``.

With x_c = x - b_dec where apply_b_dec_to_input, else x_c = x, both libraries compute
x̂ = f W_dec + b_dec and

    topk:      f = ReLU(TopK_k(x_c W_enc + b_enc))
    (matryoshka) batchtopk at inference, and jumprelu:
               f = z ⊙ 1[z > θ],  z = x_c W_enc + b_enc,  θ = threshold
    gated:     f = 1[x_c W_enc + b_gate > 0] ⊙ ReLU(x_c (W_enc ⊙ exp(r_mag)) + b_mag)
    relu:      f = ReLU(x_c W_enc + b_enc)

SAELens computes JumpReLU as ReLU(z) ⊙ 1[z > θ], equal to z ⊙ 1[z > θ] for θ >= 0, which
flashsae keeps (θ = exp(log θ) for jumprelu, an EMA of positive activations for batchtopk).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save

from flashsae.cache.errors import UserError, report_errors

from . import __version__
from .checkpoint import RUN_FILES, load_sae
from .files import write_output
from .sae import SAE, SAE_CLASSES

SAELENS_FORMAT_VERSION = "6.54.12"
SAELENS_WEIGHTS = "sae_weights.safetensors"


def _check_tensors(arch: str, params: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(d, n) from W_dec [n, d], after checking that every tensor ``arch`` needs is present
    with its shape and that there are no others."""
    names = SAE_CLASSES[arch].saelens.tensors
    missing = [k for k in names if k not in params]
    extra = sorted(set(params) - set(names))
    if missing or extra:
        raise UserError(f"a {arch} SAE has tensors {list(names)}; missing {missing}, extra {extra}")
    if params["W_dec"].ndim != 2:
        raise UserError(f"W_dec must be 2-D [n, d], got shape {tuple(params['W_dec'].shape)}")
    n, d = params["W_dec"].shape
    want = {name: (n,) for name in names} | {"W_enc": (d, n), "W_dec": (n, d), "b_dec": (d,)}
    if SAE_CLASSES[arch].saelens.scalar_threshold:
        want["threshold"] = ()
    for name in names:
        if tuple(params[name].shape) != want[name]:
            raise UserError(
                f"{name} has shape {tuple(params[name].shape)}, expected {want[name]} "
                f"for d={d}, n={n}"
            )
    return d, n


def hook_layer(site: str) -> int | None:
    """L of a TransformerLens-style site ``blocks.{L}.hook_...``, else None."""
    match = re.fullmatch(r"blocks\.(\d+)\..+", site)
    return int(match.group(1)) if match else None


def to_saelens(
    arch: str,
    params: dict[str, torch.Tensor],
    k: int | None = None,
    hook_name: str = "",
    model_name: str = "",
    context_size: int | None = None,
    dataset_path: str | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(SAELens ``cfg.json`` dict, float32 CPU tensors) for the folded parameters ``params`` of
    a flashsae ``arch`` SAE; ``k`` is required for topk, the rest is metadata."""
    if arch not in SAE_CLASSES:
        raise UserError(f"cannot export arch {arch!r} to SAELens; known: {sorted(SAE_CLASSES)}")
    mapping = SAE_CLASSES[arch].saelens
    if mapping is None:
        raise UserError(
            f"a {arch} SAE has no SAELens equivalent ({SAE_CLASSES[arch].__name__}: "
            f"{(SAE_CLASSES[arch].__doc__ or '').splitlines()[0]}); it cannot be exported"
        )
    d, n = _check_tensors(arch, params)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in params.items()}
    if mapping.scalar_threshold:
        tensors["threshold"] = tensors["threshold"].expand(n).contiguous()
    cfg = {
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": mapping.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": mapping.architecture,
    }
    if mapping.architecture == "topk":
        if not k or not 0 < k <= n:
            raise UserError(f"a topk SAE needs 0 < k <= {n}, got k={k}")
        cfg |= {"k": k, "rescale_acts_by_decoder_norm": False}
    cfg["metadata"] = {
        "model_name": model_name or None,
        "hook_name": hook_name or None,
        "hook_layer": hook_layer(hook_name),
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": True,
        "dataset_path": dataset_path,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "flashsae_version": __version__,
    }
    return cfg, tensors


def export_saelens(
    source: str | Path | SAE,
    out_dir: str | Path,
    context_size: int | None = None,
    dataset_path: str | None = None,
) -> Path:
    """Write ``out_dir/cfg.json`` and ``out_dir/sae_weights.safetensors`` for SAELens.

    ``source`` is a flashsae checkpoint folder (``cfg.json`` + ``sae.safetensors``, e.g. a
    run directory) or an SAE module (its input scale is folded in). Returns ``out_dir``.
    A UserError when ``out_dir`` is, or is inside, a run or checkpoint folder (one holding
    any of ``RUN_FILES``).
    """
    sae = source if isinstance(source, SAE) else load_sae(source)
    raw, params = vars(sae.cfg), sae.folded()
    cfg, tensors = to_saelens(
        raw["arch"],
        params,
        k=raw.get("k"),
        hook_name=raw.get("site", ""),
        model_name=raw.get("model", ""),
        context_size=context_size,
        dataset_path=dataset_path,
    )
    out = Path(out_dir)
    for folder in (out.resolve(), *out.resolve().parents):
        if any((folder / name).exists() for name in RUN_FILES):
            raise UserError(
                f"{out} is inside the flashsae run directory {folder}, whose files the export "
                "would overwrite; export to a folder of its own"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from e
    write_output(out / SAELENS_WEIGHTS, save(tensors))
    write_output(out / "cfg.json", json.dumps(cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m flashsae.train.export RUN_DIR OUT_DIR [--context-size N] [--dataset-path P]``"""
    p = argparse.ArgumentParser(
        prog="python -m flashsae.train.export", description=__doc__.split("\n")[0]
    )
    p.add_argument("run", type=Path, help="flashsae checkpoint folder (cfg.json + sae.safetensors)")
    p.add_argument(
        "out", type=Path, help="folder for the SAELens cfg.json + sae_weights.safetensors"
    )
    p.add_argument("--context-size", type=int, default=None, help="sequence length trained on")
    p.add_argument("--dataset-path", default=None, help="dataset recorded in the metadata")
    args = p.parse_args(argv)

    def export() -> None:
        out = export_saelens(args.run, args.out, args.context_size, args.dataset_path)
        print(f"SAELens checkpoint written to {out}")

    return report_errors(export)


if __name__ == "__main__":
    sys.exit(main())
