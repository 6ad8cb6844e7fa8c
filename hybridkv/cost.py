"""Prefill cost: the FLOPs a hit of ``n`` tokens saves, for utility-per-byte eviction.

Only ratios matter to the policies (value per byte of one hit point against
another), so the model is the usual transformer estimate and nothing more:

- every token costs ``linear`` FLOPs (2 x active parameters: projections,
  MLP / experts, Mamba / linear-attention mixers, which are linear in length);
- each full-attention layer adds ``4 * q_dim`` FLOPs per (query, key) pair,
  so a prefix of n tokens costs ``4 * q_dim * n * (n + 1) / 2`` there;
- a sliding-window layer sees at most ``window`` keys per query.

Invariant: ``prefill_flops`` is increasing in ``n`` and ``prefill_flops(0) == 0``.
"""

from __future__ import annotations

import functools

import msgspec

from hybridkv.groups import GroupKind, HybridLayout

__all__ = ["PrefillCost"]


class PrefillCost(msgspec.Struct, frozen=True, kw_only=True):
    #: FLOPs per token that do not depend on context length (2 x active params)
    linear: float
    #: query width (heads x head dim) of each full-attention layer
    full_q_dims: tuple[int, ...] = ()
    #: (query width, window tokens) of each sliding-window layer
    window_layers: tuple[tuple[int, int], ...] = ()

    def prefill_flops(self, n: int) -> float:
        """FLOPs to prefill the first ``n`` tokens of a prompt."""
        if n <= 0:
            return 0.0
        full_q, windows = _aggregate(self.full_q_dims, self.window_layers)
        flops = self.linear * n
        flops += 4.0 * full_q * n * (n + 1) / 2
        for window, q_dim in windows:
            inside = min(n, window)
            pairs = inside * (inside + 1) / 2 + (n - inside) * window
            flops += 4.0 * q_dim * pairs
        return flops

    @classmethod
    def from_layout(cls, layout: HybridLayout, *, hidden_size: int = 4096,
                    active_params: float | None = None) -> PrefillCost:
        """An estimate from group kinds alone (used when the model's sizes are unknown).

        Each layer gets ``12 * hidden_size**2`` parameters unless ``active_params``
        is given; attention layers get a query width of ``hidden_size``.
        """
        layers = sum(len(g.layer_names) for g in layout.groups)
        params = active_params if active_params is not None else 12.0 * hidden_size**2 * layers
        full = tuple(hidden_size for g in layout.groups_of(GroupKind.FULL)
                     for _ in g.layer_names)
        windows = tuple((hidden_size, int(g.window_tokens or 0))
                        for g in layout.groups_of(GroupKind.SLIDING) for _ in g.layer_names)
        return cls(linear=2.0 * params, full_q_dims=full, window_layers=windows)


@functools.cache
def _aggregate(full_q_dims: tuple[int, ...], window_layers: tuple[tuple[int, int], ...]
               ) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Summed query widths: of full-attention layers, and per window size."""
    per_window: dict[int, int] = {}
    for q_dim, window in window_layers:
        per_window[window] = per_window.get(window, 0) + q_dim
    return sum(full_q_dims), tuple(sorted(per_window.items()))
