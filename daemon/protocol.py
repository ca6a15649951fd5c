"""The whole wire protocol between expertd and its clients, in one module.

Transport: a client DEALER socket talks to the daemon's ROUTER socket; each
message is one frame, a msgpack map (never pickle). Requests carry ``op`` and a
client-chosen ``id``; replies carry the same ``id`` and either ``ok`` (a map) or
``error`` (``{code, message}``). Expert weights never travel: replies name slots
of shared memory the client has mapped.

Every request is untrusted: `decode_request` bounds the frame size, every
container length and every integer, rejects unknown ops and unknown fields, and
raises `ProtocolError` naming what is wrong. Error codes map back to a fixed list
of exception classes (`error_class`), so a client raises the same error the
daemon meant.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # no valid request comes near this
MAX_EXPERTS_PER_MESSAGE = 1024
MAX_RELEASES_PER_ACQUIRE = 64
MAX_NAME_CHARS = 128
MAX_PATH_CHARS = 4096  # load_state: a file on the daemon's machine
MAX_REQUEST_ID = 2**63 - 1
MAX_INDEX = 2**31 - 1
MAX_REPLY_BYTES = 64 * 1024 * 1024  # replies come from the daemon; bounded all the same


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


# --- errors: one code per class, shared by the daemon and the client -------------------------


class ExpertdError(Exception):
    """Base of every error expertd reports to a client."""

    code: str = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DaemonUnavailable(ExpertdError):
    """The daemon did not answer in time, or is not running at that address."""

    code = "unavailable"


class ProtocolError(ExpertdError):
    """A message broke the protocol (shape, types, bounds, version, unknown op)."""

    code = "bad_request"


class SessionError(ExpertdError):
    """The daemon does not know this client (it restarted): say hello again."""

    code = "no_session"


class RangeError(ExpertdError):
    """A layer or expert id outside the model."""

    code = "out_of_range"


class CapacityError(ExpertdError):
    """The request cannot fit: tier off, too many experts, too many pending acquires."""

    code = "capacity"


class LeaseError(ExpertdError):
    """A lease this client does not hold."""

    code = "unknown_lease"


class ExpertLoadError(ExpertdError):
    """An expert could not be loaded (I/O error, or its checksum did not match)."""

    code = "load_failed"


class PermissionDenied(ExpertdError):
    """This client may not do that (an admin operation)."""

    code = "forbidden"


class UntrustedSocket(ExpertdError):
    """The ipc:// socket could have been put there by another local user: nothing was sent to it."""

    code = "untrusted_socket"


class ShuttingDown(ExpertdError):
    """The daemon is stopping and takes no new work."""

    code = "shutting_down"


_ERROR_CLASSES: dict[str, type[ExpertdError]] = {
    "bad_request": ProtocolError,
    "unsupported_version": ProtocolError,
    "no_session": SessionError,
    "out_of_range": RangeError,
    "tier_off": CapacityError,
    "too_many_experts": CapacityError,
    "too_many_pending": CapacityError,
    "too_many_clients": CapacityError,
    "capacity": CapacityError,
    "unknown_lease": LeaseError,
    "load_failed": ExpertLoadError,
    "forbidden": PermissionDenied,
    "shutting_down": ShuttingDown,
    "unavailable": DaemonUnavailable,
}


def error_class(code: str) -> type[ExpertdError]:
    """The exception class a client raises for an error reply with ``code``."""
    return _ERROR_CLASSES.get(code, ExpertdError)


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
    """

    op: ClassVar[Op] = Op.ACQUIRE
    layer: int
    experts: list[int]
    tier: str
    release: list[int] = dataclasses.field(default_factory=list)
    request: int | None = None  # which of the client's generations (predictors keep history per request)


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
    request: int | None = None


@dataclasses.dataclass(frozen=True)
class End:
    """The client's generation ``request`` is over: the daemon drops its routing history. No reply."""

    op: ClassVar[Op] = Op.END
    request: int


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


Request = Hello | Acquire | Release | Hint | Stats | Ping | Bye | End | Shutdown | LoadState
REQUEST_TYPES: dict[str, type] = {
    cls.op.value: cls for cls in (Hello, Acquire, Release, Hint, Stats, Ping, Bye, End, Shutdown, LoadState)
}
#: Ops the daemon does not answer (fire and forget).
NO_REPLY = frozenset({Op.PING, Op.BYE, Op.HINT, Op.END})


# --- encoding ----------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def encode_request(request_id: int, request: Request) -> bytes:
    """One request frame."""
    body = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    body = {k: v for k, v in body.items() if v is not None}
    return msgpack.packb({"op": request.op.value, "id": request_id, **body}, use_bin_type=True)


def encode_reply(request_id: int, ok: dict[str, Any]) -> bytes:
    return msgpack.packb({"id": request_id, "ok": ok}, use_bin_type=True)


def encode_error(request_id: int, code: str, message: str) -> bytes:
    return msgpack.packb({"id": request_id, "error": {"code": code, "message": message}}, use_bin_type=True)


def _unpack(frame: bytes, what: str, limit: int = MAX_MESSAGE_BYTES) -> Any:
    if len(frame) > limit:
        raise ProtocolError(f"{what} of {len(frame)} bytes exceeds the {limit}-byte limit")
    request = limit == MAX_MESSAGE_BYTES
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=MAX_EXPERTS_PER_MESSAGE if request else limit,
            max_map_len=64 if request else limit,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ProtocolError(f"{what} is not valid msgpack ({detail})") from None


def request_id_of(frame: bytes) -> int:
    """Best effort: the ``id`` of a frame that failed to decode (0 if there is none)."""
    try:
        message = _unpack(frame, "request")
    except ProtocolError:
        return 0
    if isinstance(message, dict):
        rid = message.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_REQUEST_ID:
            return rid
    return 0


def decode_request(frame: bytes) -> tuple[int, Request]:
    """Validate one request frame: ``(id, request)``, or `ProtocolError` naming the problem."""
    message = _unpack(frame, "request")
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
    return request_id, cls(**values)


def decode_reply(frame: bytes) -> tuple[int, dict[str, Any] | ExpertdError]:
    """A reply frame: ``(id, ok-map)`` or ``(id, the error as an exception)``."""
    message = _unpack(frame, "reply", MAX_REPLY_BYTES)
    if not isinstance(message, dict) or not _is_int(message.get("id")):
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


# --- field checks ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _index(op: str, name: str, value: object) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_INDEX:  # type: ignore[operator]
        raise ProtocolError(f"{op}: {name} must be an integer in [0, {MAX_INDEX}], got {value!r:.40}")
    return value  # type: ignore[return-value]


def _lease(op: str, name: str, value: object) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_REQUEST_ID:  # type: ignore[operator]
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


def _flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{op}: {name} must be true or false, got {value!r:.40}")
    return value


def _optional(check):
    def optional(op: str, name: str, value: object):
        return None if value is None else check(op, name, value)

    return optional


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
    ("acquire", "request"): _optional(_lease),
    ("hint", "request"): _optional(_lease),
    ("end", "request"): _lease,
    ("release", "leases"): _index_list(MAX_RELEASES_PER_ACQUIRE, _lease),
    ("hint", "layer"): _index,
    ("hint", "experts"): _index_list(MAX_EXPERTS_PER_MESSAGE),
    ("hint", "scores"): _scores,
    ("ping", "reply"): _flag,
    ("load_state", "path"): _path,
}


def _shape(cls: Any) -> tuple[type, frozenset[str], tuple, frozenset[str]]:
    fields = dataclasses.fields(cls)
    names = frozenset(f.name for f in fields)
    checks = tuple((f.name, _CHECKS[(cls.op.value, f.name)]) for f in fields)
    return cls, names, checks, frozenset(f.name for f in fields if _required(f))


# op -> (class, field names, (name, check) pairs, required names): decoding does no reflection.
_SHAPES = {op: _shape(cls) for op, cls in REQUEST_TYPES.items()}
_ACQUIRE_KEYS = frozenset({"op", "id", "layer", "experts", "tier", "release", "request"})


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
    request = message.get("request")
    if (
        message.keys() <= _ACQUIRE_KEYS
        and type(layer) is int
        and 0 <= layer <= MAX_INDEX
        and _ids_ok(experts, MAX_EXPERTS_PER_MESSAGE, MAX_INDEX)
        and type(tier) is str
        and 0 < len(tier) <= MAX_NAME_CHARS
        and tier.isprintable()
        and _ids_ok(release, MAX_RELEASES_PER_ACQUIRE, MAX_REQUEST_ID)
        and (request is None or (type(request) is int and 0 <= request <= MAX_REQUEST_ID))
    ):
        return Acquire(layer, experts, tier, release, request)  # type: ignore[arg-type]  # checked above
    return None
