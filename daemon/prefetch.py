"""Prefetch planning: per-tenant predictors, what to fetch ahead, and how good the guesses were.

The cache manager calls `Prefetcher.on_acquire` with each acquire's routing; the
prefetcher feeds the acquiring tenant's predictor (tenants never share history: one
predictor each, optionally warm-started from operator-loaded statistics), asks it
about the next ``depth`` layers, and returns a `PrefetchPlan`: the experts worth
fetching (probability at least ``min_prob``, at most ``budget``, soonest first) and
the layers whose earlier guesses are now stale. It also answers "how likely is key
k to be used soon?" (`probability`), so a prefetch never evicts a key more likely
to be used than the one it brings. Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from expertd.policies.base import Geometry
from expertd.policies.predictor import Prediction, Predictor, make_predictor

DEFAULT_TENANT = "default"


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    """How far and how much to prefetch; ``predictor`` None disables prefetching."""

    predictor: str | None = None
    depth: int = 2  # layers ahead to prefetch (1: the next layer only)
    min_prob: float = 0.2  # below this a guess is not worth a transfer
    budget: int = 8  # new prefetches per acquire at most
    max_requests: int = 256  # per-request state kept per tenant (least recent dropped)

    def __post_init__(self) -> None:
        if self.depth < 1 or self.budget < 1 or self.max_requests < 1:
            raise ValueError(f"prefetch depth, budget, max_requests must be >= 1: {self}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"prefetch min_prob must be in [0, 1], got {self.min_prob}")


@dataclasses.dataclass
class PrefetchPlan:
    """What one acquire's routing implies: fetch ``wanted`` [(key, prob)], drop the rest."""

    wanted: list[tuple[int, float]]
    stale: set[int]  # keys guessed before that are no longer guessed for the coming layers


class Prefetcher:
    """One predictor per tenant and the bookkeeping around it; see the module docstring."""

    def __init__(self, config: PrefetchConfig, geometry: Geometry) -> None:
        assert config.predictor is not None, "a Prefetcher needs a predictor"
        self.config = config
        self.geometry = geometry
        self._base_state: Mapping[str, Any] | None = None
        self._predictors: dict[str, Predictor] = {}
        self._requests: dict[str, OrderedDict[Hashable, None]] = {}
        # Per (tenant, request): layer -> experts guessed (prob >= min_prob) for its next computation.
        self._guessed: dict[tuple[str, Hashable], dict[int, set[int]]] = {}
        self._prob: dict[int, float] = {}  # key -> probability of use soon, as last guessed
        self.counters = {"predicted": 0, "correct": 0, "actual": 0, "planned": 0}

    def predictor(self, tenant: str) -> Predictor:
        """The tenant's own predictor (made on first use, from the loaded statistics if any)."""
        predictor = self._predictors.get(tenant)
        if predictor is None:
            assert self.config.predictor is not None
            predictor = self._predictors[tenant] = make_predictor(self.config.predictor, self.geometry)
            if self._base_state is not None:
                predictor.load_state(self._base_state)
        return predictor

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Operator statistics every tenant's predictor starts from (tenants made later too)."""
        self._base_state = state
        for predictor in self._predictors.values():
            predictor.load_state(state)

    def on_acquire(self, tenant: str, request: Hashable, layer: int, experts: Sequence[int]) -> PrefetchPlan:
        predictor = self.predictor(tenant)
        self._touch(tenant, request)
        guessed = self._guessed.setdefault((tenant, request), {})
        guess = guessed.pop(layer, None)
        if guess is not None:  # score the guess made for this very computation
            self.counters["predicted"] += len(guess)
            self.counters["correct"] += len(guess.intersection(experts))
            self.counters["actual"] += len(experts)
            base = layer * self.geometry.num_experts
            for expert in guess:  # consumed: this computation happened
                self._prob.pop(base + expert, None)
        predictor.observe(request, layer, experts)
        predictions = predictor.predict(request, layer, self.config.depth)
        return self._plan(guessed, predictions)

    def on_hint(
        self, tenant: str, request: Hashable, layer: int, experts: Sequence[int], scores: Sequence[float]
    ) -> None:
        self.predictor(tenant).hint(request, layer, experts, scores)

    def forget(self, tenant: str, request: Hashable) -> None:
        """A request ended (or its client left): its per-request state goes."""
        self._guessed.pop((tenant, request), None)
        requests = self._requests.get(tenant)
        if requests is not None:
            requests.pop(request, None)
        predictor = self._predictors.get(tenant)
        if predictor is not None:
            predictor.forget(request)

    def forget_client(self, tenant: str, client: Hashable) -> None:
        """Every request of a client that left."""
        for request in [r for r in self._requests.get(tenant, ()) if isinstance(r, tuple) and r[0] == client]:
            self.forget(tenant, request)

    @property
    def protected(self) -> Mapping[int, float]:
        """Keys guessed for the coming layers: evictions spare them while they can."""
        return self._prob

    def probability(self, key: int) -> float:
        """How likely ``key`` is used within the prefetch horizon, as last guessed (0: no guess)."""
        return self._prob.get(key, 0.0)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "predictor": self.config.predictor,
            "precision": c["correct"] / c["predicted"] if c["predicted"] else 0.0,
            "recall": c["correct"] / c["actual"] if c["actual"] else 0.0,
            "planned": c["planned"],
            "tenants": len(self._predictors),
        }

    def _touch(self, tenant: str, request: Hashable) -> None:
        requests = self._requests.setdefault(tenant, OrderedDict())
        requests[request] = None
        requests.move_to_end(request)
        while len(requests) > self.config.max_requests:
            oldest, _ = requests.popitem(last=False)
            self.forget(tenant, oldest)

    def _plan(self, guessed: dict[int, set[int]], predictions: list[Prediction]) -> PrefetchPlan:
        num_experts = self.geometry.num_experts
        stale: set[int] = set()
        fresh: dict[int, set[int]] = {}
        for p in predictions:
            if p.prob >= self.config.min_prob:
                fresh.setdefault(p.layer, set()).add(p.expert)
        for target, experts in fresh.items():
            for expert in guessed.get(target, set()) - experts:
                stale.add(target * num_experts + expert)
            guessed[target] = experts
        for key in stale:
            self._prob.pop(key, None)
        ranked = sorted(
            (p for p in predictions if p.prob >= self.config.min_prob), key=lambda p: (p.ahead, -p.prob)
        )
        wanted = []
        for p in ranked[: self.config.budget]:
            key = p.layer * num_experts + p.expert
            self._prob[key] = p.prob
            wanted.append((key, p.prob))
        self.counters["planned"] += len(wanted)
        return PrefetchPlan(wanted, stale)
