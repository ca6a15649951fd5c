"""Prefetch planning: per-tenant predictors, what to fetch ahead, and how good the guesses were.

The cache manager calls `Prefetcher.on_acquire` with each acquire's routing; the
prefetcher feeds the acquiring tenant's predictor (tenants never share history: one
predictor each, optionally warm-started from operator-loaded statistics), asks it
about the next ``depth`` layers, and returns a `PrefetchPlan`: the experts worth
fetching (probability at least ``min_prob``, at most ``width`` per layer and ``budget``
in all, soonest first) and the keys whose earlier guesses are now stale (no longer
guessed, or their layer came and chose otherwise), to cancel while still queued.

It also estimates, for every key, the expected number of layer computations until
its next use (`waits`): from each active generation's predictor (the most recent
``ACTIVE_GENERATIONS`` generations of all tenants), ``d + L (1/p - 1)`` with ``p`` the
probability of use at the key's layer's next computation, ``d`` the steps until then;
the soonest over generations wins. A prediction-aware eviction policy reads it (the
manager binds it), and a prefetch never evicts a key expected to be used sooner than
the one it brings (`may_evict`). Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from expertd.policies.base import Geometry
from expertd.policies.predict.predictor import Prediction, Predictor, check_predictor, make_predictor
from expertd.policies.predictive import expected_wait, next_computation

DEFAULT_TENANT = "default"
ACTIVE_GENERATIONS = 8  # generations whose predictions shape `waits` (the most recent, any tenant)
WAIT_FLOOR = 1e-3  # the least probability `waits` believes


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    """How far, how much and how often to prefetch; ``predictor`` None disables prefetching.

    ``share``: the most prefetches may take of a link's transfers, over any ``window``
    consecutive transfers started on it (every expert is the same size, so this is a
    share of the link's busy time); demand transfers are never limited.
    """

    predictor: str | None = None
    depth: int = 2  # layers ahead to prefetch (1: the next layer only)
    min_prob: float = 0.2  # below this a guess is not worth a transfer
    budget: int = 8  # new prefetches per acquire at most
    width: int = 4  # prefetches per layer at most
    share: float = 1.0  # of a link's transfers, at most, over any `window` of them
    window: int = 32
    max_generations: int = 256  # per-generation state kept per tenant (least recent dropped)

    def __post_init__(self) -> None:
        for name in ("depth", "budget", "width", "window", "max_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"prefetch {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"prefetch min_prob must be in [0, 1], got {self.min_prob}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"prefetch share must be in [0, 1], got {self.share}")
        if self.predictor is not None:
            check_predictor(self.predictor)  # a bad name or parameter fails here, not at first use

    @classmethod
    def from_settings(cls, settings: object, **overrides: Any) -> PrefetchConfig:
        """From the ``prefetch_<field>`` attributes of ``settings`` (the daemon's `ServeConfig`,
        `expertd replay`'s arguments), then ``overrides``: the one place either is read. A field
        neither gives keeps its default; predictor ``"none"`` is no prefetching."""
        values = {
            f.name: getattr(settings, f"prefetch_{f.name}")
            for f in dataclasses.fields(cls)
            if hasattr(settings, f"prefetch_{f.name}")
        }
        values.update(overrides)
        if values.get("predictor") == "none":
            values["predictor"] = None
        return cls(**values)


@dataclasses.dataclass
class PrefetchPlan:
    """What one acquire's routing implies: fetch ``wanted`` [(key, prob)], drop the rest."""

    wanted: list[tuple[int, float]]
    stale: set[int]  # keys guessed before whose guess no longer holds: cancel them while queued


_NOTHING = PrefetchPlan([], set())  # shared: callers only read plans


class Prefetcher:
    """One predictor per tenant and the bookkeeping around it; see the module docstring."""

    def __init__(self, config: PrefetchConfig, geometry: Geometry) -> None:
        assert config.predictor is not None, "a Prefetcher needs a predictor"
        self.config = config
        self.geometry = geometry
        self._base_state: Mapping[str, Any] | None = None
        self._predictors: dict[str, Predictor] = {}
        self._generations: dict[str, OrderedDict[Hashable, None]] = {}
        # Per (tenant, generation): layer -> experts guessed (prob >= min_prob) for its next computation.
        self._guessed: dict[tuple[str, Hashable], dict[int, set[int]]] = {}
        self._prob: dict[int, float] = {}  # key -> probability of use soon, as last guessed
        # (tenant, generation) -> the layer it observed last, most recent last; and its waits.
        self._active: OrderedDict[tuple[str, Hashable], int] = OrderedDict()
        self._waits: dict[tuple[str, Hashable], np.ndarray] = {}
        self._merged: np.ndarray | None = None
        self._none = np.full(geometry.num_keys, np.inf)
        self._distance = next_computation(geometry)
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
        make_predictor(self.config.predictor or "", self.geometry).load_state(state)  # check it first
        self._base_state = state
        for predictor in self._predictors.values():
            predictor.load_state(state)

    def state(self, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """The learned statistics of ``tenant``'s predictor, for a later warm start."""
        return self.predictor(tenant).state()

    def on_acquire(
        self, tenant: str, generation: Hashable, layer: int, experts: Sequence[int]
    ) -> PrefetchPlan:
        predictor = self.predictor(tenant)
        self._touch(tenant, generation)
        guessed = self._guessed.setdefault((tenant, generation), {})
        guess = guessed.pop(layer, None)
        stale: set[int] = set()
        self.counters["actual"] += len(experts)
        if guess is not None:  # score the guess made for this very computation
            self.counters["predicted"] += len(guess)
            self.counters["correct"] += len(guess.intersection(experts))
            base = layer * self.geometry.num_experts
            for expert in guess:  # consumed: this computation happened
                self._prob.pop(base + expert, None)
                if expert not in experts:
                    stale.add(base + expert)  # the routing disagreed: a queued fetch is useless
        predictor.observe(generation, layer, experts)
        self._observed(tenant, generation, layer)
        predictions = predictor.predict(generation, layer, self.config.depth, self.config.min_prob)
        return self._plan(layer, guessed, predictions, stale)

    def on_hint(
        self, tenant: str, generation: Hashable, layer: int, experts: Sequence[int], scores: Sequence[float]
    ) -> None:
        self.predictor(tenant).hint(generation, layer, experts, scores)
        if (tenant, generation) in self._waits:
            del self._waits[(tenant, generation)]
            self._merged = None

    def forget(self, tenant: str, generation: Hashable) -> None:
        """A generation ended (or its client left): its per-generation state goes."""
        self._guessed.pop((tenant, generation), None)
        if self._active.pop((tenant, generation), None) is not None:
            self._waits.pop((tenant, generation), None)
            self._merged = None
        generations = self._generations.get(tenant)
        if generations is not None:
            generations.pop(generation, None)
        predictor = self._predictors.get(tenant)
        if predictor is not None:
            predictor.forget(generation)

    def forget_client(self, tenant: str, client: Hashable) -> None:
        """Every generation of a client that left."""
        mine = [g for g in self._generations.get(tenant, ()) if isinstance(g, tuple) and g[0] == client]
        for generation in mine:
            self.forget(tenant, generation)

    @property
    def protected(self) -> Mapping[int, float]:
        """Keys guessed for the coming layers: evictions spare them while they can."""
        return self._prob

    def probability(self, key: int) -> float:
        """How likely ``key`` is used within the prefetch horizon, as last guessed (0: no guess)."""
        return self._prob.get(key, 0.0)

    def waits(self) -> np.ndarray:
        """[num_keys] expected layer computations until each key's next use (inf: none foreseen)."""
        merged = self._merged
        if merged is not None:
            return merged
        layers = self.geometry.num_layers
        for (tenant, generation), layer in self._active.items():
            if (tenant, generation) not in self._waits:
                now, later = self._predictors[tenant].outlook(generation, layer)  # [L, E] each
                self._waits[(tenant, generation)] = expected_wait(
                    now.reshape(-1), later.reshape(-1), self._distance[layer], layers, WAIT_FLOOR
                )
        arrays = list(self._waits.values())
        if not arrays:
            merged = self._none
        elif len(arrays) == 1:
            merged = arrays[0]
        else:
            merged = np.minimum.reduce(arrays)
        self._merged = merged
        return merged

    def may_evict(self) -> Callable[[int, int], bool]:
        """``check(victim, incoming)``: may a prefetch of ``incoming`` evict ``victim``?"""
        waits = self.waits()
        return lambda victim, incoming: bool(waits[victim] > waits[incoming])

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "predictor": self.config.predictor,
            "precision": c["correct"] / c["predicted"] if c["predicted"] else 0.0,
            "recall": c["correct"] / c["actual"] if c["actual"] else 0.0,
            "planned": c["planned"],
            "tenants": len(self._predictors),
        }

    def _observed(self, tenant: str, generation: Hashable, layer: int) -> None:
        """``generation`` observed ``layer``: its waits change, and it is the most recent generation."""
        active = self._active
        key = (tenant, generation)
        active[key] = layer
        active.move_to_end(key)
        self._waits.pop(key, None)
        while len(active) > ACTIVE_GENERATIONS:
            oldest, _ = active.popitem(last=False)
            self._waits.pop(oldest, None)
        self._merged = None

    def _touch(self, tenant: str, generation: Hashable) -> None:
        generations = self._generations.setdefault(tenant, OrderedDict())
        generations[generation] = None
        generations.move_to_end(generation)
        while len(generations) > self.config.max_generations:
            oldest, _ = generations.popitem(last=False)
            self.forget(tenant, oldest)

    def _plan(
        self, layer: int, guessed: dict[int, set[int]], predictions: list[Prediction], stale: set[int]
    ) -> PrefetchPlan:
        if not predictions and not guessed and not stale:
            return _NOTHING  # the common case: no guess then, none now
        num_experts, num_layers = self.geometry.num_experts, self.geometry.num_layers
        config = self.config
        ranked = sorted(predictions, key=lambda p: (p.ahead, -p.prob))
        fresh: dict[int, set[int]] = {}
        for p in ranked:
            experts = fresh.setdefault(p.layer, set())
            if len(experts) < config.width:
                experts.add(p.expert)
        for ahead in range(1, min(config.depth, num_layers) + 1):
            target = (layer + ahead) % num_layers
            before, now = guessed.pop(target, None), fresh.get(target)
            if before:
                stale.update(target * num_experts + e for e in (before - now if now else before))
            if now:
                guessed[target] = now
        for key in stale:
            self._prob.pop(key, None)
        wanted = []
        for p in ranked:
            if len(wanted) >= config.budget:
                break
            if p.expert in fresh[p.layer]:
                key = p.layer * num_experts + p.expert
                self._prob[key] = p.prob
                wanted.append((key, p.prob))
        self.counters["planned"] += len(wanted)
        return PrefetchPlan(wanted, stale)
