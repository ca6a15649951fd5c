"""S3-FIFO (Yang et al., SOSP'23): a small FIFO, a main FIFO with 2-bit clock, and a ghost FIFO.

Follows libCacheSim's ``S3FIFO`` (its defaults: small queue 10% of capacity, ghost
90%, move-to-main threshold 2) and counts the same hits for every capacity of at
least 20 slots:

- a key enters the small queue with frequency 0; a requested key found in the ghost
  enters the main queue instead. Until the first eviction, keys that find the small
  queue full go straight to main. Every hit adds 1 to the key's frequency.
- to evict, take from main if main holds more than its share or small is empty;
  else from small.
- small: the oldest key moves to main (frequency reset to 0) if its frequency reached
  the threshold, and the next oldest is examined; otherwise it is evicted and its id
  enters the ghost.
- main: the oldest key with frequency f >= 1 goes back to the tail with
  ``min(f, 3) - 1``; the first with frequency 0 is evicted.

Where this differs from libCacheSim:
- below 20 slots libCacheSim cannot serve as a reference: from 10 to 19 it admits
  nothing (a small queue of one object refuses an object as large as itself), below
  10 (libcachesim 0.3.5) it aborts on a 0-byte small queue. Here the small queue
  always has at least 1 slot;
- a pinned key is never the victim: in small it is treated as referenced (moved to
  main), in main it goes back to the tail with its frequency unchanged;
- a prefetched key (no `on_miss` before its insert) that is in the ghost leaves the
  ghost and enters the small queue: a prefetch is a guess, not evidence of reuse.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Container

from expertd.policies.base import NO_PINS, EvictionPolicy, FastPath, Key, NoVictimError
from expertd.policies.registry import register


@dataclasses.dataclass(frozen=True)
class S3FIFOParams:
    """Queue sizes as fractions of capacity, and the small-to-main threshold (libCacheSim's)."""

    small_ratio: float = 0.1
    ghost_ratio: float = 0.9
    move_to_main_threshold: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in [0, 1), got {self.small_ratio!r}")
        if not 0.0 <= self.ghost_ratio <= 16.0:
            raise ValueError(f"ghost_ratio must be in [0, 16], got {self.ghost_ratio!r}")
        if not isinstance(self.move_to_main_threshold, int) or self.move_to_main_threshold < 1:
            raise ValueError(
                f"move_to_main_threshold must be an int >= 1, got {self.move_to_main_threshold!r}"
            )


@register("s3fifo")
class S3FIFO(EvictionPolicy):
    """S3-FIFO with libCacheSim's queue sizes and promotion rules."""

    Params = S3FIFOParams

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        p: S3FIFOParams = self.params
        small = int(capacity * p.small_ratio)  # truncation, as libCacheSim's int64 cast
        self.small_size = max(small, 1) if p.small_ratio > 0 else 0
        self.main_size = capacity - self.small_size
        self.ghost_size = int(capacity * p.ghost_ratio)
        self._threshold = p.move_to_main_threshold
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}
        self._has_evicted = False
        self._ghost_hit: Key | None = None  # requested key just taken out of the ghost
        self._victim: Key | None = None  # the last key `victim` chose from the small queue

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def queue_of(self, key: Key) -> str | None:
        """``"small"``, ``"main"`` or ``"ghost"``: where ``key`` is; None if nowhere."""
        for name, queue in (("small", self._small), ("main", self._main), ("ghost", self._ghost)):
            if key in queue:
                return name
        return None

    def on_hit(self, key: Key, t: int) -> None:
        self._freq[key] += 1

    def on_miss(self, key: Key, t: int) -> None:
        in_ghost = self._ghost.pop(key, 0) is None  # values are None, so None means present
        self._ghost_hit = key if in_ghost else None

    def on_insert(self, key: Key, t: int) -> None:
        if self._ghost_hit == key:
            self._ghost_hit = None
            self._main[key] = None
        else:
            self._ghost.pop(key, None)
            if not self._has_evicted and len(self._small) >= self.small_size:
                self._main[key] = None
            else:
                self._small[key] = None
        self._freq[key] = 0

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        small, main, freq = self._small, self._main, self._freq
        if not freq:
            raise NoVictimError("s3fifo: the cache is empty")
        self._has_evicted = True
        # Each key is moved at most once out of small and 4 times within main before an
        # unpinned one reaches frequency 0, so this bound is only hit when all are pinned.
        budget = 4 * len(freq) + 4
        while budget > 0:
            if len(main) > self.main_size or not small:
                while main and budget > 0:
                    budget -= 1
                    key = next(iter(main))
                    f = freq[key]
                    if f >= 1:
                        main.move_to_end(key)
                        freq[key] = min(f, 3) - 1
                    elif key in pinned:
                        main.move_to_end(key)
                    else:
                        self._victim = None
                        return key
            else:
                while small and budget > 0:
                    budget -= 1
                    key = next(iter(small))
                    if freq[key] >= self._threshold or key in pinned:
                        del small[key]
                        main[key] = None
                        freq[key] = 0
                    else:
                        self._victim = key
                        return key
        raise NoVictimError(f"s3fifo: all {len(freq)} resident keys are pinned")

    def on_remove(self, key: Key) -> None:
        del self._freq[key]
        if self._small.pop(key, 0) is None and key == self._victim:
            self._victim = None
            self._to_ghost(key)
        else:
            self._main.pop(key, None)

    def _to_ghost(self, key: Key) -> None:
        ghost = self._ghost
        if self.ghost_size <= 0 or key in ghost:
            return
        if len(ghost) >= self.ghost_size:
            ghost.popitem(last=False)
        ghost[key] = None

    def fast_path(self) -> FastPath:
        return FastPath(self._freq)
