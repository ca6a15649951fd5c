"""SIEVE (Zhang et al., NSDI'24): a FIFO queue, a visited bit, and a hand that sifts.

Matches libCacheSim's ``Sieve`` exactly. New keys enter at the head with the bit
clear; a hit sets the bit. To find a victim the hand walks from where it last
stopped (the tail, the oldest key, at first) towards the head, clearing set bits,
and wraps to the tail; the first key with a clear bit is the victim. After the
eviction the hand rests on the victim's newer neighbour.
"""

from __future__ import annotations

from collections.abc import Container

from expertd.policies.base import NO_PINS, FastPath, Key, NoVictimError, TrackedPolicy
from expertd.policies.registry import register

_NONE = -1


@register("sieve")
class Sieve(TrackedPolicy):
    """SIEVE; the queue is a doubly linked list in arrays indexed by key, the bits a set."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        n = geometry.num_keys
        self._newer = [_NONE] * n  # towards the head
        self._older = [_NONE] * n  # towards the tail
        self._visited: set[Key] = set()  # resident keys whose bit is set
        self._head = _NONE  # newest
        self._tail = _NONE  # oldest
        self._hand = _NONE  # _NONE: start from the tail

    def on_hit(self, key: Key, t: int) -> None:
        self._visited.add(key)

    def on_insert(self, key: Key, t: int) -> None:
        self._admit(key)
        self._visited.discard(key)
        self._older[key] = self._head
        self._newer[key] = _NONE
        if self._head != _NONE:
            self._newer[self._head] = key
        else:
            self._tail = key
        self._head = key

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        size = len(self._resident)
        if not size:
            raise NoVictimError("sieve: the cache is empty")
        visited, newer = self._visited, self._newer
        key = self._tail if self._hand == _NONE else self._hand
        # Two full turns clear every bit, so a third one finding nothing means all pinned.
        for _ in range(3 * size):
            if key not in visited and key not in pinned:
                self._hand = key
                return key
            visited.discard(key)
            key = newer[key]
            if key == _NONE:
                key = self._tail
        raise NoVictimError(f"sieve: all {size} resident keys are pinned")

    def on_remove(self, key: Key) -> None:
        self._evict(key)
        older, newer = self._older[key], self._newer[key]
        if key == self._hand:
            self._hand = newer
        if older != _NONE:
            self._newer[older] = newer
        else:
            self._tail = newer
        if newer != _NONE:
            self._older[newer] = older
        else:
            self._head = older

    def fast_path(self) -> FastPath:
        return FastPath(self._resident, touch=self._visited.add)  # touch: on_hit, without a Python frame
