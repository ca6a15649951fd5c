"""Names -> classes: eviction policies (`@register`) and, through the same `Registry`,
predictors (policies/predict/predictor.py). Built-ins register themselves when their module is
imported, which happens on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from expertd.policies.base import EvictionPolicy, Geometry, PolicyError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by name; ``modules`` of ``package`` hold the built-ins (one per file)."""

    def __init__(self, kind: str, package: str, modules: tuple[str, ...]) -> None:
        self.kind = kind
        self._package, self._modules = package, modules
        self._classes: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make the class constructible by ``name`` (and set its ``name``)."""

        def wrap(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise PolicyError(f"{self.kind} name {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return wrap

    def classes(self) -> dict[str, T]:
        """Every registered class by name (test doubles included once imported)."""
        if not self._loaded:
            for module in self._modules:
                importlib.import_module(f"{self._package}.{module}")
            self._loaded = True
        return self._classes

    def names(self) -> list[str]:
        return sorted(self.classes())

    def get(self, name: str) -> T:
        classes = self.classes()
        try:
            return classes[name]
        except KeyError:
            raise PolicyError(f"unknown {self.kind} {name!r} (known: {', '.join(sorted(classes))})") from None


# Modules whose import registers the built-in policies (one policy per file).
POLICIES: Registry[type[EvictionPolicy]] = Registry(
    "policy",
    "expertd.policies",
    (
        "lru",
        "fifo",
        "lfu",
        "sieve",
        "s3fifo",
        "arc",
        "belady",
        "lru_per_layer",
        "least_stale",
        "layer_distance",
        "predictive",
    ),
)
register = POLICIES.register


def available() -> list[str]:
    """Names of every registered policy, sorted."""
    return POLICIES.names()


def policy_class(name: str) -> type[EvictionPolicy]:
    return POLICIES.get(name)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"s3fifo(small_ratio=0.2)"`` -> ``("s3fifo", {"small_ratio": 0.2})``."""
    spec = spec.strip()
    if "(" not in spec:
        return spec, {}
    if not spec.endswith(")"):
        raise PolicyError(f"bad policy spec {spec!r}: expected name(key=value;...)")
    name, _, body = spec[:-1].partition("(")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(";"))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PolicyError(f"bad policy parameter {item!r} in {spec!r}: expected key=value")
        params[key.strip()] = _parse_value(raw.strip())
    return name.strip(), params


def _parse_value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def make_policy(
    spec: str, capacity: int, geometry: Geometry, params: Mapping[str, Any] | None = None
) -> EvictionPolicy:
    """Build a policy from a name or spec string; ``params`` override the spec's."""
    name, spec_params = parse_spec(spec)
    merged = {**spec_params, **(params or {})}
    return policy_class(name)(capacity, geometry, merged or None)
