"""expertd's Python binding: acquire experts as zero-copy torch views."""

from expertd.client.client import ExpertClient, Lease, PendingAcquire
from expertd.daemon.protocol import (
    CapacityError,
    DaemonUnavailable,
    ExpertdError,
    ExpertLoadError,
    LeaseError,
    PermissionDenied,
    ProtocolError,
    RangeError,
    SessionError,
    ShuttingDown,
)

__all__ = [
    "CapacityError",
    "DaemonUnavailable",
    "ExpertClient",
    "ExpertLoadError",
    "ExpertdError",
    "Lease",
    "LeaseError",
    "PendingAcquire",
    "PermissionDenied",
    "ProtocolError",
    "RangeError",
    "SessionError",
    "ShuttingDown",
]
