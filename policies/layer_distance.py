"""Layer distance (ours): evict the key whose estimated time to next use is largest.

Layers are computed in a cycle, so the next time layer ``j`` is computed is
``d = (j - c) mod L`` steps away when layer ``c`` is being computed: 1 for the next
layer, L for layer ``c`` itself once its step is done (the layer just computed is
the furthest from reuse). Whether the expert is chosen then is a guess from its
reuse frequency ``p``: an exponentially decayed average, per computation of its
layer, of "was it selected" (``p <- (1 - alpha) * p + alpha * selected``). If each
computation of the layer picks it with probability ``p``, the expected wait is
about ``d + L * (1/p - 1)`` steps; the victim maximises that (ties: the larger
``d``, then the least recently used). While a step is still going (fewer keys used
than the widest step seen, i.e. top-k), that layer's unused keys get ``d = 0``.

Frequencies outlive eviction (one float per key). Each layer keeps a heap of its
resident keys by frequency, so a victim costs one look per layer, not per key.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Container

from expertd.policies.base import NO_PINS, Key, NoVictimError, TrackedPolicy
from expertd.policies.registry import register
from expertd.policies.steps import StepClock

_RENORMALIZE_BELOW = 1e-200


@dataclasses.dataclass(frozen=True)
class LayerDistanceParams:
    """``alpha``: weight of the newest layer computation in the frequency average."""

    alpha: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")


@register("layer-distance")
class LayerDistance(TrackedPolicy):
    """Largest ``d + L * (1/p - 1)`` first, with per-layer frequency heaps."""

    Params = LayerDistanceParams

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        self.clock = StepClock(geometry)
        n, layers = geometry.num_keys, geometry.num_layers
        self._alpha = self.params.alpha
        self._decay = 1.0 - self._alpha
        # p(key) = _q[key] * _scale[layer]: one multiply per layer computation decays a layer.
        self._q = [0.0] * n
        self._scale = [1.0] * layers
        self._last = [-1] * n  # last access time
        # Per layer: a heap of (q, last, key), at most one entry per key (`_queued`). A hit
        # only raises q and last, so an entry may understate its key: it is refreshed when
        # it reaches the top, and the least entry is still the least key.
        self._heaps: list[list[tuple[float, int, Key]]] = [[] for _ in range(layers)]
        self._queued = [False] * n
        # _distance[c][j]: steps until layer j is computed again when layer c is being computed.
        self._distance = [[(j - c) % layers or layers for j in range(layers)] for c in range(layers)]
        # Per layer: its least heap entry while known to be current, else None.
        self._best: list[tuple[float, int, Key] | None] = [None] * layers

    def frequency(self, key: Key) -> float:
        """The decayed reuse frequency ``p`` of ``key`` now."""
        return self._q[key] * self._scale[key // self.geometry.num_experts]

    def on_step(self, forward: int, layer: int) -> None:
        self.clock.step(forward, layer)
        self._layer_computed(layer)

    def on_miss(self, key: Key, t: int) -> None:
        self._selected(key, t)

    def on_hit(self, key: Key, t: int) -> None:
        self._selected(key, t)

    def on_insert(self, key: Key, t: int) -> None:
        layer = self._admit(key)
        if self._last[key] < 0:
            self._last[key] = t
        if not self._queued[key]:
            self._queued[key] = True
            heapq.heappush(self._heaps[layer], (self._q[key], self._last[key], key))
        best = self._best[layer]
        if best is not None and (self._q[key], self._last[key], key) < best:
            self._best[layer] = None

    def _selected(self, key: Key, t: int) -> None:
        if self.clock.observe(key):
            self._layer_computed(self.clock.layer)
        layer = key // self.geometry.num_experts
        self._q[key] += self._alpha / self._scale[layer]
        self._last[key] = t
        best = self._best[layer]
        if best is not None and best[2] == key:
            self._best[layer] = None

    def _layer_computed(self, layer: int) -> None:
        scale = self._scale[layer] * self._decay
        if scale < _RENORMALIZE_BELOW:
            # Fold the scale into the layer's q values before it underflows.
            num_experts = self.geometry.num_experts
            q = self._q
            for key in range(layer * num_experts, (layer + 1) * num_experts):
                q[key] *= scale
            scale = 1.0
            self._scale[layer] = scale
            self._rebuild(layer)
        self._scale[layer] = scale

    def _rebuild(self, layer: int) -> None:
        num_experts = self.geometry.num_experts
        q, last, resident, queued = self._q, self._last, self._resident, self._queued
        heap = []
        for key in range(layer * num_experts, (layer + 1) * num_experts):
            queued[key] = key in resident
            if key in resident:
                heap.append((q[key], last[key], key))
        heapq.heapify(heap)
        self._heaps[layer] = heap
        self._best[layer] = None

    def _least(
        self, layer: int, pinned: Container[Key] = NO_PINS, skip: Container[Key] = ()
    ) -> tuple[float, int, Key] | None:
        """The layer's resident key of least frequency (oldest first), not pinned nor skipped."""
        heap = self._heaps[layer]
        q, last, resident = self._q, self._last, self._resident
        aside = []
        found = None
        while heap:
            entry = heap[0]
            key = entry[2]
            if key not in resident:
                heapq.heappop(heap)
                self._queued[key] = False
            elif entry[0] != q[key] or entry[1] != last[key]:
                heapq.heapreplace(heap, (q[key], last[key], key))  # refresh an understated entry
            elif key in pinned or key in skip:
                aside.append(heapq.heappop(heap))
            else:
                found = entry
                break
        for entry in aside:
            heapq.heappush(heap, entry)
        return found

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        clock = self.clock
        layers = self.geometry.num_layers
        current = clock.layer if clock.layer >= 0 else layers - 1
        in_step = clock.in_step if not clock.step_done() else ()
        count, scale, cached, distance = self._layer_size, self._scale, self._best, self._distance[current]
        # Maximise (eta, d, -last); eta = d + L/p is the wait estimate plus the constant L.
        best_eta, best_d, best_last, choice = -1.0, -1, 0, -1
        for layer in range(layers):
            if not count[layer]:
                continue
            if layer == current and in_step:
                found = self._current_layer_candidate(layer, pinned, in_step)
                if found is None:
                    continue
                eta, d, last, key = found
            else:
                if pinned:
                    entry = self._least(layer, pinned)
                else:
                    entry = cached[layer]
                    if entry is None:
                        entry = cached[layer] = self._least(layer)
                if entry is None:
                    continue
                d = distance[layer]
                p = entry[0] * scale[layer]
                eta = d + layers / p if p > 0.0 else math.inf
                last, key = entry[1], entry[2]
            if eta > best_eta or (eta == best_eta and (d > best_d or (d == best_d and last < best_last))):
                best_eta, best_d, best_last, choice = eta, d, last, key
        if choice < 0:
            raise NoVictimError(f"layer-distance: all {len(self._resident)} resident keys are pinned")
        return choice

    def _current_layer_candidate(
        self, layer: int, pinned: Container[Key], in_step: Container[Key]
    ) -> tuple[float, int, int, Key] | None:
        """(eta, d, last, key) of the layer being computed while its step is not done.

        Keys used in this step wait a full cycle (d = L); the others may be next (d = 0).
        """
        layers = self.geometry.num_layers
        q, last, resident, scale = self._q, self._last, self._resident, self._scale[layer]
        options = []
        entry = self._least(layer, pinned, in_step)
        if entry is not None:
            options.append((entry, 0))
        used = [(q[k], last[k], k) for k in in_step if k in resident and k not in pinned]  # type: ignore[attr-defined]
        if used:
            options.append((min(used), layers))
        best = None
        for (q_key, last_key, key), d in options:
            p = q_key * scale
            eta = d + layers / p if p > 0.0 else math.inf
            if best is None or (eta, d, -last_key) > (best[0], best[1], -best[2]):
                best = (eta, d, last_key, key)
        return best

    def on_remove(self, key: Key) -> None:
        layer = self._evict(key)
        best = self._best[layer]
        if best is not None and best[2] == key:
            self._best[layer] = None
