"""Block hashes of a request's token ids, as a vLLM engine computes them.

vLLM chains one hash per ``hash_block_tokens`` tokens (the engine's block size,
or the smallest group block size of a hybrid model):
``h_i = H((h_{i-1} or NONE_HASH, tuple(tokens_i), extra_keys))`` with
``NONE_HASH = H(seed)``. ``H`` is ``--prefix-caching-hash-algo``:
``sha256`` (pickle, the default), ``sha256_cbor``, ``xxhash``, ``xxhash_cbor``.
The seed is the engines' ``PYTHONHASHSEED`` if set, else ``"vllm-none-hash"``
for the sha256 algorithms; the xxhash ones draw a random seed per process
unless ``PYTHONHASHSEED`` is set, so a router can only follow them with it set.
Requests with LoRA, multimodal inputs, cache salts or prompt embeddings add
extra keys this module does not compute: pass their block hashes instead.

Invariant: ``RequestHasher(...).hashes(tokens)[i]`` equals vLLM's
``request.block_hashes[i]`` for the same algorithm, seed and block size
(``tests/routing/test_routing_events.py`` compares them); ``keys`` gives them in the
int form KV events carry (``events.hash_key``).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

from hybridkv.routing.events import hash_key

__all__ = ["HASH_ALGOS", "DEFAULT_SEED", "RequestHasher"]

DEFAULT_SEED = "vllm-none-hash"


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _cbor(obj: Any) -> bytes:
    import cbor2  # installed with vLLM; only the *_cbor algorithms need it

    return cbor2.dumps(obj, canonical=True)


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(_cbor(obj)).digest()


def _xxhash(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _xxhash_cbor(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(_cbor(obj))


HASH_ALGOS: dict[str, Callable[[Any], bytes]] = {
    "sha256": _sha256, "sha256_cbor": _sha256_cbor,
    "xxhash": _xxhash, "xxhash_cbor": _xxhash_cbor,
}


class RequestHasher:
    """Chained prefix hashes of token ids, one per ``block_tokens`` tokens."""

    def __init__(self, algo: str = "sha256", seed: str | None = None,
                 block_tokens: int = 16) -> None:
        if algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash algorithm {algo!r}; valid: {', '.join(HASH_ALGOS)}")
        if block_tokens <= 0:
            raise ValueError(f"hash block size must be positive, got {block_tokens}")
        if seed is None and algo.startswith("xxhash"):
            raise ValueError(f"{algo} engines use a random seed unless PYTHONHASHSEED is set; "
                             "pass the engines' PYTHONHASHSEED as the seed")
        self.algo = algo
        self.block_tokens = block_tokens
        self._fn = HASH_ALGOS[algo]
        self.seed = DEFAULT_SEED if seed is None else seed
        self.none_hash = self._fn(self.seed)

    def hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Digest per complete block (a partial last block has none)."""
        out: list[bytes] = []
        parent = self.none_hash
        b = self.block_tokens
        for start in range(0, len(token_ids) - b + 1, b):
            parent = self._fn((parent, tuple(token_ids[start:start + b]), None))
            out.append(parent)
        return out

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        return [hash_key(h) for h in self.hashes(token_ids)]
