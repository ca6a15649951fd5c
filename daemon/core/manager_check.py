"""Everything an acquire is checked for before the cache manager admits it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from expertd.daemon.core.events import TIERS, ClientId
from expertd.daemon.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from expertd.daemon.core.manager import CacheManager


def check_acquire(
    manager: CacheManager,
    client: ClientId,
    request_id: int,
    layer: int,
    experts: Sequence[int],
    tier: str,
) -> tuple[str, str] | None:
    """The error code and message an acquire is refused with; None: it may proceed."""
    if tier not in manager.tiers:
        if tier in TIERS:
            return ErrorCode.TIER_OFF, f"tier {tier!r} is off in this daemon"
        return ErrorCode.BAD_REQUEST, f"unknown tier {tier!r} (known: {', '.join(TIERS)})"
    if not 0 <= layer < manager.geometry.num_layers:
        return (
            ErrorCode.OUT_OF_RANGE,
            f"layer {layer} out of range [0, {manager.geometry.num_layers})",
        )
    if not experts:
        return ErrorCode.BAD_REQUEST, "acquire needs at least one expert"
    for expert in experts:
        if not 0 <= expert < manager.geometry.num_experts:
            return (
                ErrorCode.OUT_OF_RANGE,
                f"expert {expert} out of range [0, {manager.geometry.num_experts})",
            )
    if len(set(experts)) != len(experts):
        return ErrorCode.BAD_REQUEST, f"duplicate experts in {list(experts)}"
    slots = manager.tiers[tier].num_slots
    if len(experts) > slots:
        return (
            ErrorCode.TOO_MANY_EXPERTS,
            f"{len(experts)} experts do not fit the {tier} tier's {slots} slots",
        )
    if (client, request_id) in manager._pending:
        return ErrorCode.BAD_REQUEST, f"request id {request_id} is already pending"
    if len(manager._clients[client].pending) >= manager.config.max_pending_per_client:
        return (
            ErrorCode.TOO_MANY_PENDING,
            f"more than {manager.config.max_pending_per_client} acquires pending",
        )
    return None


MAX_TOKENS = 1 << 20  # tokens one pass may route to one expert


def check_tokens(tokens: int | Sequence[int], experts: Sequence[int]) -> tuple[str, str] | None:
    """The error an acquire's token counts (one for all, or one per expert) are refused with."""
    counts = [tokens] if isinstance(tokens, int) else list(tokens)
    if not isinstance(tokens, int) and len(counts) != len(experts):
        return ErrorCode.BAD_REQUEST, f"{len(counts)} token counts for {len(experts)} experts"
    for count in counts:
        if type(count) is not int or not 1 <= count <= MAX_TOKENS:
            return ErrorCode.BAD_REQUEST, f"token count {count!r} is not an integer in [1, {MAX_TOKENS}]"
    return None
