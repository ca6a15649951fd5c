"""LFU: evict the key with the fewest hits since it became resident.

Matches libCacheSim's ``LFU`` exactly: a key enters with frequency 1 (nothing is
remembered after eviction), each hit adds 1, and among keys of the lowest frequency
the one that reached that frequency first is evicted (FIFO within a frequency).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from expertd.policies.base import NO_PINS, EvictionPolicy, FastPath, Key, NoVictimError
from expertd.policies.registry import register


@register("lfu")
class LFU(EvictionPolicy):
    """Least frequently used; ties go to the key that reached the frequency first."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        self._freq: dict[Key, int] = {}
        # frequency -> keys at that frequency, in the order they arrived there
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        self._min = 1  # no non-empty bucket below this frequency

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def frequency(self, key: Key) -> int:
        return self._freq[key]

    def on_hit(self, key: Key, t: int) -> None:
        freq = self._freq[key]
        self._leave(key, freq)
        self._enter(key, freq + 1)

    def on_insert(self, key: Key, t: int) -> None:
        self._enter(key, 1)
        self._min = 1

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        if not self._freq:
            raise NoVictimError("lfu: the cache is empty")
        buckets = self._buckets
        freq = self._min
        while freq not in buckets:
            freq += 1
        self._min = freq
        if not pinned:
            return next(iter(buckets[freq]))
        for freq in sorted(buckets):
            for key in buckets[freq]:
                if key not in pinned:
                    return key
        raise NoVictimError(f"lfu: all {len(self._freq)} resident keys are pinned")

    def on_remove(self, key: Key) -> None:
        self._leave(key, self._freq.pop(key))

    def _enter(self, key: Key, freq: int) -> None:
        self._freq[key] = freq
        bucket = self._buckets.get(freq)
        if bucket is None:
            bucket = self._buckets[freq] = OrderedDict()
        bucket[key] = None

    def _leave(self, key: Key, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]

    def fast_path(self) -> FastPath:
        return FastPath(self._freq)
