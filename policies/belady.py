"""Belady's MIN (offline): evict the resident key whose next use is furthest in the future.

The bound every online policy is measured against. Like libCacheSim's ``Belady`` it
always admits the requested key (no bypass: an expert must be resident to run), so
the two count the same hits. Keys never used again go first (the one with the
largest key among them). `prepare` takes the whole access sequence; the next use
of the key at ``t`` is precomputed, and for prefetch inserts or hits reported at
other times it is found by bisection in the key's list of positions.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable, Sequence

import numpy as np

from expertd.policies.base import NO_PINS, EvictionPolicy, FastPath, Key, NoVictimError, PolicyError
from expertd.policies.registry import register


@register("belady")
class Belady(EvictionPolicy):
    """MIN; a max-heap of (next use, key), encoded as one int, with lazy deletion."""

    offline = True

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        self._nk = geometry.num_keys
        self._keys: list[Key] | None = None
        self._next: list[int] | None = None  # next position of the key at t, or `_never`
        self._positions: dict[Key, np.ndarray] = {}
        self._never = 0
        self._entry: dict[Key, int] = {}  # resident key -> next_use * num_keys + key
        self._heap: list[int] = []  # negated entries; stale ones are skipped

    def __len__(self) -> int:
        return len(self._entry)

    def __contains__(self, key: object) -> bool:
        return key in self._entry

    def prepare(self, future: Sequence[Key]) -> None:
        keys = np.asarray(future, dtype=np.int64)
        n = len(keys)
        if n and (keys.min() < 0 or keys.max() >= self._nk):
            bad = keys[(keys < 0) | (keys >= self._nk)][0]
            raise PolicyError(f"belady: key {bad} out of range [0, {self._nk})")
        order = np.argsort(keys, kind="stable")  # positions grouped by key, ascending
        grouped = keys[order]
        same = grouped[1:] == grouped[:-1]  # [n-1]: order[i] and order[i+1] share a key
        nxt = np.full(n, n, dtype=np.int64)
        nxt[order[:-1][same]] = order[1:][same]
        bounds = np.flatnonzero(~same) + 1
        firsts = grouped[np.concatenate(([0], bounds))] if n else grouped
        self._positions = dict(zip(firsts.tolist(), np.split(order, bounds), strict=True))
        self._keys, self._next, self._never = keys.tolist(), nxt.tolist(), n

    def next_use(self, key: Key, t: int) -> int:
        """The first position after ``t`` where ``key`` is used (len(future) if none)."""
        keys, nxt = self._require_future()
        if t < len(keys) and keys[t] == key:
            return nxt[t]
        positions = self._positions.get(key)
        if positions is None:
            return self._never
        i = int(np.searchsorted(positions, t, side="right"))
        return int(positions[i]) if i < len(positions) else self._never

    def _require_future(self) -> tuple[list[Key], list[int]]:
        if self._keys is None or self._next is None:
            raise PolicyError("belady: offline policy needs prepare(future) before use")
        return self._keys, self._next

    def _set(self, key: Key, next_use: int) -> None:
        entry = next_use * self._nk + key
        self._entry[key] = entry
        heapq.heappush(self._heap, -entry)
        if len(self._heap) > 4 * len(self._entry) + 1024:
            self._heap = [-e for e in self._entry.values()]
            heapq.heapify(self._heap)

    def on_hit(self, key: Key, t: int) -> None:
        self._set(key, self.next_use(key, t))

    def on_insert(self, key: Key, t: int) -> None:
        self._set(key, self.next_use(key, t))

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        self._require_future()
        heap, entries, nk = self._heap, self._entry, self._nk
        aside: list[int] = []
        try:
            while heap:
                entry = -heap[0]
                key = entry % nk
                if entries.get(key) != entry:
                    heapq.heappop(heap)  # stale: the key was touched again or removed
                elif entry // nk < t:
                    # Its recorded use passed without a hit reported: look again from t.
                    heapq.heappop(heap)
                    self._set(key, self.next_use(key, t - 1))
                elif key in pinned:
                    aside.append(heapq.heappop(heap))
                else:
                    return key
        finally:
            for entry in aside:
                heapq.heappush(heap, entry)
        raise NoVictimError(f"belady: all {len(entries)} resident keys are pinned")

    def on_remove(self, key: Key) -> None:
        del self._entry[key]

    def replay(self, keys: Sequence[Key], steps: Iterable[tuple[int, int, int]] = ()) -> int:
        if self._keys is None:
            self.prepare(keys)
        prepared = len(self._require_future()[0])
        if len(keys) != prepared:
            raise PolicyError(f"belady: replay of {len(keys)} accesses, but prepared with {prepared}")
        return super().replay(keys, steps)

    def fast_path(self) -> FastPath:
        return FastPath(self._entry)
