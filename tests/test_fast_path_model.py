"""The pin/evict protocol of the shared-memory hit path as a hypothesis state machine.

The real daemon side (`Residency`: the table in shared memory, the pin files, the write gate)
and real clients (`FastPath`), in one process: the pin files' locks are open-file-description
locks, so a client holding its lock really keeps the daemon from reading its row. A client's
pin is split into its steps (lock, check the table, store the pin, unlock) so the daemon's
retire, write and publish can fall between any two of them; clients unpin and die at any
point. The invariant: no slot a live client holds pinned is ever written."""

from __future__ import annotations

import itertools
import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from expertd.client.fastpath import FastPath
from expertd.daemon.core.events import LOAD, Priority, StartTransfer
from expertd.daemon.protocol.residency import lock_pins, unlock_pins
from expertd.daemon.service.residency import PUBLISHED, Residency

SLOTS, KEYS, CLIENTS = 3, 5, 2
TIER = "host"


class Client:
    def __init__(self, residency: Residency, name: str) -> None:
        handles = residency.add_client(name, os.geteuid(), {TIER: SLOTS})
        self.fast = FastPath({TIER: {"fast": handles[TIER], "max_pinned": SLOTS}}, 1, KEYS)
        self.tier = self.fast.tiers[TIER]
        self.locked = False
        self.checked: tuple[list[int], list[int]] | None = None  # (keys, slots) seen published
        self.leases: dict[int, tuple[list[int], list[int]]] = {}  # id -> (keys, slots) it reads
        self.alive = True


class PinEvict(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.residency = Residency({TIER: SLOTS}, KEYS, lease_timeout_s=1e9)
        self.table = self.residency.tables[TIER]
        self.clients = [Client(self.residency, f"c{i}") for i in range(CLIENTS)]
        self.content: list[int | None] = [None] * SLOTS  # the key whose bytes each slot holds
        self.writing: dict[int, StartTransfer] = {}  # slot -> its transfer (started or held back)
        self.started: set[int] = set()  # transfer ids the engine runs
        self.ids = itertools.count(1)
        self.lease_ids = itertools.count(1)

    def teardown(self) -> None:
        for client in self.clients:
            if client.alive:
                if client.locked:
                    unlock_pins(client.fast.fd)
                client.fast.close()
        self.residency.close()

    # --- the daemon -------------------------------------------------------------------------

    @rule(slot=st.integers(0, SLOTS - 1), pick=st.integers(0, KEYS - 1))
    def core_starts_a_transfer(self, slot, pick):
        """The core picked ``slot`` for a key not resident (it knows nothing of rows: any slot
        not being filled)."""
        busy = {*self.content, *(t.key for t in self.writing.values())}
        free = [k for k in range(KEYS) if k not in busy]
        if slot in self.writing or not free:
            return
        key = free[pick % len(free)]
        command = StartTransfer(next(self.ids), LOAD, key, None, slot, Priority.DEMAND)
        self.writing[slot] = command
        if self.residency.start(command, 0.0):
            self._engine_writes(command)

    def _engine_writes(self, command: StartTransfer) -> None:
        self.content[command.dst_slot] = command.key  # the bytes change now
        self.started.add(command.transfer_id)

    @rule()
    def deferred_writes_look_again(self):
        for command in self.residency.ready(0.0):
            self._engine_writes(command)

    @precondition(lambda self: self.started)
    @rule(data=st.data())
    def transfer_finishes(self, data):
        slot = data.draw(
            st.sampled_from(sorted(s for s, t in self.writing.items() if t.transfer_id in self.started))
        )
        command = self.writing[slot]
        del self.writing[slot]
        self.started.discard(command.transfer_id)
        self.residency.done(command.transfer_id, True)

    # --- clients ----------------------------------------------------------------------------

    def _eligible(self, data, test) -> Client:
        return data.draw(st.sampled_from([c for c in self.clients if test(c)]))

    @precondition(lambda self: any(c.alive and not c.locked for c in self.clients))
    @rule(data=st.data())
    def client_locks(self, data):
        client = self._eligible(data, lambda c: c.alive and not c.locked)
        lock_pins(client.fast.fd)  # never waits here: the daemon holds it only within a step
        client.locked = True

    @precondition(lambda self: any(c.alive and c.locked and c.checked is None for c in self.clients))
    @rule(data=st.data(), picks=st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=2))
    def client_checks_the_table(self, data, picks):
        """Asks for the keys the slots ``picks`` hold (as far as it can tell), or their numbers."""
        client = self._eligible(data, lambda c: c.alive and c.locked and c.checked is None)
        seen = [int(client.tier.key_of[p]) for p in picks]
        keys = list(dict.fromkeys(k if k >= 0 else p for k, p in zip(seen, picks, strict=True)))
        if client.tier.pinned + len(keys) > SLOTS:
            return
        slots = client.fast.check(client.tier, 0, keys)
        if slots is not None:
            client.checked = (keys, slots)

    @precondition(lambda self: any(c.alive and c.locked for c in self.clients))
    @rule(target=leases, data=st.data())
    def client_stores_its_pins_and_unlocks(self, data):
        client = self._eligible(data, lambda c: c.alive and c.locked)
        lease = -1
        if client.checked is not None:
            keys, slots = client.checked
            client.fast.store(client.tier, slots)
            lease = next(self.lease_ids)
            client.leases[lease] = (keys, slots)
            client.checked = None
        unlock_pins(client.fast.fd)
        client.locked = False
        return lease

    @rule(lease=leases)
    def client_unpins(self, lease):
        for client in self.clients:
            if not (client.alive and lease in client.leases):
                continue
            _, slots = client.leases.pop(lease)
            client.fast.unpin(lease, TIER, tuple(slots))

    @rule(c=st.integers(0, CLIENTS - 1))
    def client_dies(self, c):  # rarer than the rest: each death ends a client for the run
        """SIGKILL: its descriptors close (the lock goes), and the daemon drops its row."""
        client = self.clients[c]
        if client.alive:
            client.fast.close()
            self.residency.drop_client(f"c{c}")
            client.alive, client.locked, client.leases = False, False, {}

    @precondition(lambda self: not any(c.alive and (c.leases or c.locked) for c in self.clients))
    @rule()
    def with_no_pin_held_every_write_may_start(self):
        self.deferred_writes_look_again()
        assert not self.residency.deferred, "a write waits for a pin nobody holds"

    # --- what must hold ---------------------------------------------------------------------

    @invariant()
    def a_pinned_slot_holds_the_key_its_pinner_read(self):
        for client in self.clients:
            if not client.alive:
                continue
            for keys, slots in client.leases.values():
                for key, slot in zip(keys, slots, strict=True):
                    assert self.content[slot] == key, f"slot {slot} was written while pinned for key {key}"

    @invariant()
    def a_published_slot_holds_its_key(self):
        for slot in range(SLOTS):
            if self.table.state[slot] == PUBLISHED:
                assert self.content[slot] == int(self.table.key_of[slot])


PinEvict.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_no_interleaving_reads_an_evicted_slot_as_pinned = PinEvict.TestCase
