"""TransformerLens site names mapped onto Hugging Face model families (no transformers import).

For block L (module paths inside ``layers[L]``; "in" = the module's input, else its output):

- GPT-2 (``transformer.h``): resid_pre = in block, resid_mid = in ``ln_2``,
  resid_post = block, attn_out = ``attn``, mlp_out = ``mlp``.
- GPT-NeoX / Pythia (``gpt_neox.layers``): resid_mid = in ``post_attention_layernorm``,
  attn_out = ``attention``, mlp_out = ``mlp``; no resid_mid with the parallel residual
  (Pythia's default), where attention and MLP both read resid_pre.
- Llama, Mistral, Qwen2, Gemma (``model.layers``): resid_mid = in
  ``post_attention_layernorm``, attn_out = ``self_attn``, mlp_out = ``mlp``.
- Gemma2 (``model.layers``): its sandwich norms sit inside the residual branches, so
  resid_mid = in ``pre_feedforward_layernorm``, attn_out = ``post_attention_layernorm``,
  mlp_out = ``post_feedforward_layernorm``.

resid_post of the last layer is taken before the final norm (unlike
``output_hidden_states[-1]``, which has it applied).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class Layout:
    layers: str  # path of the ModuleList of blocks
    attn_out: str  # module (inside a block) whose output is attn_out
    mlp_out: str
    mid_norm: str | None  # module whose input is resid_mid; None where the block is parallel

    def n_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.layers))

    def locate(self, model: nn.Module, layer: int, hook: str) -> tuple[nn.Module, str]:
        """Where ``blocks.{layer}.hook_{hook}`` lives: ``(module, "output" | "input")``."""
        n = self.n_layers(model)
        if layer >= n:
            raise UserError(
                f"unknown site blocks.{layer}.hook_{hook}; this model has blocks 0..{n - 1}"
            )
        block = model.get_submodule(self.layers)[layer]
        mid_norm = self.mid_norm
        if mid_norm == "post_attention_layernorm" and getattr(
            block, "use_parallel_residual", False
        ):
            mid_norm = None
        if hook == "resid_pre":
            return block, "input"
        if hook == "resid_post":
            return block, "output"
        if hook == "attn_out":
            return block.get_submodule(self.attn_out), "output"
        if hook == "mlp_out":
            return block.get_submodule(self.mlp_out), "output"
        if mid_norm is None:
            raise UserError(
                f"{type(model).__name__} has no resid_mid: attention and MLP run in parallel"
            )
        return block.get_submodule(mid_norm), "input"


_LLAMA = Layout("model.layers", "self_attn", "mlp", "post_attention_layernorm")
LAYOUTS = {
    "gpt2": Layout("transformer.h", "attn", "mlp", "ln_2"),
    "gpt_neox": Layout("gpt_neox.layers", "attention", "mlp", "post_attention_layernorm"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": Layout(
        "model.layers",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "pre_feedforward_layernorm",
    ),
}


def hf_layout(model: nn.Module) -> Layout | None:
    """The layout of a Hugging Face model of a known family, else None."""
    config = getattr(model, "config", None)
    return LAYOUTS.get(getattr(config, "model_type", None))
