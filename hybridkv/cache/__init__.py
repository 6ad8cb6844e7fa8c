"""The cache service: the vLLM-free core of one engine's cache directory (see ``service``).

Adapters (``hybridkv.vllm``) translate their engine's calls to ``CacheService``;
nothing here imports vLLM.
"""

from hybridkv.cache.service import HEADER_ALLOWANCE, CacheService

__all__ = ["CacheService", "HEADER_ALLOWANCE"]
