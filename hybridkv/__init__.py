"""hybridkv: offload the KV cache of hybrid LLMs to a directory, group by group.

The core (groups, keys, hit rule, store, index, policies, simulator) imports no
vLLM; only ``hybridkv.vllm`` does.
"""

__version__ = "0.1.0"
