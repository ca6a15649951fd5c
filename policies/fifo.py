"""FIFO: evict the key that became resident first; hits change nothing."""

from __future__ import annotations

from expertd.policies.base import QueuePolicy
from expertd.policies.registry import register


@register("fifo")
class FIFO(QueuePolicy):
    """First in, first out (libCacheSim's FIFO); the order is insertion order."""
