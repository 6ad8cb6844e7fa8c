"""Hybrid-aware KV routing: which replica can serve a request's prefix in every group.

Core package (no vLLM import): ``events`` (vLLM's KV-event wire format),
``hashing`` (vLLM's block hashes of token ids), ``index`` (per replica per tier
view of the fleet, never over-promising), ``scorer`` (hybrid hit rule per
tier, pick), ``router`` (the three together), ``subscriber`` (ZMQ), ``server``
(HTTP JSON API). See docs/routing.md.
"""

from hybridkv.routing.index import PrefixIndex
from hybridkv.routing.router import RouteAnswer, Router
from hybridkv.routing.scorer import ReplicaScore, pick, score_replicas, tier_groups

__all__ = ["PrefixIndex", "Router", "RouteAnswer", "ReplicaScore", "pick", "score_replicas",
           "tier_groups"]
