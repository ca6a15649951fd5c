"""The client's side of the shared-memory hit path, between the socket and the public API.

A hit served from shared memory is pinned here (`FastSession._fast_acquire`) and reported to the
daemon later; every other message waits until the hits served before it have gone out
(`FastSession._send`), so the daemon sees one access stream, in order. docs/architecture.md
walks the whole path; `expertd.client.fastpath` holds the tables and the pin rows.
"""

from __future__ import annotations

import threading
import time

import zmq

from expertd.client.fastpath import REPORT_FLUSH_EVENTS, FastPath
from expertd.client.lease import FastLease
from expertd.client.transport import POLL_SLICE_S, Multiplexer
from expertd.client.views import SlabViews
from expertd.daemon.protocol import DaemonUnavailable, Request, encode_request

REPORT_RETRY_S = 0.0005  # a report the daemon's full queue refused is tried again this soon


class FastSession(Multiplexer):
    """Hits from shared memory and their ordered reports; `ExpertClient` sets the state below."""

    address: str
    generation: int | None
    release_linger_s: float
    _fast: FastPath | None
    _report_lock: threading.Lock
    _session: int
    _stale: bool
    _slabs: dict[str, SlabViews]
    _wake: threading.Event
    _wake_at: float

    def _send(self, request: Request, *, reply: bool) -> int:
        """Every message goes after the hits served before it: the daemon sees them in order."""
        fast = self._fast
        if fast is None:
            return super()._send(request, reply=reply)
        with self._report_lock:  # a report taken by another thread goes out before this message
            if fast.events:
                self._send_report(fast)
            return super()._send(request, reply=reply)

    def _flush_report(self, fast: FastPath) -> None:
        with self._report_lock:
            self._send_report(fast)

    def _send_report(self, fast: FastPath) -> None:
        """Send the hits so far, waiting while the daemon has more than a few of this client's
        reports still to apply, or its queue is full: a report is never dropped (the daemon must
        see every access), so clients serving hits faster than the daemon can account for them
        are slowed to its pace here, and its view never lags by more than a few reports."""
        report = fast.take_report()
        if report is None:
            return
        frame = encode_request(next(self._ids), report)
        deadline = time.monotonic() + self.timeout_s
        while fast.behind(report.seq) and time.monotonic() < deadline and not self.closed:
            time.sleep(REPORT_RETRY_S)  # the daemon has not applied the last few yet: its pace
        while not self.closed:
            with self._cond:
                self._want += 1  # a thread polling for replies gives the socket way
            got = self._sock_lock.acquire(timeout=POLL_SLICE_S)
            with self._cond:
                self._want -= 1
            if got:
                try:
                    self._sock.send(frame, zmq.NOBLOCK)
                    self._last_send = time.monotonic()
                    return
                except zmq.Again:
                    pass  # the daemon is behind: its queue is full
                finally:
                    self._sock_lock.release()
                    self._wake_sleepers()
            if time.monotonic() > deadline:
                break
            time.sleep(REPORT_RETRY_S)
        fast.requeue(report)
        raise DaemonUnavailable(f"expertd at {self.address} took no report within {self.timeout_s:g} s")

    def _fast_acquire(self, fast: FastPath, layer: int, experts: list[int], tier: str) -> FastLease | None:
        """An acquire served from shared memory, or None: it takes the socket.

        Never while an acquire of this client is in flight: the daemon could give that one a
        slot pinned here after it was sent (its report would come too late to stop it), and
        this client might then wait for a write that its own pin holds back.
        """
        session = self._session
        with self._report_lock:  # no message goes out between the check and the pin's event
            if self._waiting or self._abandoned:
                return None
            pinned = fast.pin(layer, experts, tier, self.generation)
        if pinned is None:
            if fast.void:
                self._stale = True  # the daemon that made the table is gone: hello before the next call
            return None
        fast_id, slots = pinned
        lease = FastLease(
            self, fast_id, layer, tuple(experts), tier, slots, len(slots), session, self._slabs[tier]
        )
        if len(fast.events) >= REPORT_FLUSH_EVENTS:
            self._flush_report(fast)
        return lease

    def _fast_release(self, lease: FastLease) -> None:
        fast = self._fast
        if fast is None or lease.session != self._session:
            return  # its session ended: the daemon dropped its pin row already
        fast.unpin(lease.lease_id, lease.tier, lease.slots)
        if len(fast.events) >= REPORT_FLUSH_EVENTS:
            self._flush_report(fast)
        elif len(fast.events) == 1 and fast.since + self.release_linger_s < self._wake_at:
            self._wake.set()  # the background thread sends it after the linger
