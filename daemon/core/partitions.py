"""Partitioned tenants: their own slots of each tier, so no residency is shared with anyone.

`Partitions` keeps one `CacheManager` per partitioned tenant, each over its own
contiguous range of every slab's slots, plus one for all other (shared and private)
tenants over the rest. The managers stay pure and unaware of each other; `CacheCore`
sends each client's events to its tenant's manager (`route`), and this class translates
what crosses the boundary (`out`): slot numbers (local to a manager, global in the slabs)
and transfer ids (per manager, one id space for the engine). Events that concern every
manager (time, transfers, settling, stats) it spreads itself. Partitioning costs what
isolation costs: each tenant's copies are its own, and a partition's slots sit idle when
its tenant does.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

from expertd.daemon.core.events import TIER_OF_LINK, ClientId, Command, Reply, StartTransfer
from expertd.daemon.core.manager import CacheManager, ManagerConfig

SHARED_POOL = ""  # the partition of every tenant that has none of its own


class PartitionError(ValueError):
    """Partition shares that do not fit the tiers."""


class Partitions:
    """Managers by partition, one interface; see the module docstring."""

    def __init__(self, config: ManagerConfig, shares: Mapping[str, float]) -> None:
        self.config = config
        self._managers: dict[str, CacheManager] = {}
        self._base: dict[str, dict[str, int]] = {}  # partition -> tier -> first global slot
        tiers = {"host": config.host_slots, "device": config.device_slots}
        offsets = dict.fromkeys(tiers, 0)
        for partition, share in [*shares.items(), (SHARED_POOL, None)]:
            sizes = {}
            for tier, total in tiers.items():
                if share is None:
                    size = total - offsets[tier]
                else:
                    size = max(1, round(share * total)) if total else 0
                if total and size < 1 or offsets[tier] + size > total:
                    raise PartitionError(
                        f"partition shares {dict(shares)} leave no {tier} slot for the shared tenants"
                    )
                if total and size < config.min_pinned:
                    who = f"tenant {partition}" if partition else "the shared tenants"
                    raise PartitionError(
                        f"{who} would get {size} {tier} slot(s), "
                        f"fewer than one layer's top-{config.min_pinned}"
                    )
                sizes[tier] = size
            self._base[partition] = dict(offsets)
            for tier, size in sizes.items():
                offsets[tier] += size
            self._managers[partition] = CacheManager(
                dataclasses.replace(config, host_slots=sizes["host"], device_slots=sizes["device"])
            )
        self.shared = self._managers[SHARED_POOL]
        self.tiers = self.shared.tiers  # tier names and policies, as the server reads them
        self._partition_of: dict[ClientId, str] = {}
        self._transfers: dict[int, tuple[str, int]] = {}  # global id -> (partition, manager's id)
        self._ids = itertools.count(1)

    def load_predictor_state(self, state: Mapping[str, Any]) -> None:
        """Statistics every tenant's predictor, in every partition, starts from (a warm start)."""
        for manager in self._managers.values():
            if manager.prefetcher is not None:
                manager.prefetcher.load_state(state)

    @property
    def partitioned(self) -> bool:
        return len(self._managers) > 1

    def route(self, client: ClientId) -> tuple[str, CacheManager]:
        """The client's partition and its manager (whose commands go through `out`)."""
        partition = self._partition_of.get(client, SHARED_POOL)
        return partition, self._managers[partition]

    def out(self, partition: str, commands: list[Command]) -> list[Command]:
        """Commands with global slot numbers and engine-wide transfer ids."""
        if not self.partitioned:
            return commands
        base = self._base[partition]
        out: list[Command] = []
        for command in commands:
            if isinstance(command, StartTransfer):
                global_id = next(self._ids)
                self._transfers[global_id] = (partition, command.transfer_id)
                src = None if command.src_slot is None else command.src_slot + base["host"]
                dst = command.dst_slot + base[TIER_OF_LINK[command.link]]
                command = dataclasses.replace(command, transfer_id=global_id, src_slot=src, dst_slot=dst)
            elif isinstance(command, Reply):
                slots = tuple(slot + base[command.tier] for slot in command.slots)
                command = dataclasses.replace(command, slots=slots)
            out.append(command)
        return out

    # --- events every manager sees, or whose manager only this class knows ------------------

    def set_tenant(self, client: ClientId, tenant: str, now: float, partition: str | None = None) -> None:
        partition = partition if partition in self._managers else SHARED_POOL
        self._partition_of[client] = partition
        self._managers[partition].set_tenant(client, tenant, now)

    def settle(self, client: ClientId | None = None) -> list[Command]:
        out: list[Command] = []
        for partition, manager in self._managers.items():
            out += self.out(partition, manager.settle())
        return out

    def client_gone(self, client: ClientId) -> list[Command]:
        partition, manager = self.route(client)
        self._partition_of.pop(client, None)
        return self.out(partition, manager.client_gone(client))

    def tick(self, now: float) -> list[Command]:
        out: list[Command] = []
        for partition, manager in self._managers.items():
            out += self.out(partition, manager.tick(now))
        return out

    def transfer_done(self, transfer_id: int, ok: bool, error: str = "") -> list[Command]:
        if not self.partitioned:
            return self.shared.transfer_done(transfer_id, ok, error)
        partition, local_id = self._transfers.pop(transfer_id)
        return self.out(partition, self._managers[partition].transfer_done(local_id, ok, error))

    def client_summary(self) -> dict[ClientId, tuple[int, int]]:
        out: dict[ClientId, tuple[int, int]] = {}
        for manager in self._managers.values():
            out.update(manager.client_summary())
        return out

    def stats(self) -> dict[str, Any]:
        """The shared pool's counters, summed with every partition's; each partition's alone too."""
        if not self.partitioned:
            return self.shared.stats()
        per = {name or "shared": m.stats() for name, m in self._managers.items()}
        total = _sum_stats([per["shared"], *(s for name, s in per.items() if name != "shared")])
        total["partitions"] = {name: s["tiers"] for name, s in per.items()}
        return total


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters added up (rates recomputed); anything else from the first."""

    def add(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: add([v[k] for v in values if k in v]) for k in first}
        if isinstance(first, list):
            return [add(list(column)) for column in zip(*values, strict=True)]
        if isinstance(first, int | float) and not isinstance(first, bool):
            return sum(values)
        return first

    total = add(stats)
    for tier in total["tiers"].values():
        tier["hit_rate"] = tier["hits"] / tier["accesses"] if tier["accesses"] else 0.0
    if "precision" in total.get("prefetch", {}):
        total["prefetch"]["precision"] = stats[0]["prefetch"]["precision"]  # not additive: the shared pool's
        total["prefetch"]["recall"] = stats[0]["prefetch"]["recall"]
    return total
