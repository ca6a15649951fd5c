"""The cache as its shells see it: tenants, their isolation, their counters and reply order.

Events in, commands out, like the manager below it; the daemon's server (real sockets, real
transfers, `time.monotonic`) and the replay simulator (a virtual clock) are the two shells
that drive it, through the same loop (`CacheCore._run`). What it owns on top of the managers:

- tenants: each client acts for one; a ``partitioned`` tenant's events go to its own manager
  (`Partitions`), a ``private`` tenant's acquires are checked against its shadow cache
  (`PrivateTiming`) and their replies held back (`HeldReplies`) until its own cache would have
  answered;
- the counters: acquires, stalls, errors, every tenant's hits;
- the order of replies: a hit's reply comes out before the prediction work it put off, a held
  reply comes out of `due` when its time has come.

Every event returns an iterator of commands for the shell to carry out, in order:
`StartTransfer` (start it, report `transfer_done`), `Reply` (send the lease), `ErrorReply`
(send the error). Iterate each to its end: the work behind a command is done as the shell asks
for the next one, so a hit's reply leaves before its prediction work starts.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from expertd.daemon.core.events import AUTO, DEVICE, HOST, ClientId, Command, ErrorReply, Predict, Reply
from expertd.daemon.core.isolation import HeldReplies, PrivateTiming, Release
from expertd.daemon.core.manager import CacheManager
from expertd.daemon.core.manager_config import ManagerConfig
from expertd.daemon.core.partitions import Partitions

ISOLATION_MODES = ("shared", "partitioned", "private")
UNKNOWN_TENANT = "?"


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How one tenant is isolated from the others (``[tenants.NAME]`` in the daemon's config)."""

    isolation: str = "shared"
    share: float = 1.0  # partitioned: its fraction of each tier; private: the cache it is timed as having

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation {self.isolation!r} is not one of {', '.join(ISOLATION_MODES)}")
        if not 0 < self.share <= 1:
            raise ValueError(f"share {self.share!r} must be a fraction in (0, 1]")


SHARED = Isolation()


@dataclasses.dataclass
class TenantCounters:
    """What one tenant's acquires met: the stats it may see (not other tenants' routing)."""

    acquires: int = 0
    accesses: int = 0
    hits: int = 0
    waited: int = 0
    stall_s: float = 0.0
    errors: int = 0


class CacheCore:
    """Tenants, counters and reply order over the cache managers; see the module docstring."""

    def __init__(
        self,
        config: ManagerConfig,
        tenants: Mapping[str, Isolation] | None = None,
        *,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        """``clock``: when a reply is ready to leave (a private tenant's may be held back past it);
        ``rng``: the draws of private tenants' waits (default: unpredictable)."""
        self.tenants = dict(tenants or {})
        self.clock = clock
        shares = {t: p.share for t, p in self.tenants.items() if p.isolation == "partitioned"}
        self.partitions = Partitions(config, shares)
        self.timing = PrivateTiming(
            config.geometry,
            {HOST: config.host_slots, DEVICE: config.device_slots},
            {HOST: config.host_policy, DEVICE: config.device_policy},
            rng,
        )
        self.held = HeldReplies()
        self.acquires = {"count": 0, "waited": 0, "stall_s": 0.0, "max_stall_s": 0.0, "errors": 0}
        self.counters: dict[str, TenantCounters] = {}
        self._tenant_of: dict[ClientId, str] = {}
        self._started: dict[tuple[ClientId, int], float] = {}  # acquires waiting: when they came

    @property
    def tiers(self) -> Mapping[str, Any]:
        """Tier name -> the shared pool's `SlotTable` (every partition has the same tiers)."""
        return self.partitions.tiers

    def _manager(self, client: ClientId) -> tuple[str, CacheManager]:
        return self.partitions.route(client)

    def isolation(self, tenant: str) -> Isolation:
        return self.tenants.get(tenant, SHARED)

    # --- events ---------------------------------------------------------------------------

    def connect(self, client: ClientId, tenant: str, now: float) -> None:
        """``client`` acts for ``tenant`` from now on (its partition, its shadow, its counters)."""
        self._tenant_of[client] = tenant
        partitioned = self.isolation(tenant).isolation == "partitioned"
        self.partitions.set_tenant(client, tenant, now, tenant if partitioned else None)

    def acquire(
        self,
        client: ClientId,
        request_id: int,
        layer: int,
        experts: Sequence[int],
        tier: str,
        now: float,
        release: Iterable[int] = (),
        generation: Hashable = None,
        *,
        tokens: int | Sequence[int] = 1,
    ) -> Iterator[Command]:
        """An acquire arrives (``release``: leases to release first; ``tokens``: routed to each
        expert, for tier `AUTO`; see `CacheManager.acquire`)."""
        self.acquires["count"] += 1
        tenant = self._tenant_of.get(client, UNKNOWN_TENANT)
        policy = self.isolation(tenant)
        if policy.isolation == "private" and tier in self.partitions.tiers:
            self.timing.before_acquire((client, request_id), tenant, policy.share, tier, layer, experts, now)
        self._started[(client, request_id)] = now
        partition, manager = self._manager(client)
        commands = manager.acquire(
            client, request_id, layer, experts, tier, now, release, generation, tokens=tokens
        )
        return self._run(self.partitions.out(partition, commands), now)

    def release(
        self, client: ClientId, leases: Iterable[int], now: float, *, settle: bool = True
    ) -> tuple[list[int], Iterator[Command]]:
        """Release ``leases``: the ids ``client`` did not hold, and what the freed slots let start
        (``settle=False``: nothing yet; the caller calls `settle` once after several releases)."""
        unknown = self._manager(client)[1].release_many(client, leases, now)
        return unknown, self.settle(now) if settle else iter(())

    def settle(self, now: float) -> Iterator[Command]:
        """After releases: admit waiting acquires, start what can start."""
        return self._run(self.partitions.settle(), now)

    def hint(
        self,
        client: ClientId,
        layer: int,
        experts: Sequence[int],
        now: float,
        *,
        generation: Hashable = None,
        scores: Sequence[float] | None = None,
    ) -> Iterator[Command]:
        partition, manager = self._manager(client)
        commands = manager.hint(client, layer, experts, now, generation=generation, scores=scores)
        return self._run(self.partitions.out(partition, commands), now)

    def reported_hit(
        self,
        client: ClientId,
        layer: int,
        experts: Sequence[int],
        tier: str,
        slots: Sequence[int],
        now: float,
        generation: Hashable = None,
    ) -> tuple[int | None, Iterator[Command]]:
        """A hit the client served itself from shared memory, reported afterwards: counted as the
        acquire it was (`expertd.daemon.core.reported`). The lease id (None: nothing pinned) and
        the prediction work it put off."""
        self.acquires["count"] += 1
        partition, manager = self._manager(client)
        lease_id, hits, commands = manager.reported_hit(client, layer, experts, tier, slots, now, generation)
        counters = self.tenant_counters(self._tenant_of.get(client, UNKNOWN_TENANT))
        counters.acquires += 1
        counters.accesses += len(experts)
        counters.hits += hits
        return lease_id, self._run(self.partitions.out(partition, commands), now)

    def end_generation(self, client: ClientId, generation: Hashable) -> None:
        self._manager(client)[1].end_generation(client, generation)

    def heartbeat(self, client: ClientId, now: float) -> None:
        self._manager(client)[1].heartbeat(client, now)

    def transfer_done(self, transfer_id: int, ok: bool, error: str, now: float) -> Iterator[Command]:
        return self._run(self.partitions.transfer_done(transfer_id, ok, error), now)

    def client_gone(self, client: ClientId, now: float) -> Iterator[Command]:
        """``client`` left: its leases and waiting acquires go (what they freed may start)."""
        for key in [k for k in self._started if k[0] == client]:
            del self._started[key]
        self._tenant_of.pop(client, None)
        return self._run(self.partitions.client_gone(client), now)

    def tick(self, now: float) -> Iterator[Command]:
        """Time passes: silent clients go, acquires stuck waiting for capacity are refused."""
        commands = self.partitions.tick(now)
        for client in [c for c in self._tenant_of if not self.knows(c)]:
            del self._tenant_of[client]
        return self._run(commands, now)

    def knows(self, client: ClientId) -> bool:
        """Is ``client`` connected (not gone, not timed out)?"""
        return self._manager(client)[1].knows(client)

    # --- queries --------------------------------------------------------------------------

    def max_pinned(self, client: ClientId) -> dict[str, int]:
        return self._manager(client)[1].max_pinned(client)

    def client_summary(self) -> dict[ClientId, tuple[int, int]]:
        return self.partitions.client_summary()

    def stats(self) -> dict[str, Any]:
        """The managers' counters (see `Partitions.stats`)."""
        return self.partitions.stats()

    def tenant_stats(self) -> dict[str, dict[str, Any]]:
        """Every tenant's counters, with its hit rate."""
        return {name: _with_rate(c) for name, c in self.counters.items()}

    def isolation_stats(self) -> dict[str, Any]:
        """How private tenants' replies were held back (an admin's view: never a tenant's)."""
        timing = self.timing
        return {
            "private_replies_held": timing.held_back,
            "private_held_s": timing.held_back_s,
            # Held-back hits (waits drawn from real misses) and real misses must look alike:
            # as often past the grid's first point, as late after their due time.
            "grid_points": {
                k: {"replies": n, "past_first": late} for k, (n, late) in timing.grid_points.items()
            },
            "late_us": self.held.late_us(),
            "miss_s": dict(timing.miss_s),
        }

    def waiting(self) -> list[tuple[ClientId, int]]:
        """Acquires not answered yet (to be refused at shutdown); forgotten here."""
        out = list(self._started)
        self._started.clear()
        return out

    # --- held-back replies ----------------------------------------------------------------

    def wait_s(self, now: float, longest_s: float) -> float | None:
        """How long the shell may wait for new events; None: a held reply is due (see `HeldReplies`)."""
        return self.held.wait_s(now, longest_s)

    def next_due(self) -> float | None:
        return self.held.next_due()

    def due(self, now: float) -> list[tuple[Reply, Release]]:
        """Held replies due by ``now``, in due order; tell `sent` when each has left."""
        return [(reply, release) for _, reply, release in self.held.due(now)]

    def sent(self, release: Release, now: float) -> None:
        self.held.sent(release, now)

    # --- the loop -------------------------------------------------------------------------

    def _run(self, commands: list[Command], now: float) -> Iterator[Command]:
        """The one command loop: count replies, hold private ones back, expand put-off predictions."""
        for command in commands:
            if isinstance(command, Reply):
                if self._answer(command, now):
                    yield command
            elif isinstance(command, Predict):
                partition, manager = self._manager(command.client)
                yield from self._run(self.partitions.out(partition, manager.predict(command)), now)
            elif isinstance(command, ErrorReply):
                self._started.pop((command.client, command.request_id), None)
                self.timing.forget((command.client, command.request_id))
                self.acquires["errors"] += 1
                yield command
            else:
                yield command

    def _answer(self, reply: Reply, now: float) -> bool:
        """Count ``reply``; False if it is held back (it comes out of `due` later)."""
        key = (reply.client, reply.request_id)
        waited = now - self._started.pop(key, now)
        tenant = self._tenant_of.get(reply.client)
        counters = self.tenant_counters(tenant or UNKNOWN_TENANT)
        misses = len(reply.slots) - reply.hits
        copies = misses - reply.host_computed  # host-placed experts waited for no copy
        if reply.tier != AUTO:  # an auto reply's time is no copy's
            self.timing.miss_answered(reply.tier, misses, waited, tenant)
        if copies:
            self.acquires["waited"] += 1
            self.acquires["stall_s"] += waited
            self.acquires["max_stall_s"] = max(self.acquires["max_stall_s"], waited)
            counters.waited += 1
            counters.stall_s += waited
        counters.acquires += 1
        counters.accesses += len(reply.slots)
        counters.hits += reply.hits
        ready = self.clock()
        release = self.timing.release_at(key, ready, misses)
        if release is not None and release.at > ready:
            # A private tenant: not faster than its own cache would have been (core/isolation.py).
            self.timing.held_back += 1
            self.timing.held_back_s += release.at - ready
            self.held.hold(release, reply.client, reply)
            return False
        return True

    def tenant_counters(self, tenant: str) -> TenantCounters:
        counters = self.counters.get(tenant)
        if counters is None:
            counters = self.counters[tenant] = TenantCounters()
        return counters


def _with_rate(counters: TenantCounters) -> dict[str, Any]:
    rate = counters.hits / counters.accesses if counters.accesses else 0.0
    return dict(dataclasses.asdict(counters), hit_rate=rate)
