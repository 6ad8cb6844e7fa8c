"""Test aids that must never run in production: fault injection and scripted engine sessions.

Invariant: no module outside ``hybridkv.testing`` imports this package
(``tests/project/test_production_path.py`` checks it), and no environment variable
turns any of it on. It sits above every other layer: it may import
``hybridkv.vllm``, ``hybridkv.demo`` (the scripted session builds on the demo
session) and vLLM; tests select it explicitly.

- ``faults``: ``FaultyFileIO``, a ``FileIO`` that fails on purpose (rules).
- ``connector``: ``FaultInjectingConnector``, a ``HybridKVConnector`` whose
  stores use ``FaultyFileIO`` inside real engine processes.
- ``faultplan``: actions a scripted session runs between prompts.
- ``session``: ``python -m hybridkv.testing.session``, one scripted engine lifetime.
"""
