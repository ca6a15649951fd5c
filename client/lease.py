"""`Lease` and `PendingAcquire`: what `ExpertClient.acquire` and `acquire_async` hand out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from expertd.client.views import SlabViews
from expertd.daemon.protocol import Acquire, ExpertdError, LeaseError, SessionError

if TYPE_CHECKING:
    from expertd.client.client import ExpertClient


class Lease:
    """Experts of one layer pinned in one tier until released; gives their tensors as views.

    The views are immutable: host and cpu slabs are mapped read-only (a write faults), and
    a CUDA slab is shared with every client. A lease is a context manager that releases.
    """

    def __init__(
        self,
        client: ExpertClient,
        lease_id: int,
        layer: int,
        experts: tuple[int, ...],
        tier: str,
        slots: tuple[int, ...],
        hits: int,
        session: int,
        slab: SlabViews,
        places: tuple[str, ...] | None = None,
        slabs: Mapping[str, SlabViews] | None = None,
    ) -> None:
        """``places`` (a ``tier="auto"`` lease): the tier of each expert's slot, among ``slabs``."""
        self.lease_id = lease_id
        self.layer = layer
        self.experts = experts
        self.tier = tier
        self.slots = slots
        self.hits = hits
        self.session = session
        self.released = False
        self._client = client
        self._slab = slab
        self.places = places
        self._slabs = dict(slabs or {})
        self._index = {expert: i for i, expert in reversed(list(enumerate(experts)))}

    @property
    def stale(self) -> bool:
        """True once the daemon restarted after this lease was taken (it is void)."""
        return self.session != self._client._session

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        """The tensors of the ``i``-th expert of this lease (in acquire order), by name."""
        if self.released:
            raise LeaseError(f"lease {self.lease_id} was released")
        if self.stale:
            raise SessionError(f"lease {self.lease_id} was taken before the daemon restarted; acquire again")
        slab = self._slab if self.places is None else self._slabs[self.places[i]]
        return slab.tensors(self.slots[i])

    def place(self, i: int) -> str:
        """The tier of the ``i``-th expert's slot: where the client computes it."""
        return self.tier if self.places is None else self.places[i]

    def place_of(self, expert: int) -> str:
        """The tier of expert id ``expert``'s slot."""
        i = self._index.get(expert)
        if i is None:
            raise KeyError(f"expert {expert} is not in lease {self.lease_id} (experts {list(self.experts)})")
        return self.place(i)

    def __getitem__(self, expert: int) -> dict[str, torch.Tensor]:
        """The tensors of expert id ``expert``, by name."""
        i = self._index.get(expert)
        if i is None:
            raise KeyError(f"expert {expert} is not in lease {self.lease_id} (experts {list(self.experts)})")
        return self.tensors(i)

    def __len__(self) -> int:
        return len(self.experts)

    def items(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(expert id, tensors)`` for each expert, in acquire order."""
        for i, expert in enumerate(self.experts):
            yield expert, self.tensors(i)

    def release(self) -> None:
        """Release lazily: the next acquire carries it (idempotent)."""
        if not self.released:
            self.released = True
            self.finish_gpu_work()
            self._client._queue_release(self)

    def finish_gpu_work(self) -> None:
        """On a CUDA tier, wait until this process's queued GPU work is done.

        Kernels run asynchronously: one still queued on a view of a leased slot would read
        whatever the daemon copies into that slot once the lease is released. So a release
        waits for the device first (all streams: the views may be read on any). Shared
        memory views are read by the CPU, synchronously, and need nothing.
        """
        for slab in (self._slab, *self._slabs.values()):
            if slab.kind == "cuda":
                torch.cuda.synchronize(slab.flat.device)
                return

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = ", released" if self.released else ", stale" if self.stale else ""
        return f"Lease({self.lease_id}, layer {self.layer}, experts {list(self.experts)}, {self.tier}{state})"


class PendingAcquire:
    """An acquire in flight; `result` waits for its lease."""

    def __init__(self, client: ExpertClient, request: Acquire, request_id: int, session: int) -> None:
        self._client = client
        self._request = request
        self._request_id = request_id
        self._session = session
        self._outcome: Lease | BaseException | None = None

    def done(self) -> bool:
        """True once `result` would not wait."""
        return self._outcome is not None or self._client._has_reply(self._request_id)

    def result(self, timeout: float | None = None) -> Lease:
        """The lease; raises the daemon's error, or `DaemonUnavailable` after ``timeout`` s."""
        if self._outcome is None:
            try:
                self._outcome = self._client._finish_acquire(self, timeout)
            except ExpertdError as exc:
                self._outcome = exc
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def __del__(self) -> None:
        if self._outcome is None and not self._client.closed:  # never collected: release it
            self._client._abandon(self._request_id)


class FastLease(Lease):
    """A lease served from shared memory (`expertd.client.fastpath`): releasing it unpins the
    slots in this client's own pin row at once; the daemon hears of it in the next report."""

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.finish_gpu_work()
            self._client._fast_release(self)


class ReadyAcquire:
    """An acquire that needed no round trip: `result` is its lease at once."""

    def __init__(self, lease: Lease) -> None:
        self._lease = lease

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Lease:
        return self._lease
