"""The server's side of ``tier="auto"`` acquires: who may ask, what the manager is told, and
the per-expert places the reply carries (the cost model itself is the core's)."""

from __future__ import annotations

from typing import Any

from expertd.daemon import protocol as proto
from expertd.daemon.core.events import AUTO, Reply
from expertd.daemon.service.calibration import HostCompute
from expertd.daemon.service.sessions import Session


def auto_refusal(request: proto.Acquire, session: Session, tenant: Any) -> tuple[str, str] | None:
    """The error an auto acquire gets from this session, or None (every other acquire: None);
    ``tenant``: the session's tenant's isolation (its ``isolation`` mode)."""
    if request.tier != proto.AUTO_TIER:
        return None
    if session.protocol < proto.AUTO_PROTOCOL:
        return (
            proto.ErrorCode.BAD_REQUEST,
            f"tier {proto.AUTO_TIER!r} needs protocol {proto.AUTO_PROTOCOL}; this session said hello "
            f"with {session.protocol}",
        )
    if tenant.isolation == "private":
        # A private tenant's replies are held back to its own cache's timing; host placement has
        # no such shadow yet, so its timing could tell what other tenants keep on the device.
        return (
            proto.ErrorCode.BAD_REQUEST,
            f"tier {proto.AUTO_TIER!r} is not offered to a private tenant (isolation = private): "
            "acquire tier 'device' or 'host'",
        )
    return None


def auto_arguments(request: proto.Acquire) -> dict[str, Any]:
    """The manager's extra arguments for ``request`` (none unless it is an auto acquire)."""
    if request.tier != proto.AUTO_TIER or not request.tokens:
        return {}
    return {"tokens": request.tokens}  # one count per expert, in ``experts`` order


def reply_places(reply: Reply) -> tuple[str, ...] | None:
    """Per expert, the tier whose slot an auto acquire's reply names; None for any other reply
    (its slots are all in ``reply.tier``, and its wire shape stays protocol 2's)."""
    return reply.placements if reply.tier == AUTO else None


def hello_host_compute(host: HostCompute | None, version: int) -> dict[str, Any] | None:
    """What a protocol-3 client learns at hello: the host figure, and the threads it may use."""
    if host is None or version < proto.AUTO_PROTOCOL:
        return None
    return {
        "gbps": host.gbps,
        "source": host.source,
        "threads": host.threads,
        "reader_threads": host.reader_threads,
    }
