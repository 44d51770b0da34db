"""The subject models, whose activations are cached.

- ``bytelm``: the bundled byte-level GPT and its Python-stdlib corpus (trained on first use).
- ``subjects``: a model by name (``bytelm``, ``bytelm-tiny`` or a Hugging Face id/path),
  its size, sites and token stream, known before its weights are loaded.
- ``hf_layouts``: TransformerLens site names mapped onto Hugging Face model families.
"""
