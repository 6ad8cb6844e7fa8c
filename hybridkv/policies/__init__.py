"""Capacity policies behind one factory (``make_policy``); see ``base`` for the interface.

| name | admission | eviction |
|---|---|---|
| ``group_aware`` (default) | per group kind, around likely hit points | dead, then spare, then hit points by utility per byte |
| ``lru`` | everything | least recently used chunk of any group |
| ``watermark`` | into free space only | a cleaner deletes LRU chunks at 85% -> 70% |
"""

from __future__ import annotations

from hybridkv.cost import PrefillCost
from hybridkv.groups import GroupKind, HybridLayout
from hybridkv.policies.base import Admission, Candidate, CapacityPolicy, RequestView
from hybridkv.policies.group_aware import GroupAwarePolicy
from hybridkv.policies.lru import LRUPolicy
from hybridkv.policies.watermark import WatermarkPolicy

__all__ = ["POLICY_NAMES", "make_policy", "Admission", "Candidate", "CapacityPolicy",
           "RequestView", "GroupAwarePolicy", "LRUPolicy", "WatermarkPolicy"]

POLICY_NAMES = ("group_aware", "lru", "watermark")


def make_policy(name: str, layout: HybridLayout, *, cost: PrefillCost | None = None,
                checkpoint_interval: int = 0, alpha: float = 1.0) -> CapacityPolicy:
    """The policy called ``name`` for ``layout``.

    ``group_aware`` needs a full-attention group; for a layout without one it
    falls back to ``lru`` (there is no prefix spine to be aware of).
    """
    if name == "group_aware":
        if not layout.groups_of(GroupKind.FULL):
            return LRUPolicy()
        return GroupAwarePolicy(layout, cost=cost, checkpoint_interval=checkpoint_interval,
                                alpha=alpha)
    if name == "lru":
        return LRUPolicy()
    if name == "watermark":
        return WatermarkPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {POLICY_NAMES}")
