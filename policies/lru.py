"""LRU: evict the least recently used key."""

from __future__ import annotations

from expertd.policies.base import FastPath, Key, QueuePolicy
from expertd.policies.registry import register


@register("lru")
class LRU(QueuePolicy):
    """Least recently used: a hit moves the key to the back of the queue."""

    def on_hit(self, key: Key, t: int) -> None:
        self._order.move_to_end(key)

    def fast_path(self) -> FastPath:
        return super().fast_path()._replace(touch=self._order.move_to_end)  # on_hit, frameless
