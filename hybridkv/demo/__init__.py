"""What ``hybridkv demo`` and ``hybridkv serve`` without a model run: scaffolding, not the cache.

- ``models``: random-weight Gemma3 / Qwen3-Next models built locally from
  transformers config classes (tiny ones for the demo and the tests, ~100M
  ``*_bench`` ones for the benchmarks). Their outputs mean nothing; they only
  have the layer layout of the real models.
- ``session``: ``python -m hybridkv.demo.session``, one engine lifetime that runs
  prompts and reports tokens, cached tokens and TTFTs (imports vLLM).

Invariant: nothing under ``hybridkv`` imports this package except ``hybridkv.cli``
and ``hybridkv.testing`` (``tests/project/test_production_path.py`` checks it), and it
imports nothing from ``hybridkv.testing``.
"""
