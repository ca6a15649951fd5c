"""expertd's Python binding: acquire experts as zero-copy torch views, and an MoE block using it.

with ExpertClient() as client:                      # the default ipc:// address
    with client.acquire(layer, [3, 7]) as lease:    # pinned until the block ends
        w = lease[3]                                # {"w1": Tensor, ...}: read-only views
    pending = client.acquire_async(layer + 1, [1])  # ask early, compute, then .result()
"""

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
    UntrustedSocket,
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
    "UntrustedSocket",
]
