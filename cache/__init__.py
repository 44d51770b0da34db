"""Activation caches: capture a subject model's activations at named sites into shards.

- ``models/``: the subject models (the bundled ``bytelm``, Hugging Face models and
  their site layouts).
- ``hooks``: sites resolved to modules; ``capture`` reads them, ``splice`` replaces them.
- ``text``: text sources packed into token sequences.
- ``build``: cache settings and building (resumable) a cache.
- ``__main__``: ``python -m flashsae.cache {build,info,verify}``.
- ``shards``, ``shard_file``: the on-disk format; ``loader``: shuffled batches from it.
- ``paths``: ``$FLASHSAE_HOME``, local-path tests and file digests; ``errors``: mistakes a
  user can fix; ``locks``: one writer per output directory.

``flashsae.train`` imports ``flashsae.cache``, which imports ``flashsae.kernels``; never back.
"""
