"""Predictive (ours): evict the key whose estimated time to next use is largest, per a predictor.

Like layer-distance, the expected wait of key (j, x) while layer l is being computed is
``d + L * (1 / p - 1)`` steps: ``d`` until layer j is next computed, and ``p``, the
probability that x is chosen then (if each later computation chose it with the same
``p``, the wait would be geometric). Here ``p`` comes from a routing predictor for
*every* resident key, not a per-key frequency: the generation's working set, temporal
reuse and the current token's cross-layer evidence (the `combined` predictor) all move
it. Ties go to the least recently used key.

Where the estimates come from (`EvictionPolicy.bind_estimator`):

- bound by the cache manager to its `Prefetcher`: the expected waits of the tenants'
  active generations (the soonest use of each key wins), from the same per-tenant
  predictors that plan prefetches;
- unbound (plain hit-rate replay, or a manager without prefetching): the policy feeds
  its own predictor (``predictor``, one stream, no generation boundaries) from the
  accesses it sees, a step at a time. While the current layer's step is still going
  (fewer keys used than top-k), that layer's unused keys may be needed now (``d = 0``)
  and its used ones wait a full cycle (``d = L``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container

import numpy as np

from expertd.policies.base import NO_PINS, EvictionPolicy, Geometry, Key, NoVictimError, key_index
from expertd.policies.predict.predictor import Predictor, make_predictor
from expertd.policies.registry import register
from expertd.policies.steps import StepClock

_STREAM = "stream"  # the generation of the unbound policy's own predictor


@dataclasses.dataclass(frozen=True)
class PredictiveParams:
    """``predictor``: the unbound policy's own predictor; ``floor``: the least ``p`` believed."""

    predictor: str = "combined"
    floor: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {self.floor!r}")


def expected_wait(
    now: np.ndarray, later: np.ndarray, distance: np.ndarray, num_layers: int, floor: float
) -> np.ndarray:
    """``d + (1 - p) * L / q`` per key [K]: ``now`` p, P(chosen at the next computation, d steps
    away), ``later`` q, P(chosen at each one after it, every L steps)."""
    return distance + (1.0 - now) * (num_layers / np.maximum(later, floor))


def next_computation(geometry: Geometry) -> list[np.ndarray]:
    """``out[l][key]``: steps from computing layer ``l`` to the next computation of key's layer (1..L)."""
    layers = geometry.num_layers
    layer_of = np.arange(geometry.num_keys) // geometry.num_experts
    return [((layer_of - l - 1) % layers + 1).astype(np.float64) for l in range(layers)]


@register("predictive")
class Predictive(EvictionPolicy):
    """Largest expected wait ``d + L (1/p - 1)`` first, ``p`` from a predictor; see the module."""

    Params = PredictiveParams
    wants_estimates = True

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        n = geometry.num_keys
        self.clock = StepClock(geometry)
        self._resident = np.zeros(n, dtype=bool)
        self._last = np.zeros(n, dtype=np.int64)  # last access (or insert) time, for ties
        self._size = 0
        self._estimator: Callable[[], np.ndarray] | None = None
        self._own: Predictor | None = make_predictor(self.params.predictor, geometry)
        self._step: list[int] = []  # experts of the current step, not yet observed
        self._step_layer = -1
        self._observed = geometry.num_layers - 1  # the layer the own predictor saw last
        self._wait: np.ndarray | None = None  # cached expected waits of the unbound predictor
        self._distance = next_computation(geometry)

    def bind_estimator(self, estimator: Callable[[], np.ndarray] | None) -> None:
        self._estimator = estimator
        if estimator is not None:
            self._own = None  # the bound estimates replace the policy's own predictor

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        index = key_index(key, self.geometry.num_keys)
        return index >= 0 and bool(self._resident[index])

    # --- what the cache tells the policy -------------------------------------------------

    def on_step(self, forward: int, layer: int) -> None:
        self._flush()
        self.clock.step(forward, layer)

    def on_hit(self, key: Key, t: int) -> None:
        self._last[key] = t
        self._seen(key)

    def on_miss(self, key: Key, t: int) -> None:
        self._seen(key)

    def on_insert(self, key: Key, t: int) -> None:
        if not self._resident[key]:
            self._resident[key] = True
            self._size += 1
        self._last[key] = t

    def on_remove(self, key: Key) -> None:
        if self._resident[key]:
            self._resident[key] = False
            self._size -= 1

    def _seen(self, key: Key) -> None:
        """A demand access: part of the current step, for the unbound policy's predictor."""
        if self._own is None:
            return
        if self.clock.observe(key):
            self._flush()
        layer, expert = divmod(key, self.geometry.num_experts)
        if layer != self._step_layer:
            self._flush()
            self._step_layer = layer
        if expert not in self._step:
            self._step.append(expert)

    def _flush(self) -> None:
        """The current step is over: its experts go to the unbound policy's predictor."""
        if self._own is not None and self._step:
            self._own.observe(_STREAM, self._step_layer, self._step)
            self._observed = self._step_layer
            self._wait = None
        self._step = []
        self._step_layer = -1

    # --- the victim -----------------------------------------------------------------------

    def waits(self) -> np.ndarray:
        """[num_keys] expected steps until each key is used next (bound, or own estimates)."""
        if self._estimator is not None:
            return self._estimator()
        assert self._own is not None
        layers, observed = self.geometry.num_layers, self._observed
        if self._wait is None:
            now, later = self._own.outlook(_STREAM, observed)  # [L, E] each
            distance = self._distance[observed]
            self._wait = expected_wait(
                now.reshape(-1), later.reshape(-1), distance, layers, self.params.floor
            )
        step = self._step_layer
        if step < 0:
            return self._wait
        # The step computing layer `step` is not observed yet: its used keys wait a full
        # cycle, and so do the others once it is done; while it goes they may be next.
        num_experts = self.geometry.num_experts
        wait = self._wait.copy()
        block = slice(step * num_experts, (step + 1) * num_experts)
        wait[block] -= self._distance[observed][block]
        if self.clock.step_done():
            wait[block] += layers
        else:
            wait[[step * num_experts + e for e in self._step]] += layers
        return wait

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        if not self._size:
            raise NoVictimError("predictive: the tier is empty")
        score = np.where(self._resident, self.waits(), -np.inf)  # [num_keys]
        while True:
            best = float(score.max())
            if best == -np.inf:
                raise NoVictimError(f"predictive: all {self._size} resident keys are pinned")
            ties = np.flatnonzero(score == best)
            key = int(ties[0]) if len(ties) == 1 else int(ties[np.argmin(self._last[ties])])
            if key not in pinned:
                return key
            score[key] = -np.inf
