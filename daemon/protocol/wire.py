"""Framing shared by requests and replies: protocol version, bounds, bounded msgpack decoding."""

from __future__ import annotations

from typing import Any

import msgpack

from expertd.daemon.protocol.errors import ProtocolError

#: 2: typed replies (stats under ``stats``, pong/done shapes), ``generation`` instead of ``request``.
#: 3: ``tier="auto"`` acquires (with ``tokens``) answered with per-expert ``places``; ``report``
#:    (hits served from shared memory) and the tiers' ``fast`` handles in the hello reply.
PROTOCOL_VERSION = 3
#: What a daemon of this version still serves: a version-2 client never asks for tier "auto"
#: and gets no shared-memory hits.
SUPPORTED_VERSIONS = (2, 3)
AUTO_PROTOCOL = 3  # the first version with tier "auto" (and its per-expert places)
FAST_PROTOCOL = 3  # the first version with shared-memory hits (reports, the tiers' fast handles)
AUTO_TIER = "auto"  # an acquire that lets the daemon place each expert (device or host)
MAX_TOKENS_PER_EXPERT = 2**20  # tokens one acquire may route to one expert (a long prefill)
MAX_MESSAGE_BYTES = 64 * 1024  # no valid request comes near this
MAX_EXPERTS_PER_MESSAGE = 1024
MAX_RELEASES_PER_ACQUIRE = 64
MAX_NAME_CHARS = 128
MAX_PATH_CHARS = 4096  # load_state: a file on the daemon's machine
MAX_REQUEST_ID = 2**63 - 1
MAX_INDEX = 2**31 - 1
MAX_REPLY_BYTES = 64 * 1024 * 1024  # replies come from the daemon; bounded all the same


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes, what: str, limit: int = MAX_MESSAGE_BYTES) -> Any:
    """One msgpack frame, every length bounded; `ProtocolError` for anything else."""
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


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
