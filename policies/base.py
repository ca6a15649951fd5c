"""The eviction-policy interface shared by the live cache and the simulator.

A policy keeps an *order* over the keys resident in one tier; it never decides
residency on its own. The caller (the cache manager, or `access` for plain
hit-rate replay) tells it about hits, inserts and removals, and asks it for a
victim among the keys that are not pinned.

Keys are ints: ``layer * num_experts + expert`` (see `Geometry`). Time ``t`` is
the index of the current access in the trace's flattened access sequence (a
virtual clock: policies need no wall clock). ``on_step(forward, layer)`` marks the
start of a forward step: ``forward`` counts forward passes (tokens) across the
whole run, ``layer`` is the MoE layer about to be computed.

One demand access, as `access` drives it (the cache manager does the same)::

    hit:  on_hit(key, t)
    miss: on_miss(key, t); if needs_eviction(key): on_remove(victim(t, pinned, key));
          on_insert(key, t)

A prefetch is an ``on_insert`` with no ``on_miss`` before it. ``on_miss`` lets a
policy with ghost entries (S3-FIFO, ARC) learn of the request before it picks a
victim, as libCacheSim's ``find`` does; ``incoming`` lets a policy with per-layer
quotas evict from the incoming key's layer.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

Key = int

#: The empty pin set; plain hit-rate replay pins nothing.
NO_PINS: frozenset[int] = frozenset()


class PolicyError(ValueError):
    """A policy name or parameter is wrong, or a policy was misused."""


class NoVictimError(RuntimeError):
    """Every resident key is pinned: nothing can be evicted."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shape of the keyspace: how many MoE layers, how many experts per layer."""

    num_layers: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1:
            raise PolicyError(
                f"geometry needs at least one layer and one expert, got "
                f"{self.num_layers} layers x {self.num_experts} experts"
            )

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.num_experts

    def key(self, layer: int, expert: int) -> Key:
        return layer * self.num_experts + expert

    def layer_of(self, key: Key) -> int:
        return key // self.num_experts

    def expert_of(self, key: Key) -> int:
        return key % self.num_experts


def key_index(key: object, num_keys: int) -> int:
    """``key`` as an int (ints and numpy ints alike), or -1 if it is no key in [0, num_keys)."""
    index = getattr(key, "__index__", None)
    if index is None:
        return -1
    value = index()
    return value if 0 <= value < num_keys else -1


def in_table(key: object, table: list[bool]) -> bool:
    """``table[key]`` for a key in range; False for anything else."""
    index = key_index(key, len(table))
    return index >= 0 and table[index]


def first_unpinned(keys: Iterable[Key], pinned: Container[Key], policy: str, size: int) -> Key:
    """The first key of ``keys`` not in ``pinned``; NoVictimError if there is none."""
    for key in keys:
        if key not in pinned:
            return key
    raise NoVictimError(f"{policy}: all {size} resident keys are pinned")


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A policy without parameters."""


def parse_params(params_cls: type, params: Mapping[str, Any] | Any | None, policy: str) -> Any:
    """Build a policy's parameter dataclass from a mapping, rejecting unknown keys."""
    if params is None:
        return params_cls()
    if isinstance(params, params_cls):
        return params
    if not isinstance(params, Mapping):
        raise PolicyError(f"{policy}: parameters must be a mapping, got {type(params).__name__}")
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise PolicyError(f"{policy}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
    try:
        return params_cls(**params)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{policy}: {exc}") from None


class EvictionPolicy(ABC):
    """Orders the keys resident in one tier of `capacity` slots.

    Subclasses implement `__len__`, `__contains__`, `on_hit`, `on_insert`,
    `victim` and `on_remove`; `access` and `replay` (plain single-object cache
    semantics, as libCacheSim's) come from here.
    """

    name: ClassVar[str] = "?"
    Params: ClassVar[type] = NoParams
    #: An offline policy needs the future access sequence (`prepare`) before use.
    offline: ClassVar[bool] = False
    #: The policy orders keys by predicted next use: the cache manager binds its estimator.
    wants_estimates: ClassVar[bool] = False

    def __init__(
        self, capacity: int, geometry: Geometry, params: Mapping[str, Any] | Any | None = None
    ) -> None:
        if capacity < 1:
            raise PolicyError(f"{self.name}: capacity must be at least 1 slot, got {capacity}")
        self.capacity = capacity
        self.geometry = geometry
        self.params = parse_params(self.Params, params, self.name)

    # --- what the cache tells the policy -------------------------------------------------

    def bind_estimator(self, estimator: Callable[[], np.ndarray] | None) -> None:  # noqa: B027
        """Read predicted next uses from ``estimator`` (for policies that set `wants_estimates`).

        ``estimator()`` returns, for every key, the expected number of layer computations
        until it is used next (``inf``: no use foreseen), as the routing predictors of the
        tenants' active requests see it now. The cache manager binds its prefetcher's.
        """

    def prepare(self, future: Sequence[Key]) -> None:  # noqa: B027 - optional hook
        """Give an offline policy the whole access sequence (key at each ``t``)."""

    def on_step(self, forward: int, layer: int) -> None:  # noqa: B027 - optional hook
        """A forward step begins: pass ``forward`` is about to compute ``layer``."""

    def on_miss(self, key: Key, t: int) -> None:  # noqa: B027 - optional hook
        """A demand request for a key that is not resident (before any eviction for it)."""

    def needs_eviction(self, incoming: Key) -> bool:
        """Whether inserting ``incoming`` needs a victim first (the tier, or its share, is full)."""
        return len(self) >= self.capacity

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def on_hit(self, key: Key, t: int) -> None:
        """A resident key was accessed."""

    @abstractmethod
    def on_insert(self, key: Key, t: int) -> None:
        """A key became resident (after a miss, or by prefetch)."""

    @abstractmethod
    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        """The resident key to evict next, never one in ``pinned``; does not remove it.

        ``incoming`` is the key the slot is for, when known. A policy may reorder its
        internal queues while looking (SIEVE's hand, S3-FIFO's promotions) but never
        changes residency; raises NoVictimError when every resident key is pinned.
        """

    @abstractmethod
    def on_remove(self, key: Key) -> None:
        """A resident key left the tier (evicted, or invalidated)."""

    # --- plain cache semantics for hit-rate replay ----------------------------------------

    def access(self, key: Key, t: int) -> bool:
        """One request to a single-object cache: True on a hit; on a miss evict if full."""
        if key in self:
            self.on_hit(key, t)
            return True
        self.on_miss(key, t)
        if self.needs_eviction(key):
            self.on_remove(self.victim(t, NO_PINS, key))
        self.on_insert(key, t)
        return False

    def replay(self, keys: Sequence[Key], steps: Iterable[tuple[int, int, int]] = ()) -> int:
        """Run `access` over ``keys`` (t = index); return the number of hits.

        ``steps`` lists ``(t_start, forward, layer)`` in increasing ``t_start``:
        `on_step` is called before the access at ``t_start``. Subclasses may
        override with a faster loop that must count exactly the same hits.
        """
        hits = 0
        step_iter = iter(steps)
        next_step = next(step_iter, None)
        access = self.access
        for t, key in enumerate(keys.tolist() if hasattr(keys, "tolist") else keys):
            while next_step is not None and next_step[0] <= t:
                self.on_step(next_step[1], next_step[2])
                next_step = next(step_iter, None)
            if access(key, t):
                hits += 1
        return hits

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity}, size={len(self)})"
