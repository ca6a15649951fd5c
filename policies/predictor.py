"""The predictor interface: routing history in, the next layers' experts out (with probabilities).

Predictors are hooks beside eviction, not inside it (libCacheSim's prefetcher: observe,
predict, forget). The cache manager keeps one predictor per tenant, tells it every
acquire (`observe`) and every client gate hint (`hint`), asks it what comes next
(`predict`), and prefetches the likely experts; an eviction policy may read the same
predictions (`EvictionPolicy.on_predictions`). Pure: no I/O, no clock, no threads.

A *request* is one generation (one prompt's tokens); ``request`` is any hashable id the
caller keeps unique. Within a request, calls come in forward order: a token's layers
ascending, then the next token's.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

from expertd.policies.base import Geometry, NoParams, PolicyError, parse_params

Request = Hashable


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
    def observe(self, request: Request, layer: int, experts: Sequence[int]) -> None:
        """``request``'s current token was routed to ``experts`` at ``layer`` (best first)."""

    def hint(self, request: Request, layer: int, experts: Sequence[int], scores: Sequence[float]) -> None:  # noqa: B027
        """The client's own guess for ``layer`` (e.g. that layer's router on this hidden state)."""

    @abstractmethod
    def predict(self, request: Request, layer: int, horizon: int) -> list[Prediction]:
        """After ``layer`` was observed: likely experts of the next ``horizon`` layers, best first."""

    def forget(self, request: Request) -> None:  # noqa: B027
        """``request`` ended: drop what is kept per request (learned statistics stay)."""

    def state(self) -> dict[str, Any]:
        """Learned statistics, msgpack-able, for a warm start (`load_state`)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027
        """Start from statistics `state` returned (by this predictor class, same geometry)."""

    def ahead(self, layer: int, target: int) -> int:
        """Steps from computing ``layer`` to the next computation of ``target``."""
        return (target - layer) % self.geometry.num_layers or self.geometry.num_layers


# --- registry ------------------------------------------------------------------------------------

_PREDICTORS: dict[str, type[Predictor]] = {}
_BUILTIN_MODULES = ("predict_temporal",)


def register_predictor(name: str):
    """Class decorator: make a predictor constructible by ``name``."""

    def wrap(cls: type[Predictor]) -> type[Predictor]:
        if name in _PREDICTORS and _PREDICTORS[name] is not cls:
            raise PolicyError(f"predictor name {name!r} registered twice")
        cls.name = name
        _PREDICTORS[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(f"expertd.policies.{module}")


def available_predictors() -> list[str]:
    _load_builtins()
    return sorted(_PREDICTORS)


def make_predictor(spec: str, geometry: Geometry, params: Mapping[str, Any] | None = None) -> Predictor:
    """A predictor from a name or spec string (``"temporal(decay=0.5)"``)."""
    from expertd.policies.registry import parse_spec

    _load_builtins()
    name, spec_params = parse_spec(spec)
    try:
        cls = _PREDICTORS[name]
    except KeyError:
        raise PolicyError(f"unknown predictor {name!r} (known: {', '.join(sorted(_PREDICTORS))})") from None
    merged = {**spec_params, **(params or {})}
    return cls(geometry, merged or None)
