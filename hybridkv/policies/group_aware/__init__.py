"""The group-aware capacity policy (default) and its per-kind rules.

| module | holds |
|---|---|
| ``policy`` | ``GroupAwarePolicy``: admission around resume points, eviction order |
| ``full`` / ``sliding`` / ``state`` | per-kind rules: admission, what a hit at p needs |
| ``resume_points`` | where a later request is likely to resume (admission) |
| ``tracker`` | ``HitPointTracker``: hit points, counts and pools kept up to date as chunks come and go |
| ``point`` | ``Point``: one hit point (needs, checkpoint, lazy values); the upkeep's bounds |
| ``rooting`` / ``needs`` / ``counts`` / ``pools`` / ``lazy_values`` / ``rebuild`` | the tracker's parts: rooted chains; what a hit point needs; what makes a chunk live; the dead and spare pools; densities and gaps; the O(N) rebuild |
| ``order`` | the utility order of hit points, merged lazily from two sorted lists |
"""

from hybridkv.policies.group_aware.policy import GroupAwarePolicy

__all__ = ["GroupAwarePolicy"]
