"""expertd's Python binding: acquire experts as zero-copy torch views, and an MoE block using it."""

from expertd.client.client import ExpertClient, Lease, PendingAcquire
from expertd.client.moe import ClientExperts, MemoryExperts, MoEBlock, MoEConfig
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
    "ClientExperts",
    "DaemonUnavailable",
    "ExpertClient",
    "ExpertLoadError",
    "ExpertdError",
    "Lease",
    "LeaseError",
    "MemoryExperts",
    "MoEBlock",
    "MoEConfig",
    "PendingAcquire",
    "PermissionDenied",
    "ProtocolError",
    "RangeError",
    "SessionError",
    "ShuttingDown",
]
