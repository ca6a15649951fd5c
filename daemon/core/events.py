"""Names shared by the cache manager, its shells and the wire protocol: tiers, links,
priorities, and the commands the manager returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from enum import IntEnum

DEVICE = "device"
HOST = "host"
TIERS = (DEVICE, HOST)
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
    """An acquire is answered: ``slots[i]`` holds the i-th expert asked for until release."""

    client: ClientId
    request_id: int
    lease_id: int
    tier: str
    slots: tuple[int, ...]
    hits: int  # experts that were ready when the acquire was admitted


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
