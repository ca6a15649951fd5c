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
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

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


def first_unpinned(keys: Iterable[Key], pinned: Container[Key], policy: str, size: int) -> Key:
    """The first key of ``keys`` not in ``pinned``; NoVictimError if there is none."""
    for key in keys:
        if key not in pinned:
            return key
    raise NoVictimError(f"{policy}: all {size} resident keys are pinned")


class FastPath(NamedTuple):
    """What `EvictionPolicy.replay` may call instead of a policy's Python hooks.

    Each, when given, must do exactly what the hook it stands for does in a plain replay
    (no pins); a builtin method (a dict's, a set's) then costs no Python frame.
    """

    #: ``key in members`` iff ``key in policy``.
    members: Container[Key]
    #: ``touch(key)`` is ``on_hit(key, t)``, for a policy whose hits ignore the time.
    touch: Callable[[Key], object] | None = None
    #: The policy is this one queue, oldest first: ``on_insert(key, t)`` is
    #: ``queue[key] = t``, and the unpinned victim, removed, is ``queue.popitem(False)``.
    queue: OrderedDict[Key, int] | None = None


def _runs(
    length: int, steps: Iterable[tuple[int, int, int]]
) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
    """Split ``range(length)`` at each step's start: ``(start, stop, (forward, layer) or None)``.

    A step that starts past the last access never begins, as in `access` called key by key.
    """
    start, pending = 0, None
    for t_start, forward, layer in steps:
        if t_start >= length:
            break
        t_start = max(start, t_start)
        if t_start > start or pending is not None:
            yield start, t_start, pending
        start, pending = t_start, (forward, layer)
    yield start, length, pending


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

    Subclasses implement `__len__`, `__contains__`, `on_insert`, `victim` and
    `on_remove`, and `on_hit` unless hits leave the order alone; `access` and `replay`
    (plain single-object cache semantics, as libCacheSim's) come from here, written
    once for every policy.
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

    def on_hit(self, key: Key, t: int) -> None:  # noqa: B027 - optional hook
        """A resident key was accessed (by default the order does not change, as in FIFO)."""

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
        """Run `access` over ``keys`` (t = index) with no pins; return the number of hits.

        ``steps`` lists ``(t_start, forward, layer)`` in increasing ``t_start``: `on_step`
        is called before the access at ``t_start`` (if the policy overrides it).

        This is `access` unrolled once for every policy: the hooks are bound to locals,
        the optional ones skipped when the policy does not override them, the cache size
        counted here, and the steps split the sequence into runs so that the inner loop
        checks none. What `fast_path` makes a builtin call costs no Python frame.
        """
        seq = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        fast, cls = self.fast_path(), type(self)
        members, touch, queue = fast.members, fast.touch, fast.queue
        on_hit = self.on_hit if touch is None and cls.on_hit is not EvictionPolicy.on_hit else None
        on_miss = self.on_miss if cls.on_miss is not EvictionPolicy.on_miss else None
        full = self.needs_eviction if cls.needs_eviction is not EvictionPolicy.needs_eviction else None
        victim, on_remove, on_insert = self.victim, self.on_remove, self.on_insert
        pop_oldest = queue.popitem if queue is not None else None
        stepping = cls.on_step is not EvictionPolicy.on_step
        size, capacity = len(self), self.capacity
        misses = 0
        for start, stop, step in _runs(len(seq), steps if stepping else ()):
            if step is not None:
                self.on_step(*step)
            for t in range(start, stop):
                key = seq[t]
                if key in members:
                    if touch is not None:
                        touch(key)
                    elif on_hit is not None:
                        on_hit(key, t)
                    continue
                misses += 1
                if on_miss is not None:
                    on_miss(key, t)
                if full is not None:
                    if full(key):
                        on_remove(victim(t, NO_PINS, key))
                elif size < capacity:
                    size += 1
                elif pop_oldest is not None:
                    pop_oldest(False)  # the queue's oldest key: victim and on_remove in one
                else:
                    on_remove(victim(t, NO_PINS, key))
                if queue is not None:
                    queue[key] = t
                else:
                    on_insert(key, t)
        return len(seq) - misses

    def fast_path(self) -> FastPath:
        """Builtin stand-ins for this policy's hooks in `replay` (default: none)."""
        return FastPath(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity}, size={len(self)})"


class QueuePolicy(EvictionPolicy):
    """A policy whose order is one queue, oldest first: the victim is the oldest unpinned key.

    On its own it is FIFO (hits change nothing); LRU moves a hit key to the back.
    """

    def __init__(
        self, capacity: int, geometry: Geometry, params: Mapping[str, Any] | Any | None = None
    ) -> None:
        super().__init__(capacity, geometry, params)
        self._order: OrderedDict[Key, int] = OrderedDict()  # key -> when it became resident

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def on_insert(self, key: Key, t: int) -> None:
        self._order[key] = t

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        return first_unpinned(self._order, pinned, self.name, len(self._order))

    def on_remove(self, key: Key) -> None:
        del self._order[key]

    def fast_path(self) -> FastPath:
        return FastPath(self._order, queue=self._order)


class TrackedPolicy(EvictionPolicy):
    """A policy whose order is not one container: the base keeps which keys are resident.

    ``_resident`` (a set: `replay`'s hit test) and ``_layer_size`` (resident keys per
    layer) change only through `_admit` and `_evict`, which the subclass's `on_insert`
    and `on_remove` call.
    """

    def __init__(
        self, capacity: int, geometry: Geometry, params: Mapping[str, Any] | Any | None = None
    ) -> None:
        super().__init__(capacity, geometry, params)
        self._resident: set[Key] = set()
        self._layer_size = [0] * geometry.num_layers

    def __len__(self) -> int:
        return len(self._resident)

    def __contains__(self, key: object) -> bool:
        return key_index(key, self.geometry.num_keys) in self._resident

    def _admit(self, key: Key) -> int:
        """``key`` becomes resident; returns its layer."""
        layer = key // self.geometry.num_experts
        self._resident.add(key)
        self._layer_size[layer] += 1
        return layer

    def _evict(self, key: Key) -> int:
        """``key`` leaves; returns its layer."""
        layer = key // self.geometry.num_experts
        self._resident.remove(key)
        self._layer_size[layer] -= 1
        return layer

    def fast_path(self) -> FastPath:
        return FastPath(self._resident)


class LayeredPolicy(TrackedPolicy):
    """A tracked policy that orders each layer's resident keys by last touch, with a stamp.

    ``_layers[layer]`` maps each resident key of the layer to the stamp of its last
    touch (an access time, a forward pass: the subclass's choice), least recent first.
    """

    def __init__(
        self, capacity: int, geometry: Geometry, params: Mapping[str, Any] | Any | None = None
    ) -> None:
        super().__init__(capacity, geometry, params)
        self._layers: list[OrderedDict[Key, int]] = [OrderedDict() for _ in range(geometry.num_layers)]

    def _admit_at(self, key: Key, stamp: int) -> int:
        """``key`` becomes resident, touched at ``stamp``; returns its layer."""
        layer = self._admit(key)
        self._layers[layer][key] = stamp
        return layer

    def _touch(self, key: Key, stamp: int) -> int | None:
        """A resident ``key`` is touched at ``stamp``: it becomes its layer's most recent.

        Returns the stamp of its previous touch.
        """
        order = self._layers[key // self.geometry.num_experts]
        previous = order.get(key)
        order[key] = stamp
        order.move_to_end(key)
        return previous

    def _evict_stamped(self, key: Key) -> int:
        """``key`` leaves; returns the stamp of its last touch."""
        return self._layers[self._evict(key)].pop(key)
