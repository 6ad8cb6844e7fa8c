"""The group-aware capacity policy (default) and its per-kind rules.

| module | holds |
|---|---|
| ``policy`` | ``GroupAwarePolicy``: admission around likely hit points, eviction order |
| ``full`` / ``sliding`` / ``state`` | per-kind rules: admission, what a hit at p needs |
| ``hit_points`` | likely hit points of a request |
| ``points`` | ``HitPoints``: hit points, counts and pools kept up to date incrementally |
| ``order`` | the utility order of hit points, merged lazily from two sorted lists |
"""

from hybridkv.policies.group_aware.policy import GroupAwarePolicy

__all__ = ["GroupAwarePolicy"]
