"""Page copies between vLLM's KV tensors and chunk files (no vLLM import).

- ``pool``: bounded pool of preallocated host buffers (pinned for CUDA).
- ``copier``: gather / scatter a chunk's pages; the in-place CPU copier.
- ``cuda``: the CUDA copier (staging buffer, per-thread streams, events).
- ``chunk_io``: one chunk: gather -> ``ChunkStore.write``; verified read -> scatter.
"""

from hybridkv.pages.chunk_io import host_buffer_bytes, load_chunk, store_chunk
from hybridkv.pages.copier import CpuPageCopier, PageCopier, layer_arrays, make_copier
from hybridkv.pages.pool import HostBuffer, HostBufferPool

__all__ = ["CpuPageCopier", "HostBuffer", "HostBufferPool", "PageCopier", "host_buffer_bytes",
           "layer_arrays", "load_chunk", "make_copier", "store_chunk"]
