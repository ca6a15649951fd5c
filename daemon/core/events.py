"""Names shared by the cache manager, its shells and the wire protocol: tiers, links,
priorities, and the commands the manager returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from enum import IntEnum

DEVICE = "device"
HOST = "host"
TIERS = (DEVICE, HOST)
AUTO = "auto"  # an acquire's tier: the manager places each expert (device slot or host slot)
LOAD = "load"  # store -> host slot
H2D = "h2d"  # host slot -> device slot
LINKS = (LOAD, H2D)
LINK_INTO = {HOST: LOAD, DEVICE: H2D}
TIER_OF_LINK = {LOAD: HOST, H2D: DEVICE}

ClientId = Hashable


class Priority(IntEnum):
    """Transfer priority: lower runs first. Demand loads never wait behind prefetches."""

    DEMAND = 0
    HINT = 1
    PREDICTED = 2


@dataclasses.dataclass(frozen=True)
class StartTransfer:
    """Move expert ``key`` over ``link`` into ``dst_slot`` (``src_slot``: host slot, for h2d)."""

    transfer_id: int
    link: str
    key: int
    src_slot: int | None
    dst_slot: int
    priority: Priority


@dataclasses.dataclass(frozen=True)
class Reply:
    """An acquire is answered: ``slots[i]`` holds the i-th expert asked for until release.

    ``placements[i]``: the tier of ``slots[i]`` (`DEVICE` or `HOST`), where the client computes
    that expert; for a device or host acquire every entry is ``tier``. ``tier``: the tier asked
    for (`AUTO` for an auto acquire, whatever its placements).
    """

    client: ClientId
    request_id: int
    lease_id: int
    tier: str
    slots: tuple[int, ...]
    hits: int  # experts that were ready on the device (their tier) when the acquire was admitted
    placements: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.placements:  # a one-tier reply
            object.__setattr__(self, "placements", (self.tier,) * len(self.slots))

    @property
    def host_computed(self) -> int:
        """Experts the client computes from host slots."""
        return sum(1 for p in self.placements if p == HOST)


@dataclasses.dataclass(frozen=True)
class ErrorReply:
    """An event from a client failed; ``code`` is one of the wire contract's `ErrorCode`."""

    client: ClientId
    request_id: int
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class Predict:
    """Learn from an acquire that was answered at once, and prefetch from what it teaches.

    The hit path returns this after its `Reply`, so that a shell sends the reply first and
    then hands this back (`CacheManager.predict`): the prediction work is off the critical
    path, and the manager's state afterwards is what it would have been had the acquire
    done the work itself.
    """

    client: ClientId
    generation: Hashable
    layer: int
    experts: tuple[int, ...]


Command = StartTransfer | Reply | ErrorReply | Predict
