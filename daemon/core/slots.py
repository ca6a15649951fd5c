"""`SlotTable`: the fixed slots of one tier, what each holds, its pins and its policy."""

from __future__ import annotations

from collections.abc import Callable, Container

from expertd.policies.base import EvictionPolicy, NoVictimError

REJECTED = -1  # reserve: the guard refused the victim


class SlotTable:
    """Which key each slot holds, which slots are still filling, and pin counts.

    A pinned slot (leased, being filled, or the source of a copy) is never evicted:
    `reserve` asks the policy for a victim among unpinned keys only.
    """

    def __init__(self, name: str, num_slots: int, policy: EvictionPolicy) -> None:
        self.name = name
        self.num_slots = num_slots
        self.policy = policy
        self.key_of: list[int | None] = [None] * num_slots
        self.slot_of: dict[int, int] = {}
        self.filling: set[int] = set()  # slots whose transfer has not finished
        self.pins: list[int] = [0] * num_slots
        self.pinned_keys: dict[int, int] = {}  # key -> pin count, for policy.victim
        self.pinned_slots = 0
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.evictions = 0
        self.prefetched: set[int] = set()  # slots a prefetch filled that no acquire used yet
        self.prefetch_used = 0
        self.prefetch_wasted = 0  # evicted before any acquire used them

    def ready(self, key: int) -> bool:
        slot = self.slot_of.get(key)
        return slot is not None and slot not in self.filling

    def pin(self, slot: int) -> None:
        key = self.key_of[slot]
        assert key is not None, f"{self.name}: pin of empty slot {slot}"
        if not self.pins[slot]:
            self.pinned_slots += 1
        self.pins[slot] += 1
        self.pinned_keys[key] = self.pins[slot]

    def unpin(self, slot: int) -> None:
        assert self.pins[slot] > 0, f"{self.name}: unpin of unpinned slot {slot}"
        key = self.key_of[slot]
        assert key is not None
        self.pins[slot] -= 1
        if self.pins[slot]:
            self.pinned_keys[key] = self.pins[slot]
        else:
            del self.pinned_keys[key]
            self.pinned_slots -= 1

    def reserve(
        self,
        key: int,
        t: int,
        guard: Callable[[int], bool] | None = None,
        protected: Container[int] = (),
    ) -> int | None:
        """A slot for ``key`` (evicting if the policy says so), filling and pinned; None if none.

        When the policy cannot name a victim (say the incoming key's layer share is all
        pinned) a free slot is still taken: the tier's capacity is the hard limit, a
        policy's internal shares are not. ``protected``: keys to spare while any other
        victim exists (those predicted for the coming layers). ``guard(victim)`` False:
        evict nothing and return `REJECTED` (a prefetch must not evict a likelier key).
        """
        policy = self.policy
        if self.free and not policy.needs_eviction(key):
            slot = self.free.pop()
        else:
            victim = self._victim(t, key, protected)
            if victim is None:
                if not self.free:
                    return None
                slot = self.free.pop()
            elif guard is not None and not guard(victim):
                return REJECTED
            else:
                slot = self.slot_of[victim]
                assert not self.pins[slot], f"{self.name}: policy chose pinned key {victim}"
                self.drop(victim)
                self.evictions += 1
                self.free.remove(slot)  # drop() put it on the free list
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self.filling.add(slot)
        self.pin(slot)
        policy.on_insert(key, t)
        return slot

    def _victim(self, t: int, incoming: int, protected: Container[int] = ()) -> int | None:
        """The policy's victim for ``incoming`` sparing ``protected``, else any it allows, else None."""
        attempts: list[Container[int]] = [_Either(self.pinned_keys, protected)] if protected else []
        attempts.append(self.pinned_keys)
        for pinned in attempts:
            try:
                return self.policy.victim(t, pinned, incoming)
            except NoVictimError:
                pass
        if self.free:
            return None  # the free slot will do
        try:
            return self.policy.victim(t, self.pinned_keys, None)
        except NoVictimError:
            pass
        # The policy's own shares leave it no victim (lru-per-layer: every full layer pinned)
        # while other keys are unpinned: the tier's capacity is the hard limit, not its shares,
        # and an admitted acquire must not wait for a slot nothing will ever free.
        for slot, key in enumerate(self.key_of):
            if key is not None and not self.pins[slot]:
                return key
        return None

    def used(self, slot: int) -> None:
        """An acquire used ``slot``: a prefetch that filled it paid off."""
        if slot in self.prefetched:
            self.prefetched.discard(slot)
            self.prefetch_used += 1

    def fill_done(self, slot: int) -> None:
        """The transfer into ``slot`` finished: it is ready, and no longer pinned by it."""
        self.filling.discard(slot)
        self.unpin(slot)

    def drop(self, key: int) -> None:
        """Forget ``key``: its slot becomes free."""
        slot = self.slot_of.pop(key)
        assert not self.pins[slot], f"{self.name}: drop of pinned slot {slot}"
        self.key_of[slot] = None
        self.filling.discard(slot)
        if slot in self.prefetched:
            self.prefetched.discard(slot)
            self.prefetch_wasted += 1
        self.free.append(slot)
        self.policy.on_remove(key)


class _Either:
    """Membership in either of two containers (pinned, or protected by a prediction)."""

    __slots__ = ("first", "second")

    def __init__(self, first: Container[int], second: Container[int]) -> None:
        self.first, self.second = first, second

    def __contains__(self, key: object) -> bool:
        return key in self.first or key in self.second
