"""Combined predictor: generation frequency, temporal reuse and cross-layer evidence, pooled.

Three estimates of ``P(x chosen at layer j's next computation)``, as rows per layer:

- **frequency**: this generation's decayed choice counts at j, shrunk towards the tenant's
  marginal rate: ``f = (c + prior * m) / (n + prior)`` (a generation's working set is small);
- **recency**: the tenant's learned reuse rates at j: ``r1[j]`` if x was chosen at j's
  last computation in this generation, else ``r0[j]`` (routing consistency);
- **cross**: `CrossLayer`'s table from the layer just observed, for this token's layers
  within its reach (the *near* rows); the others carry no cross-layer evidence.

They are pooled log-linearly and each row is scaled to the layer's top-k choices (capped
at 1)::

    near rows:  p ∝ f ** near_frequency * rec ** near_recency * cross ** w_cross
    far rows:   p ∝ f ** w_frequency * rec ** w_recency

The default weights maximise the likelihood of the next computations' choices on the
tuning split (Granite, Llama-4 abstract_algebra, Mixtral gsm8k); docs/prefetch.md has the
fit and each estimate's own likelihood beside the pool's. The activation-matrix match
(MoE-Infinity) was a fourth candidate factor: fitted with the others it got no weight
near and little far (a likelihood gain under 1% on Llama-4 only), so it is not pooled.

Cost: what changes only when layer j is computed (the generation's counts and reuse flags,
the tenant's rates, seen at this generation's next computation of j) is kept per generation
as two log rows of j (near and far weights); a prediction adds the cross-layer term.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from expertd.policies.predict.cross_layer import CrossLayer
from expertd.policies.predict.predictor import (
    Generation,
    ProbabilityPredictor,
    RecentGenerations,
    RowParams,
    check_state,
    pack_array,
    register_predictor,
    state_header,
    unpack_array,
)

_FLOOR = 1e-4  # no estimate is ever certain that an expert is not chosen


@dataclasses.dataclass(frozen=True)
class CombinedParams(RowParams):
    """Pool weights (near rows: ``near_*`` and ``w_cross``; far rows: ``w_*``) and the estimates'."""

    w_frequency: float = 0.66
    w_recency: float = 0.25
    near_frequency: float = 0.10
    near_recency: float = 0.21
    w_cross: float = 1.0
    decay: float = 0.98  # of the generation's choice counts, per computation of the layer
    prior: float = 2.0  # weight of the tenant's marginal in the frequency estimate
    reach: int = 3  # cross-layer distances
    marginal_decay: float = 0.995  # of the tenant's marginal rates, per computation of a layer
    reuse_decay: float = 0.99  # of the tenant's reuse rates

    def __post_init__(self) -> None:
        super().__post_init__()
        weights = ("w_frequency", "w_recency", "near_frequency", "near_recency", "w_cross")
        for name in (*weights, "prior"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("decay", "reuse_decay", "marginal_decay"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.reach < 1:
            raise ValueError(f"reach must be >= 1, got {self.reach!r}")


class _Generation:
    """One generation's counts, reuse flags, and the pool's log rows that depend only on them."""

    __slots__ = ("counts", "seen", "chosen", "far", "near")

    def __init__(self, shape: tuple[int, int], far: np.ndarray, near: np.ndarray) -> None:
        self.counts = np.zeros(shape)  # [L, E] decayed choice counts
        self.seen = [0.0] * shape[0]  # decayed computations of each layer
        # the experts each layer's last computation chose (their reuse flag is set)
        self.chosen: list[list[int]] = [[] for _ in range(shape[0])]
        self.far = far  # [L, E] w_f log(c + prior m) + w_r [last] log(r1 / r0)
        self.near = near  # [L, E] the same with the near weights


@register_predictor("combined")
class Combined(ProbabilityPredictor):
    """Log-linear pool of frequency, recency and cross-layer estimates; see the module docstring."""

    Params = CombinedParams
    MAX_GENERATIONS = 1024

    def __init__(self, geometry, params=None) -> None:
        super().__init__(geometry, params)
        p = self.params
        self.cross = CrossLayer(geometry, {"reach": p.reach, "marginal_decay": p.marginal_decay})
        layers = geometry.num_layers
        # Per layer (lists: read and written one at a time): P(chosen again | chosen at the
        # layer's last computation), and P(chosen | not chosen then).
        self._reuse = [0.5] * layers
        self._fresh = [1.0 / geometry.num_experts] * layers
        self._generations: RecentGenerations[_Generation] = RecentGenerations(self.MAX_GENERATIONS)
        self._shape = (layers, geometry.num_experts)

    # --- learning -------------------------------------------------------------------------

    def _new_generation(self) -> _Generation:
        """A generation's state before its first choice: the tenant's marginal as its prior."""
        log_prior = np.log(self.params.prior * self.cross.marginal)  # [L, E]
        p = self.params
        return _Generation(self._shape, p.w_frequency * log_prior, p.near_frequency * log_prior)

    def learn(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        state = self._generations.touch(generation, self._new_generation)
        chosen = list(experts)
        before = state.chosen[layer]
        if before:  # learn the tenant's reuse rates from this computation against the last
            again = sum(1 for e in chosen if e in before)
            decay = self.params.reuse_decay
            reuse, fresh = self._reuse, self._fresh
            reuse[layer] = decay * reuse[layer] + (1.0 - decay) * again / len(before)
            others = self.geometry.num_experts - len(before)
            if others:
                fresh[layer] = decay * fresh[layer] + (1.0 - decay) * (len(chosen) - again) / others
        state.chosen[layer] = chosen
        counts = state.counts[layer]  # [E]
        counts *= self.params.decay
        for e in chosen:
            counts[e] += 1.0
        state.seen[layer] = state.seen[layer] * self.params.decay + 1.0
        self.cross.learn(generation, layer, chosen)  # its own hints are never set: skip `observe`
        self._refresh(state, layer, chosen)

    def _refresh(self, state: _Generation, layer: int, chosen: list[int]) -> None:
        """Recompute the generation's cached log rows of ``layer``, which just chose ``chosen``."""
        p = self.params
        log_f = state.counts[layer] + p.prior * self.cross.marginal[layer]  # [E], > 0: m is floored
        np.log(log_f, out=log_f)
        lift = math.log(max(self._reuse[layer], _FLOOR) / max(self._fresh[layer], _FLOOR))
        far, near = state.far[layer], state.near[layer]
        np.multiply(log_f, p.w_frequency, out=far)
        np.multiply(log_f, p.near_frequency, out=near)
        far_lift, near_lift = p.w_recency * lift, p.near_recency * lift
        for e in chosen:  # the experts whose reuse flag is now set
            far[e] += far_lift
            near[e] += near_lift

    # --- predicting -----------------------------------------------------------------------

    def parts(self, generation: Generation, layer: int, n: int) -> dict[str, np.ndarray]:
        """Each estimate's rows [n, E] for the next ``n`` computations (for measurements)."""
        rows = self.next_rows
        marginal = rows(self.cross.marginal, layer, n)  # [n, E]
        out = {"cross": self.cross.rows(generation, layer, n), "marginal": marginal.copy()}
        fresh = rows(np.array(self._fresh), layer, n)[:, None]  # [n, 1]
        state = self._generations.get(generation)
        if state is None:
            out["frequency"] = marginal.copy()
            out["recency"] = np.broadcast_to(fresh, marginal.shape).copy()
        else:
            prior = self.params.prior
            seen = rows(np.array(state.seen), layer, n)[:, None]  # [n, 1]
            out["frequency"] = (rows(state.counts, layer, n) + prior * marginal) / (seen + prior)
            reuse = rows(np.array(self._reuse), layer, n)[:, None]  # [n, 1]
            last = np.zeros(self._shape, dtype=bool)  # [L, E]
            for target, experts in enumerate(state.chosen):
                last[target, experts] = True
            out["recency"] = np.where(rows(last, layer, n), reuse, fresh)
        return out

    def rows(self, generation: Generation, layer: int, n: int) -> np.ndarray:
        state = self._generations.get(generation)
        logit = self.next_rows(self._far(state), layer, n).copy()  # [n, E]
        if state is not None:
            near = self._near(state, generation, layer, n)
            logit[: len(near)] = near
        return self._scaled(logit, cap=False)  # `predict` caps what it returns; saves a pass

    def outlook(self, generation: Generation, layer: int) -> tuple[np.ndarray, np.ndarray]:
        # One pass: `later` is the far pool of every layer; `estimate` replaces this token's
        # next layers within reach by the near pool, then applies hints.
        state = self._generations.get(generation)
        later = self._scaled(self._far(state).copy())  # [L, E]
        now = later.copy()
        if state is not None:
            near = self._near(state, generation, layer, self.geometry.num_layers)  # [k, E]
            if len(near):
                now[layer + 1 : layer + 1 + len(near)] = self._scaled(near)
        hints = self._hints.get(generation) if self._hints else None
        for target, experts in (hints or {}).items():
            self.hint_row(now[target], experts)
        return now, later

    def estimate(self, generation: Generation, layer: int) -> np.ndarray:
        return self.outlook(generation, layer)[0]

    def _far(self, state: _Generation | None) -> np.ndarray:
        """[L, E] the far pool's log rows (up to a constant per row), in layer order."""
        if state is not None:
            return state.far
        return self.params.w_frequency * np.log(self.params.prior * self.cross.marginal)

    def _near(self, state: _Generation, generation: Generation, layer: int, n: int) -> np.ndarray:
        """[k, E] the near pool's log rows of this token's next k <= n layers with cross evidence."""
        near = self.cross.near(generation, layer, n)  # [k, E], a new array: worked in place
        weight = self.params.w_cross
        if len(near) and weight:
            np.log(near, out=near)
            if weight != 1.0:
                near *= weight
            near += state.near[layer + 1 : layer + 1 + len(near)]
            return near
        return near[:0]

    def _scaled(self, logit: np.ndarray, cap: bool = True) -> np.ndarray:
        """Probabilities from log rows [n, E], in place: each row scaled to top-k choices, capped at 1."""
        # Logits are weighted logs of counts below 1 / (1 - decay) + prior: exp cannot overflow.
        pooled = np.exp(logit, out=logit)
        pooled *= self.cross.widest / pooled.sum(axis=1, keepdims=True)
        return np.minimum(pooled, 1.0, out=pooled) if cap else pooled

    def pool(self, parts: Mapping[str, np.ndarray], near_rows: int) -> np.ndarray:
        """What `rows` computes, from `parts` (the first ``near_rows`` rows are near): for tests."""
        p = self.params
        log = {name: np.log(np.maximum(part, _FLOOR)) for name, part in parts.items()}
        logit = p.w_frequency * log["frequency"] + p.w_recency * log["recency"]
        near = slice(0, near_rows)
        logit[near] = (
            p.near_frequency * log["frequency"][near]
            + p.near_recency * log["recency"][near]
            + p.w_cross * log["cross"][near]
        )
        pooled = np.exp(logit - logit.max(axis=1, keepdims=True))
        pooled *= self.cross.widest / pooled.sum(axis=1, keepdims=True)
        return np.minimum(pooled, 1.0)

    # --- generations and state ---------------------------------------------------------------

    def forget(self, generation: Generation) -> None:
        super().forget(generation)
        self._generations.pop(generation, None)
        self.cross.forget(generation)

    def state(self) -> dict[str, Any]:
        out = {
            **state_header(self.name, self.geometry),
            "cross": self.cross.state(),
            "reuse": pack_array(np.array(self._reuse)),
            "fresh": pack_array(np.array(self._fresh)),
        }
        return out

    def load_state(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name, self.geometry)
        self.cross.load_state(state["cross"])
        layers = self.geometry.num_layers
        self._reuse = unpack_array(state["reuse"], (layers,)).astype(float).tolist()
        self._fresh = unpack_array(state["fresh"], (layers,)).astype(float).tolist()
