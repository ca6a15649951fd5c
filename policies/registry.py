"""Policy names -> classes. Policies register themselves with `@register`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from expertd.policies.base import EvictionPolicy, Geometry, PolicyError

_POLICIES: dict[str, type[EvictionPolicy]] = {}

# Modules whose import registers the built-in policies (one policy per file).
_BUILTIN_MODULES = (
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
)


def register(name: str):
    """Class decorator: make a policy constructible by ``name``."""

    def wrap(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise PolicyError(f"policy name {name!r} registered twice")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"expertd.policies.{module}")


def available() -> list[str]:
    """Names of every registered policy, sorted."""
    _load_builtins()
    return sorted(_POLICIES)


def policy_class(name: str) -> type[EvictionPolicy]:
    _load_builtins()
    try:
        return _POLICIES[name]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r} (known: {', '.join(sorted(_POLICIES))})") from None


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
