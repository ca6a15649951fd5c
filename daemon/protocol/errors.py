"""Every error code of the wire protocol, and the exception class a client raises for each."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an error reply; the core's `ErrorReply` uses the same codes."""

    INTERNAL = "internal"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    NO_SESSION = "no_session"
    OUT_OF_RANGE = "out_of_range"
    TIER_OFF = "tier_off"
    TOO_MANY_EXPERTS = "too_many_experts"
    TOO_MANY_PENDING = "too_many_pending"
    TOO_MANY_CLIENTS = "too_many_clients"
    CAPACITY = "capacity"
    UNKNOWN_LEASE = "unknown_lease"
    LOAD_FAILED = "load_failed"
    FORBIDDEN = "forbidden"
    SHUTTING_DOWN = "shutting_down"
    UNAVAILABLE = "unavailable"
    UNTRUSTED_SOCKET = "untrusted_socket"  # raised by a client before it connects, never sent


class ExpertdError(Exception):
    """Base of every error expertd reports to a client."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DaemonUnavailable(ExpertdError):
    """The daemon did not answer in time, or is not running at that address."""

    code = ErrorCode.UNAVAILABLE


class ProtocolError(ExpertdError):
    """A message broke the protocol (shape, types, bounds, version, unknown op)."""

    code = ErrorCode.BAD_REQUEST


class SessionError(ExpertdError):
    """The daemon does not know this client (it restarted): say hello again."""

    code = ErrorCode.NO_SESSION


class RangeError(ExpertdError):
    """A layer or expert id outside the model."""

    code = ErrorCode.OUT_OF_RANGE


class CapacityError(ExpertdError):
    """The request cannot fit: tier off, too many experts, too many pending acquires."""

    code = ErrorCode.CAPACITY


class LeaseError(ExpertdError):
    """A lease this client does not hold."""

    code = ErrorCode.UNKNOWN_LEASE


class ExpertLoadError(ExpertdError):
    """An expert could not be loaded (I/O error, or its checksum did not match)."""

    code = ErrorCode.LOAD_FAILED


class PermissionDenied(ExpertdError):
    """This client may not do that (an admin operation)."""

    code = ErrorCode.FORBIDDEN


class UntrustedSocket(ExpertdError):
    """The ipc:// socket could have been put there by another local user: nothing was sent to it."""

    code = ErrorCode.UNTRUSTED_SOCKET


class ShuttingDown(ExpertdError):
    """The daemon is stopping and takes no new work."""

    code = ErrorCode.SHUTTING_DOWN


_ERROR_CLASSES: dict[str, type[ExpertdError]] = {
    ErrorCode.INTERNAL: ExpertdError,
    ErrorCode.BAD_REQUEST: ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolError,
    ErrorCode.NO_SESSION: SessionError,
    ErrorCode.OUT_OF_RANGE: RangeError,
    ErrorCode.TIER_OFF: CapacityError,
    ErrorCode.TOO_MANY_EXPERTS: CapacityError,
    ErrorCode.TOO_MANY_PENDING: CapacityError,
    ErrorCode.TOO_MANY_CLIENTS: CapacityError,
    ErrorCode.CAPACITY: CapacityError,
    ErrorCode.UNKNOWN_LEASE: LeaseError,
    ErrorCode.LOAD_FAILED: ExpertLoadError,
    ErrorCode.FORBIDDEN: PermissionDenied,
    ErrorCode.SHUTTING_DOWN: ShuttingDown,
    ErrorCode.UNAVAILABLE: DaemonUnavailable,
    ErrorCode.UNTRUSTED_SOCKET: UntrustedSocket,
}
assert _ERROR_CLASSES.keys() == set(ErrorCode), "every code maps to a class"


def error_class(code: str) -> type[ExpertdError]:
    """The exception class a client raises for an error reply with ``code``."""
    return _ERROR_CLASSES.get(code, ExpertdError)
