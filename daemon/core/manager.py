"""The cache manager: expertd's pure core. Events in, commands out.

No I/O, no threads, no clock of its own: the daemon and the replay simulator both
drive this class, the daemon with real transfers and `time.monotonic`, the
simulator with a virtual clock and a bandwidth model, so what replay predicts is
what the daemon does.

Tiers: ``host`` (RAM) and, optionally, ``device`` (GPU memory); the store below
them holds every expert. Each tier is a fixed array of slots with one eviction
policy. Two links move experts: ``load`` (store -> host slot) and ``h2d`` (host
slot -> device slot), each with a priority queue (demand before hint before
predicted) and a depth (transfers running at once). A slot is reserved when its
transfer *starts*, counts against capacity from then on, and stays pinned until
the transfer ends. A leased slot is pinned until its lease is released; pinned
slots are never evicted. An acquire is answered once all its experts are ready.

Admission keeps acquires from deadlocking each other: an acquire starts pinning
slots only when the tier's unpinned slots can hold every expert that admitted
acquires still wait for; the others wait, in order, without holding anything.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from expertd.daemon.core.events import (
    AUTO,
    DEVICE,
    H2D,
    HOST,
    LOAD,
    TIER_OF_LINK,
    ClientId,
    Command,
    ErrorReply,
    Predict,
    Priority,
    Reply,
    StartTransfer,  # noqa: F401 - callers take the manager's commands from here
)
from expertd.daemon.core.manager_check import check_acquire, check_tokens
from expertd.daemon.core.manager_config import ClientState, LeaseRecord, ManagerConfig, Pending
from expertd.daemon.core.manager_stats import manager_stats
from expertd.daemon.core.manager_transfers import TransferScheduling
from expertd.daemon.core.placement import AutoPlan, plan_auto
from expertd.daemon.core.prefetch import Prefetcher
from expertd.daemon.core.reported import reported_hit
from expertd.daemon.core.slots import SlotTable
from expertd.daemon.core.transfers import Transfers
from expertd.daemon.protocol.errors import ErrorCode
from expertd.policies.registry import make_policy


class CacheManager(TransferScheduling):
    """Residency, leases and transfers of every tier; see the module docstring."""

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.geometry = geometry = config.geometry
        self.tiers: dict[str, SlotTable] = {
            HOST: SlotTable(
                HOST,
                config.host_slots,
                make_policy(config.host_policy, config.host_slots, geometry),
            )
        }
        if config.device_slots:
            policy = make_policy(config.device_policy, config.device_slots, geometry)
            self.tiers[DEVICE] = SlotTable(DEVICE, config.device_slots, policy)
        self._ids = itertools.count(1)  # leases and transfers
        self.transfers = Transfers(
            {LOAD: config.load_depth, H2D: config.h2d_depth},
            config.max_queued_prefetches,
            config.prefetch.share,
            config.prefetch.window,
            self._ids,
        )
        self._wants_device: dict[int, tuple[Priority, int]] = {}  # key -> (priority, t) after load
        self._waiters: dict[tuple[str, int], list[Pending]] = {}
        self._admission: dict[str, deque[Pending]] = {name: deque() for name in self.tiers}
        self._admitted: dict[str, list[Pending]] = {name: [] for name in self.tiers}
        self._pending: dict[tuple[ClientId, int], Pending] = {}
        self._leases: dict[int, LeaseRecord] = {}
        self._clients: dict[ClientId, ClientState] = {}
        self._forwards = itertools.count()
        self.t = 0  # accesses so far: the policies' virtual clock
        layers = geometry.num_layers
        self.layer_accesses = {name: [0] * layers for name in self.tiers}
        self.layer_hits = {name: [0] * layers for name in self.tiers}
        self.prefetch_cancelled = 0
        self.reported_stale = 0  # fast-path hits reported after their slot was reassigned
        # The shell's word on whether a slot is held where the core cannot see (a client's
        # shared-memory pin not reported yet): a prefetch never evicts such a slot. None: no such pins.
        self.held_outside: Callable[[str, int], bool] | None = None
        self.placed = {DEVICE: 0, HOST: 0, "background": 0}  # auto acquires' experts, by placement
        self.prefetcher = Prefetcher(config.prefetch, geometry) if config.prefetch.predictor else None
        if self.prefetcher is not None:
            for table in self.tiers.values():
                if table.policy.wants_estimates:  # e.g. `predictive`: next uses from the predictors
                    table.policy.bind_estimator(self.prefetcher.waits)

    # --- events ---------------------------------------------------------------------------

    reported_hit = reported_hit  # a hit served from shared memory, accounted afterwards

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
    ) -> list[Command]:
        """Pin ``experts`` of ``layer`` in ``tier``; reply once all are ready.

        ``generation``: which of the client's generations this is (predictors keep history
        per generation); None: the client's acquires are one stream.

        ``tier`` `AUTO`: the manager places each expert (`expertd.daemon.core.placement`):
        the reply's ``placements`` say which are computed from device slots and which from
        host slots; ``tokens``: how many tokens this pass routes to each expert, one count for
        all or one per expert in ``experts`` order (a prefill batch is dear on a CPU).
        Without a device tier every expert is placed on the host.

        ``release``: leases to release first; ones this client does not hold (any more)
        are ignored -- an expired lease is already released.
        """
        state = self._touch(client, now)
        release = list(release)
        auto = tier == AUTO and self.config.placement.enabled and DEVICE in self.tiers
        if tier == AUTO:
            tier = DEVICE if DEVICE in self.tiers else HOST
        error = check_acquire(self, client, request_id, layer, experts, tier) or check_tokens(tokens, experts)
        if error:
            return [ErrorReply(client, request_id, *error)]
        out: list[Command] = []
        released = False
        for lease_id in release:
            lease = self._leases.get(lease_id)
            if lease is not None and lease.client == client:  # others are gone already
                self._release(lease_id)
                released = True
        if released and (self.transfers.any_queued() or any(self._admission.values())):
            out = self._settle()  # what waited for those slots goes first
        held, cap = state.pins.get(tier, 0), self.config.pin_cap(self.tiers[tier].num_slots)
        if held + len(experts) > cap:
            text = (
                f"this client would pin {held + len(experts)} of the {tier} tier's "
                f"{self.tiers[tier].num_slots} slots ({held} held); one client may pin {cap} "
                "([clients] max_pinned_share): release leases first"
            )
            return [*out, ErrorReply(client, request_id, ErrorCode.CAPACITY, text)]
        state.pins[tier] = held + len(experts)
        if layer <= state.last_layer:  # a new forward pass starts at the first layer again
            state.forward = next(self._forwards)
        state.last_layer = layer
        keys = [layer * self.geometry.num_experts + expert for expert in experts]
        t0 = self.t
        self.t += len(keys)
        target = self.tiers[tier]
        if not self._admission[tier] and not self._admitted[tier]:
            slot_of, filling = target.slot_of, target.filling
            slots = [slot_of.get(key, -1) for key in keys]
            if -1 not in slots and filling.isdisjoint(slots):
                reply = self._grant_ready(client, state, request_id, tier, layer, keys, slots, t0)
                if auto:
                    reply = dataclasses.replace(reply, tier=AUTO)
                    self.placed[DEVICE] += len(keys)
                out.append(reply)
                if self.prefetcher is not None:  # after the reply has gone out: see `Predict`
                    out.append(Predict(client, generation, layer, tuple(experts)))
                return out
        plan = None
        if self.prefetcher is not None:  # a miss: what it evicts depends on what it teaches
            plan = self.prefetcher.on_acquire(state.tenant, (client, generation), layer, experts)
        if auto:
            placed = plan_auto(self, keys, tokens)
            out.extend(self._place(client, state, request_id, layer, keys, t0, placed, now))
        else:
            pending = Pending(client, request_id, tier, keys, t0, state.forward, now)
            self._pending[(client, request_id)] = pending
            state.pending.add(request_id)
            self._admission[tier].append(pending)
        out.extend(self._admit_all())
        if plan is not None:
            out.extend(self._prefetch(plan))
        else:
            out.extend(self._dispatch())
        return out

    def _place(
        self,
        client: ClientId,
        state: ClientState,
        request_id: int,
        layer: int,
        keys: list[int],
        t0: int,
        placed: AutoPlan,
        now: float,
    ) -> list[Command]:
        """An auto acquire's miss: pin its host-placed slots, queue its background copies,
        and admit its device part (or reply at once when nothing is left for the device)."""
        host = self.tiers[HOST]
        times = {key: t for t, key in enumerate(keys, t0)}
        state.pins[DEVICE] -= len(placed.host)
        state.pins[HOST] = state.pins.get(HOST, 0) + len(placed.host)
        for key, slot in placed.host.items():
            t = times[key]
            self.tiers[DEVICE].policy.on_miss(key, t)  # a device miss that bypasses the device
            host.policy.on_hit(key, t)
            host.used(slot)
            host.pin(slot)
            self.layer_accesses[DEVICE][layer] += 1
            self.layer_accesses[HOST][layer] += 1
            self.layer_hits[HOST][layer] += 1
        for key in placed.background:
            self._ensure(key, DEVICE, Priority.PREDICTED, times[key], background=True)
        self.placed[HOST] += len(placed.host)
        self.placed[DEVICE] += len(placed.device)
        self.placed["background"] += len(placed.background)
        pending = Pending(client, request_id, DEVICE, placed.device, t0, state.forward, now)
        pending.asked, pending.host = keys, placed.host
        pending.times = [times[key] for key in placed.device]
        self._pending[(client, request_id)] = pending
        state.pending.add(request_id)
        if not placed.device:
            return [self._grant(pending)]
        self._admission[DEVICE].append(pending)
        return []

    def predict(self, command: Predict) -> list[Command]:
        """The prediction work a hit put off until its reply was out: learn, then prefetch."""
        state = self._clients.get(command.client)
        if self.prefetcher is None or state is None:  # the client left in between
            return []
        key = (command.client, command.generation)
        return self._prefetch(self.prefetcher.on_acquire(state.tenant, key, command.layer, command.experts))

    def set_tenant(self, client: ClientId, tenant: str, now: float) -> None:
        """``client`` acts for ``tenant``: its routing feeds (only) that tenant's predictor."""
        self._touch(client, now).tenant = tenant

    def end_generation(self, client: ClientId, generation: Hashable) -> None:
        """The client's ``generation`` finished: its per-generation history goes."""
        state = self._clients.get(client)
        if self.prefetcher is not None and state is not None:
            self.prefetcher.forget(state.tenant, (client, generation))

    def _grant_ready(
        self,
        client: ClientId,
        state: ClientState,
        request_id: int,
        tier: str,
        layer: int,
        keys: list[int],
        slots: list[int],
        t0: int,
    ) -> Reply:
        """The hit path: every key is ready and nobody waits before us; pin, lease, reply."""
        target = self.tiers[tier]
        policy = target.policy
        policy.on_step(state.forward, layer)
        for t, (key, slot) in enumerate(zip(keys, slots, strict=True), t0):
            policy.on_hit(key, t)
            target.used(slot)
            target.pin(slot)
        self.layer_accesses[tier][layer] += len(keys)
        self.layer_hits[tier][layer] += len(keys)
        lease_id = next(self._ids)
        self._leases[lease_id] = LeaseRecord(client, tier, slots)
        state.leases.add(lease_id)
        return Reply(client, request_id, lease_id, tier, tuple(slots), len(keys))

    def release(self, client: ClientId, request_id: int, lease_id: int, now: float) -> list[Command]:
        """Unpin a lease's slots. Errors only for a lease this client does not hold."""
        if self.release_many(client, [lease_id], now):
            return [ErrorReply(client, request_id, ErrorCode.UNKNOWN_LEASE, f"no lease {lease_id}")]
        return self._settle()

    def release_many(self, client: ClientId, lease_ids: Iterable[int], now: float) -> list[int]:
        """Unpin each lease ``client`` holds; return the ids it did not hold. Call `settle` after."""
        self._touch(client, now)
        unknown = []
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is None or lease.client != client:
                unknown.append(lease_id)
            else:
                self._release(lease_id)
        return unknown

    def settle(self) -> list[Command]:
        """After releases: admit waiting acquires, start what can start."""
        return self._settle()

    def hint(
        self,
        client: ClientId,
        layer: int,
        experts: Sequence[int],
        now: float,
        priority: Priority = Priority.HINT,
        generation: Hashable = None,
        scores: Sequence[float] | None = None,
    ) -> list[Command]:
        """Prefetch ``experts`` of ``layer`` into the top tier (out-of-range ids are ignored)."""
        state = self._touch(client, now)
        if not 0 <= layer < self.geometry.num_layers:
            return []
        if self.prefetcher is not None:
            valid = [e for e in experts if 0 <= e < self.geometry.num_experts]
            weights = list(scores) if scores else [1.0] * len(valid)
            self.prefetcher.on_hint(state.tenant, (client, generation), layer, valid, weights)
        tier = DEVICE if DEVICE in self.tiers else HOST
        slot_of = self.tiers[tier].slot_of
        for expert in experts:
            if 0 <= expert < self.geometry.num_experts:
                key = layer * self.geometry.num_experts + expert
                if key not in slot_of:
                    self._ensure(key, tier, priority, self.t)
        return self._dispatch()

    def transfer_done(self, transfer_id: int, ok: bool, error: str = "") -> list[Command]:
        """A transfer the shell started has finished (or failed with ``error``)."""
        transfer = self.transfers.finish(transfer_id)
        link, key = transfer.link, transfer.key
        tier_name = TIER_OF_LINK[link]
        tier = self.tiers[tier_name]
        assert transfer.dst_slot is not None
        if transfer.src_slot is not None:
            self.tiers[HOST].unpin(transfer.src_slot)
        out: list[Command] = []
        if ok:
            slot = transfer.dst_slot
            for pending in self._waiters.pop((tier_name, key), []):
                if key not in pending.pinned:
                    tier.pin(slot)
                    pending.pinned[key] = slot
                pending.waiting.discard(key)
                if not pending.waiting:
                    out.append(self._grant(pending))
            tier.fill_done(slot)
            if link == LOAD and key in self._wants_device:
                priority, t = self._wants_device.pop(key)
                self._ensure(key, DEVICE, priority, t)
        else:
            self.transfers.failed[link] += 1
            layer, expert = divmod(key, self.geometry.num_experts)
            reason = f"loading layer {layer} expert {expert} failed: {error or 'unknown error'}"
            failed = [(tier_name, key)]
            if link == LOAD and key in self._wants_device:
                del self._wants_device[key]
                failed.append((DEVICE, key))
            for waiter_key in failed:
                for pending in self._waiters.pop(waiter_key, []):
                    if (pending.client, pending.request_id) in self._pending:
                        self._abandon(pending)
                        out.append(
                            ErrorReply(pending.client, pending.request_id, ErrorCode.LOAD_FAILED, reason)
                        )
            tier.fill_done(transfer.dst_slot)
            tier.drop(key)  # after the waiters let go of their pins on the slot
        out.extend(self._settle())
        return out

    def client_gone(self, client: ClientId) -> list[Command]:
        """A client disconnected or timed out: drop its leases and unanswered acquires."""
        state = self._clients.pop(client, None)
        if state is None:
            return []
        if self.prefetcher is not None:
            self.prefetcher.forget_client(state.tenant, client)
        for lease_id in list(state.leases):
            self._release(lease_id)
        for request_id in list(state.pending):
            self._abandon(self._pending[(client, request_id)])
        return self._settle()

    def knows(self, client: ClientId) -> bool:
        """Is ``client`` connected (not gone, not timed out)?"""
        return client in self._clients

    def heartbeat(self, client: ClientId, now: float) -> None:
        """The client is alive (any message counts); silence past the lease timeout ends it."""
        self._touch(client, now)

    def tick(self, now: float) -> list[Command]:
        """Time passes: clients silent longer than the lease timeout are gone.

        A client waiting for an acquire is not silent: it waits for us. (If it died
        meanwhile, the shell learns so when the reply cannot be delivered.)
        """
        deadline = now - self.config.lease_timeout_s
        out: list[Command] = []
        for client in [c for c, s in self._clients.items() if s.last_seen < deadline and not s.pending]:
            out.extend(self.client_gone(client))
        for name, queue in self._admission.items():
            stuck = [p for p in queue if now - p.since >= self.config.capacity_wait_s]
            if stuck:
                why = self._capacity_text(name, stuck[0].client)
                for pending in stuck:
                    self._abandon(pending)
                    out.append(ErrorReply(pending.client, pending.request_id, ErrorCode.CAPACITY, why))
                out.extend(self._settle())
        return out

    def _capacity_text(self, tier: str, client: ClientId) -> str:
        """Why an acquire still waits: how much of the tier others pin."""
        table = self.tiers[tier]
        others = sum(1 for c, s in self._clients.items() if c != client and s.pins.get(tier, 0) > 0)
        clients = f"{others} other client{'s' if others != 1 else ''}"
        return (
            f"waiting for capacity: {table.pinned_slots} of {table.num_slots} {tier} slots pinned by "
            f"{clients} (refused after {self.config.capacity_wait_s:g} s, [clients] capacity_wait_s)"
        )

    def preload(self, tier: str, keys: Iterable[int]) -> None:
        """Mark ``keys`` resident at start (a warm tier), without transfers."""
        target = self.tiers[tier]
        for key in keys:
            if key in target.slot_of:
                continue
            slot = target.reserve(key, self.t)
            if slot is None:
                raise ValueError(f"{tier}: cannot preload key {key}: every slot is pinned")
            target.fill_done(slot)

    # --- queries --------------------------------------------------------------------------

    def resident(self, tier: str) -> dict[int, int]:
        """Ready keys of ``tier`` and their slots."""
        target = self.tiers[tier]
        return {k: s for k, s in target.slot_of.items() if s not in target.filling}

    def max_pinned(self, client: ClientId) -> dict[str, int]:
        """Per tier: the most slots one client may pin at once."""
        return {
            name: min(table.num_slots, self.config.pin_cap(table.num_slots))
            for name, table in self.tiers.items()
        }

    def client_summary(self) -> dict[ClientId, tuple[int, int]]:
        """Per client: (leases held, acquires waiting)."""
        return {c: (len(s.leases), len(s.pending)) for c, s in self._clients.items()}

    def stats(self) -> dict[str, Any]:
        """Counters and occupancy, msgpack-able."""
        return manager_stats(self)

    # --- acquires and leases --------------------------------------------------------------

    def _touch(self, client: ClientId, now: float) -> ClientState:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = ClientState(now)
        state.last_seen = max(state.last_seen, now)
        return state

    def _committed(self, tier: str) -> set[int]:
        """Keys that admitted acquires wait for and that hold no slot yet."""
        slot_of = self.tiers[tier].slot_of
        return {k for p in self._admitted[tier] for k in p.waiting if k not in slot_of}

    def _fits(self, pending: Pending) -> bool:
        """Can ``pending`` be admitted without risking a deadlock with admitted acquires?"""
        tier = self.tiers[pending.tier]
        new_pins = sum(1 for k in pending.keys if k in tier.slot_of and not tier.pins[tier.slot_of[k]])
        need = self._committed(pending.tier) | {k for k in pending.keys if k not in tier.slot_of}
        return tier.pinned_slots + new_pins + len(need) <= tier.num_slots

    def _admit_all(self) -> list[Command]:
        out: list[Command] = []
        for queue in self._admission.values():
            while queue and self._fits(queue[0]):
                out.extend(self._admit(queue.popleft()))
        return out

    def _admit(self, pending: Pending) -> list[Command]:
        """Pin what is resident, ask for the rest; grant at once if everything is ready."""
        pending.admitted = True
        name = pending.tier
        tier = self.tiers[name]
        accesses, hits = self.layer_accesses[name], self.layer_hits[name]
        num_experts = self.geometry.num_experts
        tier.policy.on_step(pending.forward, pending.keys[0] // num_experts)
        for i, key in enumerate(pending.keys):
            t = pending.times[i] if pending.times is not None else pending.t0 + i
            layer = key // num_experts
            accesses[layer] += 1
            slot = tier.slot_of.get(key)
            if slot is not None:
                tier.policy.on_hit(key, t)
                tier.used(slot)
                tier.pin(slot)
                pending.pinned[key] = slot
                if slot in tier.filling:
                    pending.waiting.add(key)
                else:
                    pending.hits += 1
                    hits[layer] += 1
            else:
                pending.waiting.add(key)
                tier.policy.on_miss(key, t)
                if name == DEVICE:  # a device miss is a host access
                    host = self.tiers[HOST]
                    self.layer_accesses[HOST][layer] += 1
                    self.layer_hits[HOST][layer] += host.ready(key)
                    if key not in host.slot_of:
                        host.policy.on_miss(key, t)
                self._ensure(key, name, Priority.DEMAND, t)
            if key in pending.waiting:
                self._waiters.setdefault((name, key), []).append(pending)
        if not pending.waiting:
            return [self._grant(pending)]
        self._admitted[name].append(pending)
        return []

    def _grant(self, pending: Pending) -> Reply:
        del self._pending[(pending.client, pending.request_id)]
        if pending in self._admitted[pending.tier]:
            self._admitted[pending.tier].remove(pending)
        state = self._clients[pending.client]
        state.pending.discard(pending.request_id)
        lease_id = next(self._ids)
        slots = [pending.pinned[key] for key in pending.keys]
        self._leases[lease_id] = LeaseRecord(pending.client, pending.tier, slots, list(pending.host.values()))
        state.leases.add(lease_id)
        client, request_id, hits = pending.client, pending.request_id, pending.hits
        if pending.asked is None:
            return Reply(client, request_id, lease_id, pending.tier, tuple(slots), hits)
        host, asked = pending.host, pending.asked
        slots_asked = tuple(host[key] if key in host else pending.pinned[key] for key in asked)
        placements = tuple(HOST if key in host else DEVICE for key in asked)
        return Reply(client, request_id, lease_id, AUTO, slots_asked, hits, placements)

    def _release(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        tier = self.tiers[lease.tier]
        for slot in lease.slots:
            tier.unpin(slot)
        for slot in lease.host_slots:
            self.tiers[HOST].unpin(slot)
        state = self._clients.get(lease.client)
        if state is not None:
            state.leases.discard(lease_id)
            if lease.counted:
                state.pins[lease.tier] -= len(lease.slots)
            if lease.host_slots:
                state.pins[HOST] -= len(lease.host_slots)

    def _abandon(self, pending: Pending) -> None:
        """Drop an unanswered acquire: unpin what it pinned, stop waiting, demote its loads."""
        del self._pending[(pending.client, pending.request_id)]
        state = self._clients.get(pending.client)
        if state is not None:
            state.pending.discard(pending.request_id)
            state.pins[pending.tier] -= len(pending.keys)
            if pending.host:
                state.pins[HOST] -= len(pending.host)
        for slot in pending.host.values():
            self.tiers[HOST].unpin(slot)
        if not pending.admitted:
            self._admission[pending.tier].remove(pending)
            return
        self._admitted[pending.tier].remove(pending)
        tier = self.tiers[pending.tier]
        for slot in pending.pinned.values():
            tier.unpin(slot)
        for key in pending.waiting:
            waiters = self._waiters.get((pending.tier, key), [])
            if pending in waiters:  # a failed transfer has already let go of its waiters
                waiters.remove(pending)
            if not waiters:
                self._waiters.pop((pending.tier, key), None)
                self._demote(pending.tier, key)

    def _settle(self) -> list[Command]:
        """After pins dropped: admit waiting acquires, then start what can start."""
        out = self._admit_all()
        out.extend(self._dispatch())
        return out
