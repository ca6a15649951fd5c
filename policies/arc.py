"""ARC (Megiddo & Modha, FAST'03): recency list T1, frequency list T2, ghosts B1/B2, target p.

Follows libCacheSim's ``ARC`` (unit-size objects, c = capacity; p a float) and
counts the same hits:

- hit in T1 or T2: move to T2's MRU end.
- request found in B1: p += max(|B2|/|B1|, 1) (at most c); in B2: p -= max(|B1|/|B2|, 1)
  (at least 0); it leaves the ghost, and after the eviction enters T2.
- otherwise it enters T1. Evicting for a request that missed everywhere (case IV):
  if |T1| + |B1| >= c, drop B1's LRU if B1 is non-empty and REPLACE, else evict T1's
  LRU with no ghost; otherwise, if |T1| + |T2| + |B1| + |B2| >= 2c, drop B2's LRU
  and REPLACE.
- REPLACE moves T1's LRU to B1 when T1 is non-empty and |T1| > p (or |T1| = p on a
  B2 hit), or when T2 is empty; else T2's LRU to B2.

Beyond libCacheSim: a pinned key is skipped (the LRU-most unpinned key of the
chosen list, else of the other list); a prefetched key (no `on_miss` before its
insert) enters T1 and leaves any ghost list without adapting p; a removal that is
not of the chosen victim leaves no ghost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from expertd.policies.base import NO_PINS, EvictionPolicy, Key, NoVictimError
from expertd.policies.registry import register

_T1, _T2 = 1, 2


@register("arc")
class ARC(EvictionPolicy):
    """Adaptive replacement cache; each list is an OrderedDict, LRU end first."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        self.p = 0.0
        self._t1: OrderedDict[Key, None] = OrderedDict()
        self._t2: OrderedDict[Key, None] = OrderedDict()
        self._b1: OrderedDict[Key, None] = OrderedDict()
        self._b2: OrderedDict[Key, None] = OrderedDict()
        self._ghost_hit = 0  # 1 or 2: the pending request was found in B1 or B2
        self._ghost_key: Key | None = None
        # The last `victim`: (key, ghost list it goes to or 0, ghost list to trim or 0).
        self._plan: tuple[Key, int, int] | None = None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def list_of(self, key: Key) -> str | None:
        """``"T1"``, ``"T2"``, ``"B1"`` or ``"B2"``: the list holding ``key``; None if none."""
        for name, keys in (("T1", self._t1), ("T2", self._t2), ("B1", self._b1), ("B2", self._b2)):
            if key in keys:
                return name
        return None

    def on_hit(self, key: Key, t: int) -> None:
        if self._t1.pop(key, 0) is None:
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def on_miss(self, key: Key, t: int) -> None:
        b1, b2 = self._b1, self._b2
        self._ghost_hit, self._ghost_key = 0, None
        if key in b1:
            self.p = min(self.p + max(len(b2) / len(b1), 1.0), float(self.capacity))
            del b1[key]
            self._ghost_hit, self._ghost_key = 1, key
        elif key in b2:
            self.p = max(self.p - max(len(b1) / len(b2), 1.0), 0.0)
            del b2[key]
            self._ghost_hit, self._ghost_key = 2, key

    def on_insert(self, key: Key, t: int) -> None:
        if self._ghost_hit and self._ghost_key == key:
            self._t2[key] = None
        else:
            self._b1.pop(key, None)
            self._b2.pop(key, None)
            self._t1[key] = None
        self._ghost_hit, self._ghost_key = 0, None

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        t1, t2, b1, b2, c = self._t1, self._t2, self._b1, self._b2, self.capacity
        trim = 0
        if self._ghost_hit:
            source = self._replace_source()
        elif len(t1) + len(b1) + 1 > c:
            if b1:
                trim, source = 1, self._replace_source()
            else:
                source = 0  # T1's LRU leaves with no ghost
        else:
            if len(t1) + len(t2) + len(b1) + len(b2) >= 2 * c and b2:
                trim = 2
            source = self._replace_source()
        first = t1 if source != _T2 else t2
        key = next((k for k in first if k not in pinned), None)
        if key is None:
            source = _T2 if first is t1 else _T1
            key = next((k for k in (t2 if first is t1 else t1) if k not in pinned), None)
        if key is None:
            raise NoVictimError(f"arc: all {len(self)} resident keys are pinned")
        self._plan = (key, source, trim)
        return key

    def _replace_source(self) -> int:
        n1 = len(self._t1)
        if (n1 > 0 and (n1 > self.p or (n1 == self.p and self._ghost_hit == 2))) or not self._t2:
            return _T1
        return _T2

    def on_remove(self, key: Key) -> None:
        plan, self._plan = self._plan, None
        in_t1 = self._t1.pop(key, 0) is None
        if not in_t1:
            del self._t2[key]
        if plan is None or plan[0] != key:
            return
        _, ghost, trim = plan
        if trim == 1 and self._b1:
            self._b1.popitem(last=False)
        elif trim == 2 and self._b2:
            self._b2.popitem(last=False)
        if ghost:
            (self._b1 if in_t1 else self._b2)[key] = None
