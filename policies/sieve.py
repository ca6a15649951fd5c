"""SIEVE (Zhang et al., NSDI'24): a FIFO queue, a visited bit, and a hand that sifts.

Matches libCacheSim's ``Sieve`` exactly. New keys enter at the head with the bit
clear; a hit sets the bit. To find a victim the hand walks from where it last
stopped (the tail, the oldest key, at first) towards the head, clearing set bits,
and wraps to the tail; the first key with a clear bit is the victim. After the
eviction the hand rests on the victim's newer neighbour.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence

from expertd.policies.base import NO_PINS, EvictionPolicy, Key, NoVictimError, in_table
from expertd.policies.registry import register

_NONE = -1


@register("sieve")
class Sieve(EvictionPolicy):
    """SIEVE; the queue is a doubly linked list in arrays indexed by key."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        n = geometry.num_keys
        self._newer = [_NONE] * n  # towards the head
        self._older = [_NONE] * n  # towards the tail
        self._visited = [False] * n
        self._resident = [False] * n
        self._head = _NONE  # newest
        self._tail = _NONE  # oldest
        self._hand = _NONE  # _NONE: start from the tail
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        return in_table(key, self._resident)

    def on_hit(self, key: Key, t: int) -> None:
        self._visited[key] = True

    def on_insert(self, key: Key, t: int) -> None:
        self._resident[key] = True
        self._visited[key] = False
        self._older[key] = self._head
        self._newer[key] = _NONE
        if self._head != _NONE:
            self._newer[self._head] = key
        else:
            self._tail = key
        self._head = key
        self._size += 1

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        if not self._size:
            raise NoVictimError("sieve: the cache is empty")
        visited, newer = self._visited, self._newer
        key = self._tail if self._hand == _NONE else self._hand
        # Two full turns clear every bit, so a third one finding nothing means all pinned.
        for _ in range(3 * self._size):
            if not visited[key] and key not in pinned:
                self._hand = key
                return key
            visited[key] = False
            key = newer[key]
            if key == _NONE:
                key = self._tail
        raise NoVictimError(f"sieve: all {self._size} resident keys are pinned")

    def on_remove(self, key: Key) -> None:
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
        self._resident[key] = False
        self._size -= 1

    def replay(self, keys: Sequence[Key], steps: Iterable[tuple[int, int, int]] = ()) -> int:
        # Same semantics as EvictionPolicy.access in one loop (SIEVE ignores steps).
        visited, resident = self._visited, self._resident
        newer, older = self._newer, self._older
        head, tail, hand, size = self._head, self._tail, self._hand, self._size
        capacity = self.capacity
        hits = 0
        for key in keys.tolist() if hasattr(keys, "tolist") else keys:
            if resident[key]:
                visited[key] = True
                hits += 1
                continue
            if size >= capacity:
                victim = tail if hand == _NONE else hand
                while visited[victim]:
                    visited[victim] = False
                    victim = newer[victim]
                    if victim == _NONE:
                        victim = tail
                before, after = older[victim], newer[victim]
                hand = after
                if before != _NONE:
                    newer[before] = after
                else:
                    tail = after
                if after != _NONE:
                    older[after] = before
                else:
                    head = before
                resident[victim] = False
                size -= 1
            resident[key] = True
            visited[key] = False
            older[key] = head
            newer[key] = _NONE
            if head != _NONE:
                newer[head] = key
            else:
                tail = key
            head = key
            size += 1
        self._head, self._tail, self._hand, self._size = head, tail, hand, size
        return hits
