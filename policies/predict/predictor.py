"""The predictor interface: routing history in, the next layers' experts out (with probabilities).

Predictors are hooks beside eviction, not inside it (libCacheSim's prefetcher: observe,
predict, forget). The cache manager keeps one predictor per tenant, tells it every
acquire (`observe`) and every client gate hint (`hint`), asks it what comes next
(`predict`), and prefetches the likely experts; a prediction-aware eviction policy
reads `outlook` (every expert of every layer) through the manager's estimator hook
(`EvictionPolicy.bind_estimator`); `state` and `load_state` carry learned statistics to
a warm start. Pure: no I/O, no clock, no threads.

A *generation* is one generation (one prompt's tokens); ``generation`` is any hashable id the
caller keeps unique. Within a generation, calls come in forward order: a token's layers
ascending, then the next token's. "The next computation of layer j after layer l" is
the same token's if ``j > l``, else the next token's.

Most predictors derive from `ProbabilityPredictor`: they give every expert of a layer a
probability (`rows`), and the base turns that into predictions, estimates and hint
handling. Legend for shape comments: L layers, E experts per layer, R rows asked for.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from expertd.policies.base import Geometry, NoParams, PolicyError, parse_params
from expertd.policies.registry import Registry, parse_spec

Generation = Hashable
S = TypeVar("S")


class RecentGenerations(OrderedDict[Generation, S], Generic[S]):
    """Per-generation state of at most ``limit`` generations, the least recently used dropped first.

    Predictors keep state per generation and never hear of most generations' end, so it is bounded.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, generation: Generation, make: Callable[[], S]) -> S:
        """``generation``'s state (made by ``make`` if it has none), now the most recent."""
        state = self.get(generation)
        if state is None:
            state = self[generation] = make()
            while len(self) > self.limit:
                self.popitem(last=False)
        else:
            self.move_to_end(generation)
        return state


@dataclasses.dataclass(frozen=True, slots=True)
class Prediction:
    """Expert ``expert`` of ``layer`` is used with probability ``prob`` in ``ahead`` steps.

    ``ahead`` counts layer computations from now: 1 is the next layer of this token;
    a layer at or below the current one belongs to the next token.
    """

    layer: int
    expert: int
    prob: float
    ahead: int


class Predictor(ABC):
    """Guesses which experts the next layers will route to; see the module docstring."""

    name: ClassVar[str] = "?"
    Params: ClassVar[type] = NoParams

    def __init__(self, geometry: Geometry, params: Mapping[str, Any] | Any | None = None) -> None:
        self.geometry = geometry
        self.params = parse_params(self.Params, params, self.name)

    @abstractmethod
    def observe(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        """``generation``'s current token was routed to ``experts`` at ``layer`` (best first)."""

    def hint(  # noqa: B027
        self, generation: Generation, layer: int, experts: Sequence[int], scores: Sequence[float]
    ) -> None:
        """The client's own guess for ``layer``'s next computation (e.g. that layer's router now)."""

    @abstractmethod
    def predict(
        self, generation: Generation, layer: int, horizon: int, min_prob: float = 0.0
    ) -> list[Prediction]:
        """After ``layer`` was observed: likely experts of the next ``horizon`` layers, best first,
        each at least ``min_prob`` likely."""

    def outlook(self, generation: Generation, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """``(now, later)``, [L, E] each: the probability that each expert is chosen at its
        layer's next computation (``now``), and at each computation after that (``later``:
        what the generation's history says, without the evidence that bears on the next
        computation only, such as the current token's cross-layer routing and hints).

        Default: ``now`` from `predict`, and ``later`` the same.
        """
        now = np.zeros((self.geometry.num_layers, self.geometry.num_experts), dtype=np.float64)
        for p in self.predict(generation, layer, self.geometry.num_layers):
            now[p.layer, p.expert] = max(now[p.layer, p.expert], p.prob)
        return now, now

    def forget(self, generation: Generation) -> None:  # noqa: B027
        """``generation`` ended: drop what is kept per generation (learned statistics stay)."""

    def state(self) -> dict[str, Any]:
        """Learned statistics, msgpack-able, for a warm start (`load_state`)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027
        """Start from statistics `state` returned (by this predictor class, same geometry)."""


@dataclasses.dataclass(frozen=True)
class RowParams:
    """``width``: candidates per layer in `predict`; ``hint_prob``: floor of a hinted expert."""

    width: int = 4
    hint_prob: float = 0.9

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width!r}")
        if not 0.5 < self.hint_prob <= 1.0:
            raise ValueError(f"hint_prob must be in (0.5, 1], got {self.hint_prob!r}")


class ProbabilityPredictor(Predictor):
    """A predictor that gives every expert of a layer a probability; hints rank above it.

    Subclasses implement `learn` (what `observe` learns) and `rows` (probabilities for
    the next computations); `predict`, `outlook` and hints come from here.
    A hint for layer j holds until j is next observed: its experts get at least
    ``hint_prob`` and every other expert of j at most ``1 - hint_prob``, so hints always
    rank above history.
    """

    Params: ClassVar[type] = RowParams
    #: Hinted generations whose hints are kept at most (least recent dropped).
    MAX_HINTED_REQUESTS: ClassVar[int] = 1024

    def __init__(self, geometry: Geometry, params: Mapping[str, Any] | Any | None = None) -> None:
        super().__init__(geometry, params)
        # generation -> layer -> hinted experts, for the layer's next computation.
        self._hints: RecentGenerations[dict[int, list[int]]] = RecentGenerations(self.MAX_HINTED_REQUESTS)
        num_layers = geometry.num_layers
        # _order[l]: the layers computed 1, 2, ..., L steps after layer l.
        self._order = [
            np.array([(l + a) % num_layers for a in range(1, num_layers + 1)]) for l in range(num_layers)
        ]

    @abstractmethod
    def learn(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        """What `observe` learns from one routing decision."""

    @abstractmethod
    def rows(self, generation: Generation, layer: int, n: int) -> np.ndarray:
        """[n, E] P(chosen) at each of the next ``n`` layer computations after ``layer``.

        Row ``i`` is layer ``(layer + 1 + i) % L``; hints are not applied. Writable, owned
        by the caller.
        """

    def next_rows(self, array: np.ndarray, layer: int, n: int) -> np.ndarray:
        """``array``'s rows (one per layer) for the next ``n`` computations after ``layer``."""
        first = layer + 1
        if first + n <= self.geometry.num_layers:
            return array[first : first + n]  # a view: most calls, and the cheapest
        return array[self._order[layer][:n]]

    def observe(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        if self._hints:
            hints = self._hints.get(generation)
            if hints is not None:
                hints.pop(layer, None)  # that computation happened: the hint is spent
                if not hints:
                    del self._hints[generation]
        self.learn(generation, layer, experts)

    def hint(
        self, generation: Generation, layer: int, experts: Sequence[int], scores: Sequence[float]
    ) -> None:
        num_experts = self.geometry.num_experts
        valid = [e for e in experts if 0 <= e < num_experts]
        if not 0 <= layer < self.geometry.num_layers or not valid:
            return
        self._hints.touch(generation, dict)[layer] = valid

    def hinted(self, generation: Generation, layer: int, probs: np.ndarray) -> np.ndarray:
        """``probs`` [n, E] (the next n computations after ``layer``) with hints applied, in place."""
        hints = self._hints.get(generation) if self._hints else None
        if hints:
            num_layers = self.geometry.num_layers
            for target, experts in hints.items():
                row = (target - layer - 1) % num_layers
                if row < len(probs):
                    self.hint_row(probs[row], experts)
        return probs

    def hint_row(self, row: np.ndarray, experts: list[int]) -> None:
        """One layer's probabilities [E], in place, with ``experts`` hinted: at least ``hint_prob``."""
        floor = self.params.hint_prob
        hinted = row[experts]
        row *= 1.0 - floor
        row[experts] = floor + (1.0 - floor) * hinted

    def predict(
        self, generation: Generation, layer: int, horizon: int, min_prob: float = 0.0
    ) -> list[Prediction]:
        """Each coming layer's ``width`` likeliest experts above 0 and at least ``min_prob``."""
        n = min(horizon, self.geometry.num_layers)
        probs = self.hinted(generation, layer, self.rows(generation, layer, n))  # [n, E]
        width = self.params.width
        if min_prob > 0.0:
            if probs.max() < min_prob:
                return []  # the common case, answered at once
            mask = probs >= min_prob
        else:
            mask = probs > 0.0
            if width < probs.shape[1]:  # each row's `width` likeliest (ties trimmed below)
                mask &= probs >= -np.partition(-probs, width - 1, axis=1)[:, width - 1 : width]
        rows, experts = np.nonzero(mask)
        if not len(rows):
            return []
        values = probs[rows, experts]
        order = self._order[layer]
        picked: dict[int, int] = {}
        out: list[Prediction] = []
        for i in np.lexsort((-values, rows)).tolist():  # by row (steps ahead), then likeliest first
            row = int(rows[i])
            if picked.get(row, 0) < width:
                picked[row] = picked.get(row, 0) + 1
                out.append(Prediction(int(order[row]), int(experts[i]), min(float(values[i]), 1.0), row + 1))
        return out

    def outlook(self, generation: Generation, layer: int) -> tuple[np.ndarray, np.ndarray]:
        now = self.estimate(generation, layer)
        return now, now

    def estimate(self, generation: Generation, layer: int) -> np.ndarray:
        """``now`` of `outlook`: [L, E] P(chosen at the layer's next computation), hints applied."""
        num_layers = self.geometry.num_layers
        rows = self.rows(generation, layer, num_layers)
        probs = self.hinted(generation, layer, rows)  # [L, E], by steps ahead
        out = np.empty_like(probs)
        out[self._order[layer]] = probs
        return np.clip(out, 0.0, 1.0, out=out)

    def forget(self, generation: Generation) -> None:
        self._hints.pop(generation, None)


# --- msgpack-able numpy arrays (warm-start state: never pickle) ------------------------------


def pack_array(array: np.ndarray) -> dict[str, Any]:
    """``array`` as a msgpack-able map: raw bytes, shape and dtype."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def unpack_array(packed: Mapping[str, Any], shape: Sequence[int] | None = None) -> np.ndarray:
    """The array `pack_array` packed (a writable copy); ``shape`` checks what the caller expects."""
    try:
        dtype = np.dtype(packed["dtype"])
        got = tuple(int(n) for n in packed["shape"])
        data = packed["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyError(f"bad array in predictor state: {exc}") from None
    if dtype.kind not in "fiub" or dtype.hasobject:
        raise PolicyError(f"bad array in predictor state: dtype {dtype} is not numeric")
    if shape is not None and got != tuple(shape):
        raise PolicyError(f"predictor state array has shape {list(got)}, expected {list(shape)}")
    if len(data) != dtype.itemsize * int(np.prod(got, dtype=np.int64)):
        raise PolicyError(f"predictor state array of shape {list(got)} has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(got).copy()


def check_state(state: Mapping[str, Any], name: str, geometry: Geometry) -> None:
    """Raise PolicyError unless ``state`` was saved by predictor ``name`` for ``geometry``."""
    if not isinstance(state, Mapping):
        raise PolicyError(f"{name}: predictor state must be a map, got {type(state).__name__}")
    saved = state.get("predictor")
    if saved != name:
        raise PolicyError(f"{name}: the state was saved by predictor {saved!r}")
    shape = [geometry.num_layers, geometry.num_experts]
    if list(state.get("geometry", [])) != shape:
        raise PolicyError(
            f"{name}: the state is for {state.get('geometry')} (layers, experts), this model is {shape}"
        )


def state_header(name: str, geometry: Geometry) -> dict[str, Any]:
    """What every saved state starts with: the predictor's name and the geometry."""
    return {"predictor": name, "geometry": [geometry.num_layers, geometry.num_experts]}


# --- registry ------------------------------------------------------------------------------------

PREDICTORS: Registry[type[Predictor]] = Registry(
    "predictor",
    "expertd.policies.predict",
    ("temporal", "cross_layer", "activation", "hints", "combined"),
)
register_predictor = PREDICTORS.register


def available_predictors() -> list[str]:
    """Names of every registered predictor, sorted (test doubles included once imported)."""
    return PREDICTORS.names()


def builtin_predictors() -> list[str]:
    """Names of the predictors expertd ships, sorted."""
    classes = PREDICTORS.classes()
    return sorted(n for n, cls in classes.items() if cls.__module__.startswith("expertd.policies."))


def check_predictor(spec: str) -> None:
    """`PolicyError` unless ``spec`` names a predictor with valid parameters (builds none:
    a predictor's tables can be large)."""
    name, params = parse_spec(spec)
    parse_params(PREDICTORS.get(name).Params, params or None, name)


def make_predictor(spec: str, geometry: Geometry, params: Mapping[str, Any] | None = None) -> Predictor:
    """A predictor from a name or spec string (``"temporal(decay=0.5)"``)."""
    name, spec_params = parse_spec(spec)
    merged = {**spec_params, **(params or {})}
    return PREDICTORS.get(name)(geometry, merged or None)
