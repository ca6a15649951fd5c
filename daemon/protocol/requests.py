"""Requests: their shapes, and the daemon's validating decoder.

Every request is untrusted: `decode_request` bounds the frame size, every
container length and every integer, rejects unknown ops and unknown fields, and
raises `ProtocolError` naming what is wrong.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any, ClassVar

from expertd.daemon.protocol.errors import ProtocolError
from expertd.daemon.protocol.wire import (
    AUTO_TIER,
    MAX_EXPERTS_PER_MESSAGE,
    MAX_INDEX,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_RELEASES_PER_ACQUIRE,
    MAX_REQUEST_ID,
    MAX_TOKENS_PER_EXPERT,
    is_int,
    pack,
    unpack,
)


class Op(StrEnum):
    HELLO = "hello"
    ACQUIRE = "acquire"
    RELEASE = "release"
    HINT = "hint"
    STATS = "stats"
    PING = "ping"
    BYE = "bye"
    END = "end"
    SHUTDOWN = "shutdown"
    LOAD_STATE = "load_state"
    REPORT = "report"


# --- request shapes --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hello:
    """First message of a session: who the client is. Answered with `HelloReply` fields."""

    op: ClassVar[Op] = Op.HELLO
    version: int
    client: str
    tenant: str = "default"
    pid: int = 0
    token: str | None = None  # the admin token, for admin operations over ipc://


@dataclasses.dataclass(frozen=True)
class Acquire:
    """Pin ``experts`` of ``layer`` in ``tier``; ``release`` piggy-backs finished leases.

    Carried leases the daemon no longer knows (expired, say) are ignored: they are gone.
    ``tier="auto"`` (protocol 3) lets the daemon place each expert: the reply's ``places``
    says, per expert, the tier whose slot the client computes it from (the device, or the
    host's read-only view on the CPU); ``tokens[i]`` is how many tokens are routed to the
    i-th expert (a prefill's experts belong on the device; absent: one each).
    """

    op: ClassVar[Op] = Op.ACQUIRE
    layer: int
    experts: list[int]
    tier: str
    release: list[int] = dataclasses.field(default_factory=list)
    generation: int | None = None  # which of the client's generations (predictors keep history per one)
    tokens: list[int] | None = None  # tier "auto" only: tokens routed to each expert


@dataclasses.dataclass(frozen=True)
class Release:
    """Release ``leases`` now; the reply lists the ones this client did not hold."""

    op: ClassVar[Op] = Op.RELEASE
    leases: list[int]


@dataclasses.dataclass(frozen=True)
class Hint:
    """The client expects ``experts`` of ``layer`` soon (best first); prefetch them."""

    op: ClassVar[Op] = Op.HINT
    layer: int
    experts: list[int]
    scores: list[float] | None = None
    generation: int | None = None


@dataclasses.dataclass(frozen=True)
class End:
    """The client's ``generation`` is over: the daemon drops its routing history. No reply."""

    op: ClassVar[Op] = Op.END
    generation: int


@dataclasses.dataclass(frozen=True)
class Stats:
    op: ClassVar[Op] = Op.STATS


@dataclasses.dataclass(frozen=True)
class Ping:
    """Heartbeat: keeps this client's leases alive. No reply unless ``reply`` is set."""

    op: ClassVar[Op] = Op.PING
    reply: bool = False


@dataclasses.dataclass(frozen=True)
class Bye:
    """The client is leaving: release its leases now. No reply."""

    op: ClassVar[Op] = Op.BYE


@dataclasses.dataclass(frozen=True)
class Shutdown:
    op: ClassVar[Op] = Op.SHUTDOWN


@dataclasses.dataclass(frozen=True)
class LoadState:
    """Admin: every tenant's predictor starts from the statistics in ``path`` (a file on the
    daemon's machine, written by `expertd replay --save-state`), as ``[prefetch] state`` does
    at start: the learned statistics of existing tenants are replaced, and tenants that come
    later start from them too."""

    op: ClassVar[Op] = Op.LOAD_STATE
    path: str


@dataclasses.dataclass(frozen=True)
class Report:
    """Hits a client served itself from shared memory, and their releases, in order. No reply.

    ``events``: ``[fast_id, layer, tier, experts, slots, generation]`` for a hit (generation
    None: none), ``[fast_id]`` for the release of an earlier hit. ``seq`` numbers a session's
    reports from 1, so the daemon can tell one went missing.
    """

    op: ClassVar[Op] = Op.REPORT
    seq: int
    events: list[list[Any]]


Request = Hello | Acquire | Release | Hint | Stats | Ping | Bye | End | Shutdown | LoadState | Report
REQUEST_TYPES: dict[str, type] = {
    cls.op.value: cls
    for cls in (Hello, Acquire, Release, Hint, Stats, Ping, Bye, End, Shutdown, LoadState, Report)
}
#: Ops the daemon does not answer (fire and forget).
NO_REPLY = frozenset({Op.PING, Op.BYE, Op.HINT, Op.END, Op.REPORT})
MAX_REPORT_EVENTS = 256  # a client sends its report before it holds more


# --- encoding ----------------------------------------------------------------------------------


def encode_request(request_id: int, request: Request) -> bytes:
    """One request frame."""
    body = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    body = {k: v for k, v in body.items() if v is not None}
    return pack({"op": request.op.value, "id": request_id, **body})


def request_id_of(frame: bytes) -> int:
    """Best effort: the ``id`` of a frame that failed to decode (0 if there is none)."""
    try:
        message = unpack(frame, "request")
    except ProtocolError:
        return 0
    if isinstance(message, dict):
        rid = message.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_REQUEST_ID:
            return rid
    return 0


def decode_request(frame: bytes) -> tuple[int, Request]:
    """Validate one request frame: ``(id, request)``, or `ProtocolError` naming the problem."""
    message = unpack(frame, "request")
    if type(message) is not dict:
        raise ProtocolError(f"request must be a map, got {type(message).__name__}")
    op = message.get("op")
    shape = _SHAPES.get(op) if type(op) is str else None
    if shape is None:
        raise ProtocolError(f"unknown op {op!r:.40} (known: {', '.join(REQUEST_TYPES)})")
    request_id = message.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"{op}: id must be a non-negative integer, got {request_id!r:.40}")
    if op == "acquire":
        fast = _acquire_fast(message)
        if fast is not None:
            return request_id, fast
    cls, names, checks, required = shape
    if len(message) - 2 > len(names) or not message.keys() - _ENVELOPE <= names:
        unknown = sorted(map(str, message.keys() - _ENVELOPE - names))
        raise ProtocolError(f"{op}: unknown field(s) {', '.join(unknown)[:80]}")
    values = {name: check(op, name, message[name]) for name, check in checks if name in message}
    if len(values) < len(required) and not required <= values.keys():
        raise ProtocolError(f"{op}: missing field(s) {', '.join(sorted(required - values.keys()))}")
    request = cls(**values)
    if op == "acquire":
        _check_tokens(request)
    return request_id, request


# --- field checks ----------------------------------------------------------------------------


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _index(op: str, name: str, value: object) -> int:
    if not is_int(value) or not 0 <= value <= MAX_INDEX:  # type: ignore[operator]
        raise ProtocolError(f"{op}: {name} must be an integer in [0, {MAX_INDEX}], got {value!r:.40}")
    return value  # type: ignore[return-value]


def _lease(op: str, name: str, value: object) -> int:
    if not is_int(value) or not 0 <= value <= MAX_REQUEST_ID:  # type: ignore[operator]
        raise ProtocolError(f"{op}: {name} must be a lease id, got {value!r:.40}")
    return value  # type: ignore[return-value]


def _index_list(limit: int, element=_index):
    high = MAX_INDEX if element is _index else MAX_REQUEST_ID

    def check(op: str, name: str, value: object) -> list[int]:
        if _ids_ok(value, limit, high):
            return value  # type: ignore[return-value]  # the common case, checked in C loops
        if not isinstance(value, list):
            raise ProtocolError(f"{op}: {name} must be a list, got {type(value).__name__}")
        if len(value) > limit:
            raise ProtocolError(f"{op}: {name} has {len(value)} entries; at most {limit}")
        return [element(op, f"{name}[{i}]", v) for i, v in enumerate(value)]

    return check


def _name(op: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
        raise ProtocolError(f"{op}: {name} must be 1-{MAX_NAME_CHARS} printable characters")
    return value


def _path(op: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH_CHARS or not value.isprintable():
        raise ProtocolError(f"{op}: {name} must be 1-{MAX_PATH_CHARS} printable characters")
    if not value.startswith("/"):
        raise ProtocolError(f"{op}: {name} must be an absolute path, got {value!r:.80}")
    return value


def _scores(op: str, name: str, value: object) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_EXPERTS_PER_MESSAGE:
        raise ProtocolError(f"{op}: {name} must be a list of at most {MAX_EXPERTS_PER_MESSAGE} numbers")
    out = []
    for v in value:
        if not isinstance(v, int | float) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
            raise ProtocolError(f"{op}: {name} must hold finite numbers, got {v!r:.40}")
        out.append(float(v))
    return out


def _token_counts(op: str, name: str, value: object) -> list[int] | None:
    if value is None:
        return None
    if _ids_ok(value, MAX_EXPERTS_PER_MESSAGE, MAX_TOKENS_PER_EXPERT) and 0 not in value:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    if not isinstance(value, list) or len(value) > MAX_EXPERTS_PER_MESSAGE:
        raise ProtocolError(f"{op}: {name} must be a list of at most {MAX_EXPERTS_PER_MESSAGE} counts")
    for i, v in enumerate(value):
        if not is_int(v) or not 1 <= v <= MAX_TOKENS_PER_EXPERT:
            raise ProtocolError(
                f"{op}: {name}[{i}] must be a token count in [1, {MAX_TOKENS_PER_EXPERT}], got {v!r:.40}"
            )
    return value


def _check_tokens(request: Acquire) -> None:
    """``tokens`` goes with tier "auto" only, one count per expert."""
    if request.tokens is None:
        return
    if request.tier != AUTO_TIER:
        raise ProtocolError(f"acquire: tokens is for tier {AUTO_TIER!r} only, not {request.tier!r:.40}")
    if len(request.tokens) != len(request.experts):
        raise ProtocolError(
            f"acquire: tokens has {len(request.tokens)} counts for {len(request.experts)} experts"
        )


def _flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{op}: {name} must be true or false, got {value!r:.40}")
    return value


def _optional(check):
    def optional(op: str, name: str, value: object):
        return None if value is None else check(op, name, value)

    return optional


def _events(op: str, name: str, value: object) -> list[list[Any]]:
    if type(value) is not list or len(value) > MAX_REPORT_EVENTS:
        raise ProtocolError(f"{op}: {name} must be a list of at most {MAX_REPORT_EVENTS} events")
    ids = _index_list(MAX_EXPERTS_PER_MESSAGE)
    for i, event in enumerate(value):
        where = f"{name}[{i}]"
        if type(event) is not list or len(event) not in (1, 6):
            raise ProtocolError(
                f"{op}: {where} must be [id] or [id, layer, tier, experts, slots, generation]"
            )
        _lease(op, where, event[0])
        if len(event) == 6:
            _index(op, f"{where} layer", event[1])
            _name(op, f"{where} tier", event[2])
            experts, slots = ids(op, f"{where} experts", event[3]), ids(op, f"{where} slots", event[4])
            if len(experts) != len(slots) or not experts:
                raise ProtocolError(f"{op}: {where} needs as many slots as experts, at least one")
            _optional(_lease)(op, f"{where} generation", event[5])
    return value


_ENVELOPE = frozenset({"op", "id"})
_CHECKS = {
    ("hello", "version"): _index,
    ("hello", "client"): _name,
    ("hello", "tenant"): _name,
    ("hello", "pid"): _index,
    ("hello", "token"): _optional(_name),
    ("acquire", "layer"): _index,
    ("acquire", "experts"): _index_list(MAX_EXPERTS_PER_MESSAGE),
    ("acquire", "tier"): _name,
    ("acquire", "release"): _index_list(MAX_RELEASES_PER_ACQUIRE, _lease),
    ("acquire", "generation"): _optional(_lease),
    ("acquire", "tokens"): _token_counts,
    ("hint", "generation"): _optional(_lease),
    ("end", "generation"): _lease,
    ("release", "leases"): _index_list(MAX_RELEASES_PER_ACQUIRE, _lease),
    ("hint", "layer"): _index,
    ("hint", "experts"): _index_list(MAX_EXPERTS_PER_MESSAGE),
    ("hint", "scores"): _scores,
    ("ping", "reply"): _flag,
    ("load_state", "path"): _path,
    ("report", "seq"): _lease,
    ("report", "events"): _events,
}


def _shape(cls: Any) -> tuple[type, frozenset[str], tuple, frozenset[str]]:
    fields = dataclasses.fields(cls)
    names = frozenset(f.name for f in fields)
    checks = tuple((f.name, _CHECKS[(cls.op.value, f.name)]) for f in fields)
    return cls, names, checks, frozenset(f.name for f in fields if _required(f))


# op -> (class, field names, (name, check) pairs, required names): decoding does no reflection.
_SHAPES = {op: _shape(cls) for op, cls in REQUEST_TYPES.items()}
_ACQUIRE_KEYS = frozenset({"op", "id", "layer", "experts", "tier", "release", "generation"})


def _ids_ok(values: object, limit: int, high: int) -> bool:
    return (
        type(values) is list
        and len(values) <= limit
        and all(type(v) is int for v in values)
        and (not values or (min(values) >= 0 and max(values) <= high))
    )


def _acquire_fast(message: dict) -> Acquire | None:
    """The hot path: a well-formed acquire, checked in a few C loops; None: take the slow path."""
    layer, experts, tier = message.get("layer"), message.get("experts"), message.get("tier")
    release = message.get("release", [])
    generation = message.get("generation")
    if (
        message.keys() <= _ACQUIRE_KEYS
        and type(layer) is int
        and 0 <= layer <= MAX_INDEX
        and _ids_ok(experts, MAX_EXPERTS_PER_MESSAGE, MAX_INDEX)
        and type(tier) is str
        and 0 < len(tier) <= MAX_NAME_CHARS
        and tier.isprintable()
        and _ids_ok(release, MAX_RELEASES_PER_ACQUIRE, MAX_REQUEST_ID)
        and (generation is None or (type(generation) is int and 0 <= generation <= MAX_REQUEST_ID))
    ):
        return Acquire(layer, experts, tier, release, generation)  # type: ignore[arg-type]  # checked above
    return None
