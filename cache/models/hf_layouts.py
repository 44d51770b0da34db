"""TransformerLens site names mapped onto Hugging Face model families (no transformers import).

Block L is ``layers[L]``, the blocks' ModuleList at ``layers`` inside the base model
(``model.base_model``: the same blocks whether the checkpoint was loaded with its LM head or
as ``AutoModel``). Each hook is a module inside the block ("" = the block itself), read at its
output or at its first input ("in"):

- pre-LN decoders: resid_pre = in block, resid_post = block, resid_mid = in the MLP's input
  norm, attn_out / mlp_out = the attention / MLP module. GPT-2 (``h``: ``ln_2``, ``attn``,
  ``mlp``); GPT-NeoX (``layers``: ``post_attention_layernorm``, ``attention``, ``mlp``);
  Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma (``layers``: ``post_attention_layernorm``,
  ``self_attn``, ``mlp``); OPT (``decoder.layers``: ``final_layer_norm``, ``self_attn``,
  and ``fc2``, the MLP's output projection; its MLP sees ``[B*T, d]`` rows, reshaped).
- sandwich norms inside the residual branches: Gemma 2 / Gemma 3: resid_mid = in
  ``pre_feedforward_layernorm``, attn_out = ``post_attention_layernorm``, mlp_out =
  ``post_feedforward_layernorm``; OLMo 2 (no pre-norms): resid_mid = in ``mlp``, attn_out =
  ``post_attention_layernorm``, mlp_out = ``post_feedforward_layernorm``.
- parallel attention and MLP (both read resid_pre, so there is no resid_mid): GPT-J (``h``),
  GPT-NeoX with ``use_parallel_residual`` (Pythia's default).
- post-LN encoders, as TransformerLens's HookedEncoder: resid_mid = resid_pre + attn_out
  (before the attention LayerNorm), resid_post = LN(resid_mid) + mlp_out (before the output
  LayerNorm), normalized_resid_post = the block's output (the next block's resid_pre and
  ``output_hidden_states[L + 1]``). BERT / RoBERTa (``encoder.layer``: attn_out =
  ``attention.output.dense``, mlp_out = ``output.dense``), DistilBERT (``transformer.layer``:
  ``attention``, ``ffn``; norms ``sa_layer_norm``, ``output_layer_norm``).

In pre-LN decoders resid_post of the last layer is taken before the final norm (unlike
``output_hidden_states[-1]``, which has it applied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import UserError

HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "normalized_resid_post")


@dataclass(frozen=True)
class Layout:
    layers: str  # path of the ModuleList of blocks inside the base model
    sites: dict[str, tuple[str, str]]  # hook -> (module path in the block, "output" | "input")
    no_mid: Callable[[nn.Module, nn.Module], str | None] | None = None  # (model, block) -> why
    flat: frozenset[str] = frozenset()  # hooks whose module sees [B*T, d] rows (OPT's MLP)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, "base_model", model).get_submodule(self.layers)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def hooks(self) -> list[str]:
        """The hook names this family has (``resid_mid`` possibly absent per model)."""
        return [h for h in HOOKS if h in self.sites]

    def locate(
        self, model: nn.Module, layer: int, hook: str
    ) -> tuple[nn.Module, str, nn.Module | None]:
        """Where ``blocks.{layer}.hook_{hook}`` lives: ``(module, "output" | "input", block)``,
        the block only when the module sees the tokens as flattened rows (``flat``)."""
        n = self.n_layers(model)
        if layer >= n:
            raise UserError(
                f"unknown site blocks.{layer}.hook_{hook}; this model has blocks 0..{n - 1}"
            )
        block = self.blocks(model)[layer]
        if hook == "resid_mid":
            why = "attention and MLP run in parallel" if "resid_mid" not in self.sites else None
            why = why or (self.no_mid and self.no_mid(model, block))
            if why:
                raise UserError(f"{type(model).__name__} has no resid_mid: {why}")
        if hook not in self.sites:
            raise UserError(
                f"{type(model).__name__} has no hook_{hook}; its hooks are "
                + ", ".join(f"hook_{h}" for h in self.hooks())
            )
        path, kind = self.sites[hook]
        module = block.get_submodule(path) if path else block
        return module, kind, block if hook in self.flat else None


def _decoder(mid: str | None, attn: str, mlp: str) -> dict[str, tuple[str, str]]:
    sites = {"resid_pre": ("", "input"), "resid_post": ("", "output")}
    sites |= {"attn_out": (attn, "output"), "mlp_out": (mlp, "output")}
    return sites | ({"resid_mid": (mid, "input")} if mid else {})


def _encoder(attn: str, mid_norm: str, mlp: str, out_norm: str) -> dict[str, tuple[str, str]]:
    return {
        "resid_pre": ("", "input"),
        "attn_out": (attn, "output"),
        "resid_mid": (mid_norm, "input"),
        "mlp_out": (mlp, "output"),
        "resid_post": (out_norm, "input"),
        "normalized_resid_post": ("", "output"),
    }


def _neox_parallel(model: nn.Module, block: nn.Module) -> str | None:
    if getattr(block, "use_parallel_residual", False):
        return "attention and MLP run in parallel (use_parallel_residual)"
    return None


def _opt_post_ln(model: nn.Module, block: nn.Module) -> str | None:
    if not getattr(model.config, "do_layer_norm_before", True):
        return "this OPT normalizes after the residual add (do_layer_norm_before=False)"
    return None


_LLAMA = Layout("layers", _decoder("post_attention_layernorm", "self_attn", "mlp"))
_SANDWICH = Layout(
    "layers",
    _decoder("pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"),
)
_BERT = Layout(
    "encoder.layer",
    _encoder(
        "attention.output.dense", "attention.output.LayerNorm", "output.dense", "output.LayerNorm"
    ),  # fmt: skip
)
LAYOUTS = {
    "gpt2": Layout("h", _decoder("ln_2", "attn", "mlp")),
    "gpt_neox": Layout(
        "layers", _decoder("post_attention_layernorm", "attention", "mlp"), _neox_parallel
    ),
    "gptj": Layout("h", _decoder(None, "attn", "mlp")),
    "opt": Layout(
        "decoder.layers",
        _decoder("final_layer_norm", "self_attn", "fc2"),
        _opt_post_ln,
        frozenset({"resid_mid", "mlp_out"}),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "olmo2": Layout(
        "layers", _decoder("mlp", "post_attention_layernorm", "post_feedforward_layernorm")
    ),
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": Layout(
        "transformer.layer",
        _encoder("attention", "sa_layer_norm", "ffn", "output_layer_norm"),
    ),
}


def hf_layout(model: nn.Module) -> Layout | None:
    """The layout of a Hugging Face model of a known family, else None."""
    config = getattr(model, "config", None)
    return LAYOUTS.get(getattr(config, "model_type", None))
