"""`ChunkLeases`: one layer's experts for one forward pass, leased a chunk at a time.

Used when a pass routes to more experts of a layer than the tier holds (`expertd.client.hf`,
`expertd.client.vllm_plugin`): chunks are taken in order, the previous chunk's lease is
released as the next is taken, and the chunk after it is asked for at once, so it travels
while this one computes -- when two chunks fit what one client may pin (``limit``); else one at
a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from expertd.client.client import ExpertClient, Lease, PendingAcquire
from expertd.daemon.protocol import ExpertdError


class ChunkLeases:
    """The leases of ``chunks`` of ``layer``; ``first``: chunk 0's acquire if already sent;
    ``wait``: turns a pending acquire into its lease (default: `PendingAcquire.result`);
    ``limit``: the most slots this client may pin at once (the hello's ``max_pinned``);
    ``tokens``: expert -> tokens routed to it, sent with each chunk's acquire (tier "auto")."""

    def __init__(
        self,
        client: ExpertClient,
        layer: int,
        chunks: list[list[int]],
        tier: str,
        *,
        first: PendingAcquire | None = None,
        wait: Callable[[PendingAcquire], Lease] | None = None,
        limit: int | None = None,
        tokens: Mapping[int, int] | None = None,
    ) -> None:
        self.client, self.layer, self.chunks, self.tier = client, layer, chunks, tier
        self.tokens = tokens
        self.acquires = 0
        self.index = -1
        self._wait = wait or (lambda pending: pending.result())
        self._next = first
        self._lease: Lease | None = None
        widest = max((len(c) for c in chunks), default=0)
        self._ahead = limit is None or 2 * widest <= limit  # the daemon refuses pins past the limit

    def take(self, index: int) -> Lease:
        """Chunk ``index``'s lease (taken in order; the previous one is released)."""
        assert index == self.index + 1, f"chunks are taken in order: {index} after {self.index}"
        if self._lease is not None:
            self._lease.release()
        pending = self._next or self._acquire(index)
        self._next = None
        if self._ahead and index + 1 < len(self.chunks):
            self._next = self._acquire(index + 1)
        self._lease = self._wait(pending)
        self.acquires += 1
        self.index = index
        return self._lease

    def _acquire(self, index: int) -> PendingAcquire:
        chunk = self.chunks[index]
        counts = None if self.tokens is None else [self.tokens.get(e, 1) for e in chunk]
        return self.client.acquire_async(self.layer, chunk, self.tier, counts)

    def close(self) -> None:
        if self._lease is not None:
            self._lease.release()
        if self._next is not None:
            with contextlib.suppress(ExpertdError):  # never hide the error that brought us here
                self._next.result().release()
