"""Capacity policies, registered by name (``registry``); see ``base`` for the interface.

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
from hybridkv.policies.registry import make_policy, policy_names, register_policy
from hybridkv.policies.watermark import WatermarkPolicy

__all__ = ["POLICY_NAMES", "make_policy", "policy_names", "register_policy", "Admission",
           "Candidate", "CapacityPolicy", "RequestView", "GroupAwarePolicy", "LRUPolicy",
           "WatermarkPolicy"]


@register_policy("group_aware")
def _group_aware(layout: HybridLayout, *, cost: PrefillCost | None = None,
                 checkpoint_interval: int = 0, alpha: float = 1.0) -> CapacityPolicy:
    """Needs a full-attention group; without one it is ``lru`` (no prefix spine)."""
    if not layout.groups_of(GroupKind.FULL):
        return LRUPolicy()
    return GroupAwarePolicy(layout, cost=cost, checkpoint_interval=checkpoint_interval,
                            alpha=alpha)


@register_policy("lru")
def _lru(layout: HybridLayout, **_: object) -> CapacityPolicy:
    return LRUPolicy()


@register_policy("watermark")
def _watermark(layout: HybridLayout, **_: object) -> CapacityPolicy:
    return WatermarkPolicy()


#: the names configuration accepts (the registry's, at import)
POLICY_NAMES = policy_names()
