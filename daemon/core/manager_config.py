"""The cache manager's configuration, and the records it keeps per acquire, lease and client."""

from __future__ import annotations

import dataclasses

from expertd.daemon.core.events import ClientId
from expertd.daemon.core.placement import PlacementConfig
from expertd.daemon.core.prefetch import DEFAULT_TENANT, PrefetchConfig
from expertd.policies.base import Geometry


@dataclasses.dataclass(frozen=True)
class ManagerConfig:
    """Sizes and policies of the tiers; fixed for the manager's life."""

    geometry: Geometry
    host_slots: int
    device_slots: int = 0  # 0: no device tier (clients compute from host slots)
    host_policy: str = "lru"
    device_policy: str = "lru"
    load_depth: int = 4  # store reads in flight at once
    h2d_depth: int = 1  # host->device copies in flight at once
    lease_timeout_s: float = 30.0  # a client silent this long loses its leases
    max_pending_per_client: int = 16  # unanswered acquires a client may have
    max_queued_prefetches: int = 256  # per link; further prefetches are dropped
    expert_bytes: int = 0  # for byte counters only
    prefetch: PrefetchConfig = PrefetchConfig()  # predictor None: no prefetching
    max_pinned_share: float = 1.0  # most of a tier one client may pin (leased or asked for; 1: no cap)...
    min_pinned: int = 1  # ...but never less than this (one layer's top-k)
    capacity_wait_s: float = float("inf")  # an acquire not admitted this long is refused, naming why
    placement: PlacementConfig = PlacementConfig()  # how `auto` acquires place experts (host_gbps 0: device)

    def pin_cap(self, slots: int) -> int:
        """Slots of a tier of ``slots`` one client may pin at once, counting its waiting acquires."""
        if self.max_pinned_share >= 1.0:  # no cap: a client may even queue past the tier, waiting on itself
            return 1 << 62
        return min(slots, max(self.min_pinned, int(self.max_pinned_share * slots)))

    def __post_init__(self) -> None:
        if self.host_slots < 1:
            raise ValueError(f"host tier needs at least 1 slot, got {self.host_slots}")
        if self.device_slots < 0:
            raise ValueError(f"device_slots must be >= 0, got {self.device_slots}")
        for name in ("load_depth", "h2d_depth", "max_pending_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(eq=False)
class Pending:
    client: ClientId
    request_id: int
    tier: str
    keys: list[int]
    t0: int  # access time of keys[0]; keys[i] is access t0 + i
    forward: int  # the client's forward pass this acquire belongs to
    since: float = 0.0  # when it arrived
    admitted: bool = False
    pinned: dict[int, int] = dataclasses.field(default_factory=dict)  # key -> slot it pinned
    waiting: set[int] = dataclasses.field(default_factory=set)  # keys not ready yet
    hits: int = 0
    # An auto acquire: every key asked for, in order, and the host slots pinned for those
    # computed on the host (``keys`` holds only the device's).
    asked: list[int] | None = None
    host: dict[int, int] = dataclasses.field(default_factory=dict)
    times: list[int] | None = None  # access time of each of ``keys`` (None: t0, t0 + 1, ...)


@dataclasses.dataclass
class LeaseRecord:
    client: ClientId
    tier: str
    slots: list[int]
    host_slots: list[int] = dataclasses.field(default_factory=list)  # an auto lease's host-placed slots
    counted: bool = True  # counts against the client's pin cap (a reported fast-path hit does not)


@dataclasses.dataclass
class ClientState:
    last_seen: float
    tenant: str = DEFAULT_TENANT
    forward: int = -1  # this client's current forward pass (a global id)
    last_layer: int = 1 << 30
    leases: set[int] = dataclasses.field(default_factory=set)
    pending: set[int] = dataclasses.field(default_factory=set)  # request ids
    pins: dict[str, int] = dataclasses.field(default_factory=dict)  # tier -> slots leased or asked for
