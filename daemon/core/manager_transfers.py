"""The cache manager's transfer scheduling: which transfer starts when, into which slot.

Part of `CacheManager` (a base class of it, split off for size): it reads and changes the
manager's tiers, transfer queues and waiters, and never starts anything itself: each
`StartTransfer` it makes is returned to the shell like every other command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from expertd.daemon.core.events import (
    DEVICE,
    H2D,
    HOST,
    LINK_INTO,
    LINKS,
    TIER_OF_LINK,
    Command,
    Priority,
    StartTransfer,
)
from expertd.daemon.core.prefetch import Prefetcher, PrefetchPlan
from expertd.daemon.core.slots import REJECTED, SlotTable
from expertd.daemon.core.transfers import Transfer, Transfers

if TYPE_CHECKING:
    from expertd.daemon.core.manager_config import Pending

DROPPED = object()  # _start: the transfer was dropped, not started


class TransferScheduling:
    """Transfers of `CacheManager`: ensure, demote, dispatch, start, prefetch, cancel."""

    tiers: dict[str, SlotTable]
    transfers: Transfers
    prefetcher: Prefetcher | None
    prefetch_cancelled: int
    held_outside: Callable[[str, int], bool] | None  # see `CacheManager.__init__`
    _wants_device: dict[int, tuple[Priority, int]]
    _waiters: dict[tuple[str, int], list[Pending]]
    t: int

    def _committed(self, tier: str) -> set[int]:
        """Keys admitted acquires wait for that hold no slot yet (`CacheManager` says)."""
        raise NotImplementedError

    def _ensure(
        self, key: int, tier: str, priority: Priority, t: int, prob: float = 1.0, background: bool = False
    ) -> None:
        """Make sure a transfer will bring ``key`` into ``tier`` at ``priority`` or better."""
        transfer = self.transfers.of(tier, key)
        if transfer is not None:
            if priority < transfer.priority:
                self.transfers.reprioritize(transfer, priority)
            return
        if tier == HOST or self.tiers[HOST].ready(key):
            self.transfers.queue(LINK_INTO[tier], key, priority, t, prob, background)
            return
        # The device wants a key the host does not hold yet: load it, then copy it up.
        want = self._wants_device.get(key)
        if want is None or priority < want[0]:
            self._wants_device[key] = (priority, t if want is None else want[1])
        self._ensure(key, HOST, priority, t, prob)

    def _demote(self, tier: str, key: int) -> None:
        """No acquire waits for ``key`` any more: its transfers become mere prefetches."""
        transfer = self.transfers.of(tier, key)
        if transfer is not None:
            self.transfers.reprioritize(transfer, Priority.PREDICTED)
        if tier == DEVICE and key in self._wants_device:
            self._wants_device[key] = (Priority.PREDICTED, self._wants_device[key][1])
            host_transfer = self.transfers.of(HOST, key)
            if host_transfer is not None and not self._waiters.get((HOST, key)):
                self.transfers.reprioritize(host_transfer, Priority.PREDICTED)

    def _dispatch(self) -> list[Command]:
        """Start queued transfers while links have room and slots can be reserved."""
        out: list[Command] = []
        transfers = self.transfers
        for link in LINKS:
            while (transfer := transfers.head(link)) is not None:
                if link == H2D and not self.tiers[HOST].ready(transfer.key):
                    transfers.pop_head(link)
                    transfers.drop(transfer)  # the host copy it needed was evicted: load it again first
                    self._ensure(transfer.key, DEVICE, transfer.priority, transfer.t)
                    continue
                command = self._start(transfer)
                if command is DROPPED:
                    transfers.pop_head(link)
                    continue
                if command is None:
                    # The head must wait for pins to drop; what admitted acquires wait
                    # for may still start, wherever it sits in the queue.
                    out.extend(self._start_committed(link))
                    break
                transfers.pop_head(link)
                out.append(command)
        return out

    def _start_committed(self, link: str) -> list[Command]:
        tier = TIER_OF_LINK[link]
        out: list[Command] = []
        for key in sorted(self._committed(tier)):
            if not self.transfers.has_room(link):
                break
            transfer = self.transfers.of(tier, key)
            if transfer is None:
                continue  # a device key still loading into the host
            if transfer.running or (link == H2D and not self.tiers[HOST].ready(key)):
                continue
            command = self._start(transfer)
            if isinstance(command, StartTransfer):
                out.append(command)
        return out

    def _start(self, transfer: Transfer) -> StartTransfer | None:
        """Reserve the destination slot and start ``transfer``; None if it must wait."""
        tier_name = TIER_OF_LINK[transfer.link]
        tier = self.tiers[tier_name]
        committed = self._committed(tier_name)
        if transfer.key not in committed and tier.pinned_slots + len(committed) + 1 > tier.num_slots:
            return None  # the unpinned slots are promised to admitted acquires
        if transfer.prefetch and not transfer.background and not self.transfers.share_allows(transfer.link):
            self.transfers.deferred += 1
            return None  # the link's prefetch share is spent: wait for demand transfers
        guard = None
        if transfer.prefetch and self.prefetcher is not None:  # predicted or hinted
            may_evict, key = self.prefetcher.may_evict(), transfer.key
            guard = lambda victim: may_evict(victim, key)  # noqa: E731 - never evict a key used sooner
        if transfer.prefetch and self.held_outside is not None:
            guard = _spare_held(guard, self.held_outside, tier)
        protected = self.prefetcher.protected if self.prefetcher is not None else ()
        dst_slot = tier.reserve(transfer.key, transfer.t, guard, protected)
        if dst_slot is None:
            return None
        if dst_slot == REJECTED:
            self.transfers.drop(transfer)
            return DROPPED
        src_slot = None
        if transfer.link == H2D:
            host = self.tiers[HOST]
            src_slot = host.slot_of[transfer.key]
            host.pin(src_slot)
            host.policy.on_hit(transfer.key, transfer.t)
        if transfer.prefetch:
            tier.prefetched.add(dst_slot)
        return self.transfers.start(transfer, src_slot, dst_slot)

    def _prefetch(self, plan: PrefetchPlan) -> list[Command]:
        """Cancel stale guesses still queued, queue the new ones, start what can start."""
        tier = DEVICE if DEVICE in self.tiers else HOST
        for key in plan.stale:
            self._cancel_prefetch(tier, key)
        slot_of = self.tiers[tier].slot_of
        for key, prob in plan.wanted:
            if key not in slot_of:
                self._ensure(key, tier, Priority.PREDICTED, self.t, prob)
        return self._dispatch()

    def _cancel_prefetch(self, tier: str, key: int) -> None:
        """A queued prediction for ``key`` lost its purpose: drop it (a running one finishes)."""
        if self._waiters.get((tier, key)):
            return
        transfer = self.transfers.of(tier, key)
        if transfer is not None:
            if not transfer.running and transfer.priority == Priority.PREDICTED:
                self.transfers.drop(transfer)
                self.prefetch_cancelled += 1
        elif tier == DEVICE and self._wants_device.get(key, (None,))[0] == Priority.PREDICTED:
            del self._wants_device[key]
            self._cancel_prefetch(HOST, key)


def _spare_held(
    guard: Callable[[int], bool] | None, held: Callable[[str, int], bool], tier: SlotTable
) -> Callable[[int], bool]:
    """``guard``, and never a victim whose slot ``held`` says a client holds outside the core."""

    def check(victim: int) -> bool:
        return (guard is None or guard(victim)) and not held(tier.name, tier.slot_of[victim])

    return check
