"""FIFO: evict the key that became resident first; hits change nothing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence

from expertd.policies.base import NO_PINS, EvictionPolicy, Key, first_unpinned
from expertd.policies.registry import register


@register("fifo")
class FIFO(EvictionPolicy):
    """First in, first out (libCacheSim's FIFO); the order is insertion order."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def on_hit(self, key: Key, t: int) -> None:
        pass

    def on_insert(self, key: Key, t: int) -> None:
        self._order[key] = None

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        return first_unpinned(self._order, pinned, self.name, len(self._order))

    def on_remove(self, key: Key) -> None:
        del self._order[key]

    def replay(self, keys: Sequence[Key], steps: Iterable[tuple[int, int, int]] = ()) -> int:
        # Same semantics as EvictionPolicy.access in one loop (FIFO ignores steps).
        order = self._order
        pop_oldest = order.popitem
        capacity = self.capacity
        hits = 0
        for key in keys.tolist() if hasattr(keys, "tolist") else keys:
            if key in order:
                hits += 1
            else:
                if len(order) >= capacity:
                    pop_oldest(last=False)
                order[key] = None
        return hits
