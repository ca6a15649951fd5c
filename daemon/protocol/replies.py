"""Replies: one typed class per answer, built by the daemon and parsed by the client here only.

A reply frame is ``{id, ok}`` (``ok``: the reply's map) or ``{id, error: {code, message}}``.
The client parses every ``ok`` map into its class with `parse_reply`, which checks what a
client relies on and raises `ProtocolError` naming what is missing or malformed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from expertd.daemon.protocol.errors import ExpertdError, ProtocolError, error_class
from expertd.daemon.protocol.requests import Op
from expertd.daemon.protocol.tensors import TensorSpec, parse_layout
from expertd.daemon.protocol.wire import (
    MAX_REPLY_BYTES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    is_int,
    pack,
    unpack,
)


@dataclasses.dataclass(frozen=True)
class HelloReply:
    """The model, the slot layout and the tiers' shared memory a client maps."""

    protocol: int
    daemon: str
    model: str
    num_layers: int
    num_experts: int
    checkpoint_layers: tuple[int, ...]  # store layer i is checkpoint layer [i]
    dtype: str
    tensors: tuple[TensorSpec, ...]
    raw_bytes: int
    slot_bytes: int
    tiers: Mapping[str, Mapping[str, Any]]  # tier -> slab handle (`expertd.daemon.protocol.local`)
    default_tier: str
    heartbeat_s: float
    lease_timeout_s: float
    # how the store's tensors make the model's expert parameters (`expertd.daemon.protocol.families`);
    # None: a store packed before layouts were recorded, or an older daemon
    expert_layout: Mapping[str, Any] | None = None
    # protocol 3: the daemon's host compute figure for tier="auto" ({gbps, source, threads,
    # reader_threads}: the threads a client on this machine may compute host-placed experts on)
    host_compute: Mapping[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.host_compute is None:
            del out["host_compute"]  # a protocol-2 reply, as it was
        out["tensors"] = [t.to_json() for t in self.tensors]
        out["checkpoint_layers"] = list(self.checkpoint_layers)
        out["tiers"] = {tier: dict(handle) for tier, handle in self.tiers.items()}
        return out

    @classmethod
    def from_wire(cls, ok: Mapping[str, Any]) -> HelloReply:
        if (
            ok.get("protocol") not in SUPPORTED_VERSIONS
        ):  # first: a clear version error, whatever else differs
            raise ProtocolError(
                f"the daemon speaks protocol {ok.get('protocol')!r}, this client {PROTOCOL_VERSION}",
                "unsupported_version",
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in ok and f.name not in ("checkpoint_layers", "expert_layout", "host_compute")
        ]
        if missing:
            raise ProtocolError(f"hello reply lacks {', '.join(missing)}")
        try:
            slot_bytes = int(ok["slot_bytes"])
            tiers = ok["tiers"]
            if not isinstance(tiers, Mapping) or not all(isinstance(h, Mapping) for h in tiers.values()):
                raise TypeError("tiers must map tier names to slab handles")
            return cls(
                protocol=int(ok["protocol"]),
                daemon=str(ok["daemon"]),
                model=str(ok["model"]),
                num_layers=int(ok["num_layers"]),
                num_experts=int(ok["num_experts"]),
                checkpoint_layers=tuple(int(x) for x in ok.get("checkpoint_layers") or ()),
                dtype=str(ok["dtype"]),
                tensors=parse_layout(ok["tensors"], slot_bytes),
                raw_bytes=int(ok["raw_bytes"]),
                slot_bytes=slot_bytes,
                tiers={str(tier): dict(handle) for tier, handle in tiers.items()},
                default_tier=str(ok["default_tier"]),
                heartbeat_s=float(ok["heartbeat_s"]),
                lease_timeout_s=float(ok["lease_timeout_s"]),
                expert_layout=_optional_map(ok.get("expert_layout"), "expert_layout"),
                host_compute=_optional_map(ok.get("host_compute"), "host_compute"),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ProtocolError(f"hello reply is malformed ({type(exc).__name__}: {exc})") from None

    def model_key(self) -> tuple[Any, ...]:
        """What must not change across a daemon restart for a client's views to stay right."""
        return (self.model, self.num_layers, self.num_experts, self.tensors)


def _optional_map(value: Any, name: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a map or nil, not {type(value).__name__}")
    return None if value is None else dict(value)


@dataclasses.dataclass(frozen=True)
class LeaseReply:
    """An acquire is answered: ``slots[i]`` of ``tier`` holds the i-th expert until release.

    A ``tier="auto"`` acquire (protocol 3) is answered with ``tier`` "auto" and ``places[i]``,
    the tier whose slot ``slots[i]`` is: "device" (compute it there) or "host" (compute it on
    the CPU from the host slab's read-only view). Other acquires carry no ``places``.
    """

    lease: int
    tier: str
    slots: tuple[int, ...]
    hits: int = 0  # experts that were ready when the acquire was admitted
    places: tuple[str, ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        out = {"lease": self.lease, "tier": self.tier, "slots": list(self.slots), "hits": self.hits}
        if self.places is not None:
            out["places"] = list(self.places)
        return out

    def tier_of(self, i: int) -> str:
        """The tier whose slot ``slots[i]`` is."""
        return self.tier if self.places is None else self.places[i]

    @classmethod
    def from_wire(cls, ok: Mapping[str, Any]) -> LeaseReply:
        try:
            places = ok.get("places")
            reply = cls(
                int(ok["lease"]),
                str(ok["tier"]),
                tuple(int(s) for s in ok["slots"]),
                int(ok.get("hits", 0)),
                None if places is None else tuple(str(p) for p in places),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"acquire reply is malformed ({exc!r}): {dict(ok)!r:.200}") from None
        if reply.places is not None and len(reply.places) != len(reply.slots):
            raise ProtocolError(
                f"acquire reply has {len(reply.places)} places for {len(reply.slots)} slots: "
                f"{dict(ok)!r:.200}"
            )
        return reply


@dataclasses.dataclass(frozen=True)
class StatsReply:
    """The daemon's counters, a print-friendly map (its shape is for people and dashboards)."""

    counters: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return dict(self.counters)

    @classmethod
    def from_wire(cls, ok: Mapping[str, Any]) -> StatsReply:
        return cls(dict(ok))


@dataclasses.dataclass(frozen=True)
class LoadStateReply:
    """The statistics file the daemon's predictors now start from."""

    path: str

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path}

    @classmethod
    def from_wire(cls, ok: Mapping[str, Any]) -> LoadStateReply:
        return cls(str(ok.get("path", "")))


@dataclasses.dataclass(frozen=True)
class Pong:
    """A liveness probe (``ping`` with ``reply``) was answered."""

    def to_wire(self) -> dict[str, Any]:
        return {"pong": True}

    @classmethod
    def from_wire(cls, ok: Mapping[str, Any]) -> Pong:
        return cls()


@dataclasses.dataclass(frozen=True)
class Done:
    """Done, nothing to say (release, shutdown)."""

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, ok: Mapping[str, Any]) -> Done:
        return cls()


ReplyBody = HelloReply | LeaseReply | StatsReply | LoadStateReply | Pong | Done
#: The reply each answered op gets.
REPLY_TYPES: dict[Op, type[ReplyBody]] = {
    Op.HELLO: HelloReply,
    Op.ACQUIRE: LeaseReply,
    Op.RELEASE: Done,
    Op.STATS: StatsReply,
    Op.PING: Pong,
    Op.SHUTDOWN: Done,
    Op.LOAD_STATE: LoadStateReply,
}


def encode_reply(request_id: int, reply: ReplyBody | Mapping[str, Any]) -> bytes:
    """A reply frame; a raw map is for test daemons that must be able to send anything."""
    body = dict(reply) if isinstance(reply, Mapping) else reply.to_wire()
    return pack({"id": request_id, "ok": body})


def encode_error(request_id: int, code: str, message: str) -> bytes:
    return pack({"id": request_id, "error": {"code": str(code), "message": message}})


def decode_reply(frame: bytes) -> tuple[int, dict[str, Any] | ExpertdError]:
    """A reply frame: ``(id, ok-map)`` or ``(id, the error as an exception)``."""
    message = unpack(frame, "reply", MAX_REPLY_BYTES)
    if not isinstance(message, dict) or not is_int(message.get("id")):
        raise ProtocolError("reply must be a map with an integer id")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict):
            raise ProtocolError("reply error must be a map")
        code, text = str(error.get("code", "internal")), str(error.get("message", ""))
        return message["id"], error_class(code)(text, code)
    ok = message.get("ok")
    if not isinstance(ok, dict):
        raise ProtocolError("reply needs an ok map or an error")
    return message["id"], ok


def parse_reply(op: Op, ok: Mapping[str, Any]) -> ReplyBody:
    """The ``ok`` map of a reply to ``op``, as its class; `ProtocolError` if it is malformed."""
    return REPLY_TYPES[op].from_wire(ok)
