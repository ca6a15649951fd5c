"""The cache manager's transfers: every move of an expert not finished yet, per link.

A transfer is queued (in its link's priority queue: demand before hint before predicted,
then first come first served) or running (it holds a destination slot; at most the link's
depth run at once). This module keeps that book and each link's counters, and decides one
thing itself: whether a prefetch may start within its share of the link (at most `share`
of any `window` consecutive starts). Which transfer to start and into which slot is the
manager's business (daemon/core/manager.py); nothing here touches a tier.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from expertd.daemon.core.events import H2D, LINKS, LOAD, TIER_OF_LINK, Priority, StartTransfer


@dataclasses.dataclass
class Transfer:
    transfer_id: int
    link: str
    key: int
    priority: Priority
    seq: int
    t: int  # access time the policy sees at insert
    prob: float = 1.0  # for a prediction: how likely it is used (a prefetch evicts only less likely keys)
    background: bool = False  # an auto acquire's copy of a host-computed expert: no prefetch share applies
    running: bool = False
    src_slot: int | None = None
    dst_slot: int | None = None

    @property
    def prefetch(self) -> bool:
        return self.priority != Priority.DEMAND


class Transfers:
    """Queued and running transfers of both links, found by id or by (tier, key)."""

    def __init__(
        self,
        depth: dict[str, int],
        max_queued_prefetches: int,
        share: float,
        window: int,
        ids: Iterator[int],
    ) -> None:
        self.depth = depth
        self.max_queued_prefetches = max_queued_prefetches
        self.share, self.window = share, window
        self.by_id: dict[int, Transfer] = {}
        self._of: dict[tuple[str, int], int] = {}  # (tier, key) -> transfer id
        self._queues: dict[str, list[tuple[int, int, int]]] = {LOAD: [], H2D: []}
        self._queued_prefetches = {LOAD: 0, H2D: 0}
        self.running = {LOAD: 0, H2D: 0}
        self.started = {LOAD: 0, H2D: 0}
        self.failed = {LOAD: 0, H2D: 0}
        self.deferred = 0  # prefetch starts put off by the bandwidth share
        self._ids = ids  # shared with the manager's lease ids
        self._seq = itertools.count()
        # Per link: whether each of the last `window` transfers started was a prefetch.
        self._recent = {link: deque([False] * window, maxlen=window) for link in LINKS}
        self._recent_prefetches = {LOAD: 0, H2D: 0}

    def of(self, tier: str, key: int) -> Transfer | None:
        """The transfer bringing ``key`` into ``tier``, queued or running."""
        transfer_id = self._of.get((tier, key))
        return None if transfer_id is None else self.by_id[transfer_id]

    def any_queued(self) -> bool:
        return bool(self._queues[LOAD] or self._queues[H2D])

    def queued(self, link: str) -> int:
        return sum(1 for t in self.by_id.values() if t.link == link and not t.running)

    def queued_demand(self, link: str) -> int:
        """Demand transfers of ``link`` queued and not started: what a new demand copy waits behind."""
        return sum(1 for t in self.by_id.values() if t.link == link and not t.running and not t.prefetch)

    def queue(
        self, link: str, key: int, priority: Priority, t: int, prob: float = 1.0, background: bool = False
    ) -> None:
        """Queue a transfer of ``key`` over ``link``; a prefetch finding the queue full is dropped."""
        if priority != Priority.DEMAND:
            if self._queued_prefetches[link] >= self.max_queued_prefetches:
                return
            self._queued_prefetches[link] += 1
        transfer = Transfer(next(self._ids), link, key, priority, next(self._seq), t, prob, background)
        self.by_id[transfer.transfer_id] = transfer
        self._of[(TIER_OF_LINK[link], key)] = transfer.transfer_id
        heapq.heappush(self._queues[link], (priority, transfer.seq, transfer.transfer_id))

    def reprioritize(self, transfer: Transfer, priority: Priority) -> None:
        """Move a transfer to ``priority``, up or down (a queued one re-enters its queue)."""
        if priority == transfer.priority:
            return
        if not transfer.running:
            is_prefetch = priority != Priority.DEMAND
            if transfer.prefetch != is_prefetch:
                self._queued_prefetches[transfer.link] += 1 if is_prefetch else -1
            transfer.seq = next(self._seq)
            heapq.heappush(self._queues[transfer.link], (priority, transfer.seq, transfer.transfer_id))
        transfer.priority = priority

    def head(self, link: str) -> Transfer | None:
        """The queued transfer of ``link`` to start next, if the link has room for one."""
        if self.running[link] >= self.depth[link]:
            return None
        queue = self._queues[link]
        while queue:
            priority, seq, transfer_id = queue[0]
            transfer = self.by_id.get(transfer_id)
            if transfer is None or transfer.running or (priority, seq) != (transfer.priority, transfer.seq):
                heapq.heappop(queue)  # stale entry: started, moved or gone
                continue
            return transfer
        return None

    def pop_head(self, link: str) -> None:
        heapq.heappop(self._queues[link])

    def has_room(self, link: str) -> bool:
        return self.running[link] < self.depth[link]

    def share_allows(self, link: str) -> bool:
        """May one more prefetch start on ``link`` within its share of any `window` starts?"""
        return self._recent_prefetches[link] - self._recent[link][0] + 1 <= self.share * self.window

    def start(self, transfer: Transfer, src_slot: int | None, dst_slot: int) -> StartTransfer:
        """``transfer`` runs now, from ``src_slot`` (h2d) into ``dst_slot``."""
        link = transfer.link
        if transfer.prefetch:
            self._queued_prefetches[link] -= 1
        recent = self._recent[link]
        self._recent_prefetches[link] += transfer.prefetch - recent[0]
        recent.append(transfer.prefetch)
        transfer.running = True
        transfer.src_slot, transfer.dst_slot = src_slot, dst_slot
        self.running[link] += 1
        self.started[link] += 1
        return StartTransfer(transfer.transfer_id, link, transfer.key, src_slot, dst_slot, transfer.priority)

    def finish(self, transfer_id: int) -> Transfer:
        """A running transfer ended (well or not): it leaves the book."""
        transfer = self.by_id.pop(transfer_id)
        self.running[transfer.link] -= 1
        del self._of[(TIER_OF_LINK[transfer.link], transfer.key)]
        return transfer

    def drop(self, transfer: Transfer) -> None:
        """Forget a transfer that never started (its queue entry goes stale)."""
        assert not transfer.running
        del self.by_id[transfer.transfer_id]
        del self._of[(TIER_OF_LINK[transfer.link], transfer.key)]
        if transfer.prefetch:
            self._queued_prefetches[transfer.link] -= 1
