"""The socket multiplexer under `ExpertClient`: one DEALER socket shared by every thread.

A thread that waits for a reply holds the socket only for short poll slices and files every
reply it receives under its request id, so concurrent and pipelined requests each find their
own reply (the daemon answers in completion order). A sender that finds the socket busy asks
the polling thread to give way. Replies nobody waits for go to `_unclaimed`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any

import zmq

from expertd.daemon.protocol import (
    DaemonUnavailable,
    ExpertdError,
    Ping,
    ProtocolError,
    Request,
    decode_reply,
    encode_request,
)
from expertd.daemon.protocol.local import use_curve

log = logging.getLogger("expertd.client")

POLL_SLICE_S = 0.005  # longest a waiting thread holds the socket before letting others use it
SPIN_S = 200e-6  # a waiter first spins this long: a hit's reply comes sooner than a sleeping thread wakes
_MISSING = object()
_POLLIN = int(zmq.POLLIN)


class Multiplexer:
    """One socket to the daemon, many threads: send, wait for a reply by id. Thread-safe."""

    def __init__(
        self, address: str, timeout_s: float, spin_s: float, server_key: Any = None, client_key: Any = None
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.spin_s = spin_s  # 0: never spin (a waiting thread always sleeps)
        self.closed = False
        self._ids = itertools.count(1)
        self._sock_lock = threading.Lock()
        self._cond = threading.Condition()  # guards the tables below (and the client's queues)
        self._want = 0  # threads blocked on the socket lock to send: pollers give way
        self._sleepers = 0  # threads in self._cond.wait
        self._waiting: set[int] = set()
        self._replies: dict[int, dict[str, Any] | ExpertdError] = {}
        self._abandoned: set[int] = set()  # requests whose waiter gave up (a lease must go back)
        self._last_send = time.monotonic()
        self._ping_after_s = float("inf")  # a waiting thread pings once idle this long
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, round(POLL_SLICE_S * 1000))
        if address.startswith("tcp://"):
            try:
                use_curve(self._sock, server_key, client_key)
            except BaseException:
                self.closed = True
                self._sock.close(linger=0)
                raise
        self._sock.connect(address)

    def _send(self, request: Request, *, reply: bool) -> int:
        """Send one request frame; with ``reply``, register its id for `_wait`."""
        if self.closed:
            raise DaemonUnavailable(f"client of expertd at {self.address} is closed")
        request_id = next(self._ids)
        frame = encode_request(request_id, request)
        if reply:
            with self._cond:
                self._waiting.add(request_id)
        got = self._sock_lock.acquire(blocking=False)
        if not got:  # a waiter is polling: ask it to give way, then wait for the socket
            with self._cond:
                self._want += 1
            got = self._sock_lock.acquire(timeout=self.timeout_s)
            with self._cond:
                self._want -= 1
        sent = False
        try:
            if got:
                self._sock.send(frame, zmq.NOBLOCK)
                self._last_send = time.monotonic()
                sent = True
        except zmq.Again:
            pass
        finally:
            if got:
                self._sock_lock.release()
            self._wake_sleepers()
        if not sent:
            with self._cond:
                self._waiting.discard(request_id)
            if reply:
                why = "is not taking messages" if got else "is unreachable: the client socket stayed busy"
                raise DaemonUnavailable(f"expertd at {self.address} {why} ({request.op.value} not sent)")
            log.debug("dropped %s to %s: not sent", request.op.value, self.address)
        return request_id

    def _wake_sleepers(self) -> None:
        """Let threads waiting on the condition look again (the socket is free, or replies came)."""
        if self._sleepers:
            with self._cond:
                self._cond.notify_all()

    def _has_reply(self, request_id: int) -> bool:
        """Whether the reply to ``request_id`` is here, reading what arrived if the socket is free."""
        if not self.closed and self._sock_lock.acquire(blocking=False):
            try:
                self._pump(block=False)
            finally:
                self._sock_lock.release()
        with self._cond:
            return request_id in self._replies

    def _wait(self, request_id: int, timeout: float, op: str) -> dict[str, Any]:
        """The reply to ``request_id``; raises its error, or `DaemonUnavailable` after ``timeout``."""
        deadline = time.monotonic() + timeout
        spin = self.spin_s
        while True:
            with self._cond:
                reply = self._replies.pop(request_id, _MISSING)
                if reply is not _MISSING:
                    self._waiting.discard(request_id)
                    break
                remaining = deadline - time.monotonic()
                if self.closed:
                    raise DaemonUnavailable(f"client of expertd at {self.address} is closed")
                if remaining <= 0:
                    self._waiting.discard(request_id)
                    self._abandoned.add(request_id)
                    raise DaemonUnavailable(
                        f"expertd at {self.address} did not answer {op} within {timeout:g} s"
                    )
                if self._want or not self._sock_lock.acquire(blocking=False):
                    self._sleepers += 1
                    self._cond.wait(min(remaining, POLL_SLICE_S))
                    self._sleepers -= 1
                    continue
            try:
                self._pump(block=True, spin=spin)
                spin = 0.0
            finally:
                self._sock_lock.release()
                self._wake_sleepers()
        if isinstance(reply, ExpertdError):
            raise reply
        return reply  # type: ignore[return-value]

    def _pump(self, block: bool, spin: float = 0.0) -> None:
        """With the socket lock held: wait one poll slice (if ``block``) for replies; file them all.

        ``spin``: first poll without sleeping for this many seconds (the caller's CPU is idle
        anyway, and waking a sleeping thread costs more than a hit takes).
        """
        if time.monotonic() - self._last_send >= self._ping_after_s:
            self._sock.send(encode_request(next(self._ids), Ping()), zmq.NOBLOCK)
            self._last_send = time.monotonic()
        if spin:
            events, until = self._sock.getsockopt, time.perf_counter() + spin
            while not events(zmq.EVENTS) & _POLLIN and time.perf_counter() < until:
                os.sched_yield()  # a runnable daemon thread on this CPU goes first
        try:  # a blocking recv (RCVTIMEO is one slice) wakes sooner than poll + recv
            frame = self._sock.recv(0 if block else zmq.NOBLOCK)
        except zmq.Again:
            return
        while True:
            try:
                request_id, reply = decode_reply(frame)
            except ProtocolError as exc:
                log.warning("dropped a bad reply from %s: %s", self.address, exc)
            else:
                self._dispatch(request_id, reply)
            if not self._sock.getsockopt(zmq.EVENTS) & _POLLIN:
                return
            frame = self._sock.recv(zmq.NOBLOCK)

    def _dispatch(self, request_id: int, reply: dict[str, Any] | ExpertdError) -> None:
        with self._cond:
            if request_id in self._waiting:
                self._replies[request_id] = reply
                return
            abandoned = request_id in self._abandoned
            self._abandoned.discard(request_id)
            self._unclaimed(reply, abandoned)
        if isinstance(reply, ExpertdError):
            log.debug("expertd at %s: unawaited request %d failed: %s", self.address, request_id, reply)

    def _unclaimed(self, reply: dict[str, Any] | ExpertdError, abandoned: bool) -> None:
        """With the condition held: a reply nobody waits for (``abandoned``: its waiter gave up)."""
