"""Capacity policies by name, as vLLM's ``CachePolicyFactory`` registers its own.

``register_policy(name)`` decorates a factory ``(layout, *, cost, checkpoint_interval,
alpha) -> CapacityPolicy``; ``make_policy(name, layout, ...)`` builds one;
``policy_names()`` is what configuration accepts.

Invariant: a name is registered once; an unknown name raises ValueError naming the
valid ones.
"""

from __future__ import annotations

from collections.abc import Callable

from hybridkv.cost import PrefillCost
from hybridkv.groups import HybridLayout
from hybridkv.policies.base import CapacityPolicy

__all__ = ["register_policy", "make_policy", "policy_names", "PolicyFactory"]

PolicyFactory = Callable[..., CapacityPolicy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def decorate(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"eviction policy {name!r} is registered already")
        _REGISTRY[name] = factory
        return factory
    return decorate


def policy_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def make_policy(name: str, layout: HybridLayout, *, cost: PrefillCost | None = None,
                checkpoint_interval: int = 0, alpha: float = 1.0) -> CapacityPolicy:
    """The policy called ``name`` for ``layout``."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {policy_names()}")
    return factory(layout, cost=cost, checkpoint_interval=checkpoint_interval, alpha=alpha)
