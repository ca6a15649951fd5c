"""`ExpertClient`: talk to expertd, acquire experts as zero-copy torch views, release them lazily.

One ZeroMQ DEALER socket per client, used under a lock by every thread. A thread that waits
for a reply holds the socket only for short poll slices and files every reply it receives
under its request id, so concurrent and pipelined requests each find their own reply (the
daemon answers in completion order). A background thread pings while the client is idle,
so the daemon keeps its leases, and sends queued releases that no acquire picked up.

Releasing is lazy: `Lease.release` queues the lease id, the next acquire carries it
(``release=[...]``), and explicit ``release`` messages go out only when the queue waits
longer than ``release_linger_s`` or grows past `RELEASE_FLUSH_COUNT`.

When the daemon says it does not know this client (``no_session``: it restarted), the
client says hello again, remaps the slabs and retries the request once. Leases from before
the restart are void: using one raises `SessionError`.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import zmq

from expertd.client.lease import Lease, PendingAcquire
from expertd.client.views import SlabViews, TensorLayout, parse_layout
from expertd.daemon.protocol import (
    MAX_RELEASES_PER_ACQUIRE,
    PROTOCOL_VERSION,
    Acquire,
    Bye,
    DaemonUnavailable,
    End,
    ExpertdError,
    Hello,
    Hint,
    LoadState,
    Ping,
    ProtocolError,
    Release,
    Request,
    SessionError,
    Shutdown,
    Stats,
    decode_reply,
    encode_request,
)
from expertd.daemon.service.local_trust import check_before_connect
from expertd.daemon.service.slabs import SlabError

log = logging.getLogger("expertd.client")

POLL_SLICE_S = 0.005  # longest a waiting thread holds the socket before letting others use it
SPIN_S = 200e-6  # a waiter first spins this long: a hit's reply comes sooner than a sleeping thread wakes
RELEASE_LINGER_S = 0.05  # a released lease waits this long for an acquire to carry it
RELEASE_FLUSH_COUNT = 32  # ...or until this many wait
BUSY_WINDOW_S = 1.0  # after a release, the background thread ticks each linger this long
PING_AFTER_IDLE = 0.5  # ping once idle for this share of the daemon's heartbeat_s
BYE_LINGER_MS = 200  # how long the closed socket keeps trying to deliver bye
HELLO_KEYS = (
    "model",
    "num_layers",
    "num_experts",
    "tensors",
    "slot_bytes",
    "tiers",
    "default_tier",
    "heartbeat_s",
)
_MISSING = object()
_POLLIN = int(zmq.POLLIN)


class ExpertClient:
    """A connection to expertd: acquire experts, release, hint, stats. Thread-safe."""

    def __init__(
        self,
        address: str | None = None,
        *,
        tenant: str = "default",
        name: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        release_linger_s: float = RELEASE_LINGER_S,
        spin_s: float = SPIN_S,
        server_key: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        admin_token: str | None = None,
        daemon_user: str | None = None,
    ) -> None:
        """``server_key``/``client_key``: certificate files (`expertd keys`) for a tcp:// daemon
        (default: $EXPERTD_SERVER_KEY, $EXPERTD_CLIENT_KEY); ``admin_token``: for admin
        operations over ipc:// when the daemon requires it; ``daemon_user``: who runs the daemon,
        if not root, this user or `expertd` (default: $EXPERTD_DAEMON_USER): an ipc:// socket in a
        directory anyone else owns or may write is refused (`UntrustedSocket`) before anything is sent."""
        if address is None:
            from expertd.daemon.service.config import default_address

            address = default_address()
        check_before_connect(address, daemon_user, connect_timeout_s)  # before a socket exists
        self.address = address
        self.daemon_user = daemon_user
        self.tenant = tenant
        self.name = name or _default_name()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.release_linger_s = release_linger_s
        self.spin_s = spin_s  # 0: never spin (a waiting thread always sleeps)
        self.request: int | None = None  # the open generation (`begin_request`), sent with acquires
        self._request_ids = itertools.count(1)
        self.closed = False
        self.info: dict[str, Any] = {}
        self.layout: tuple[TensorLayout, ...] = ()
        self._slabs: dict[str, SlabViews] = {}
        self._session = 0  # bumped by every hello: leases of an older session are void
        self._stale = False  # an unsolicited no_session arrived: say hello before the next call
        self._ids = itertools.count(1)
        self._sock_lock = threading.Lock()
        self._cond = threading.Condition()  # guards everything below
        self._want = 0  # threads blocked on the socket lock to send: pollers give way
        self._sleepers = 0  # threads in self._cond.wait
        self._waiting: set[int] = set()
        self._replies: dict[int, dict[str, Any] | ExpertdError] = {}
        self._abandoned: set[int] = set()  # acquires whose lease must be released on arrival
        self._releases: list[int] = []
        self._releases_since = 0.0
        self._hello_lock = threading.Lock()
        self._last_send = time.monotonic()
        self._wake = threading.Event()  # wakes the background thread early
        self._wake_at = 0.0  # when the background thread wakes on its own
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, round(POLL_SLICE_S * 1000))
        self.admin_token = admin_token
        if address.startswith("tcp://"):
            _use_curve(self._sock, server_key, client_key)
        self._sock.connect(address)
        try:
            self._hello()
        except BaseException:
            self.closed = True
            self._sock.close(linger=0)
            raise
        self._thread = threading.Thread(
            target=_background, args=(weakref.ref(self), self._wake), name="expertd-heartbeat", daemon=True
        )
        self._thread.start()

    # --- what the daemon said at hello ------------------------------------------------------

    @property
    def model(self) -> str:
        return str(self.info["model"])

    @property
    def num_layers(self) -> int:
        return int(self.info["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.info["num_experts"])

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.layout)

    @property
    def default_tier(self) -> str:
        return str(self.info["default_tier"])

    @property
    def heartbeat_s(self) -> float:
        return float(self.info["heartbeat_s"])

    # --- public operations -----------------------------------------------------------------

    def acquire(self, layer: int, experts: Iterable[int], tier: str | None = None) -> Lease:
        """Pin ``experts`` of ``layer`` in ``tier`` (default: the daemon's) and wait for them."""
        return self.acquire_async(layer, experts, tier).result()

    def acquire_async(self, layer: int, experts: Iterable[int], tier: str | None = None) -> PendingAcquire:
        """Send an acquire now; the returned `PendingAcquire` waits for its lease."""
        if self._stale:
            self._rehello(self._session)
        session = self._session
        request_id, request = self._send_acquire(
            int(layer), [int(e) for e in experts], tier or self.default_tier
        )
        return PendingAcquire(self, request, request_id, session)

    def release(self, lease: Lease) -> None:
        """Release ``lease`` now and wait for the daemon to confirm (no-op if already sent)."""
        with self._cond:
            queued = lease.lease_id in self._releases
            if queued:
                self._releases.remove(lease.lease_id)
        if (lease.released and not queued) or lease.stale:
            lease.released = True
            return  # already sent, or the daemon that held it is gone
        if not lease.released:
            lease.finish_gpu_work()
        lease.released = True
        self._call(Release([lease.lease_id]))

    def hint(self, layer: int, experts: Iterable[int], scores: Iterable[float] | None = None) -> None:
        """Tell the daemon ``experts`` of ``layer`` come soon (best first); no reply."""
        score_list = None if scores is None else [float(s) for s in scores]
        self._send(Hint(int(layer), [int(e) for e in experts], score_list, self.request), reply=False)

    def begin_request(self) -> int:
        """Start a new generation: later acquires and hints belong to it (the previous one ends).

        The daemon's predictors keep routing history per generation; telling them where one
        ends and the next begins keeps one prompt's routing from steering the next one's.
        """
        self.end_request()
        self.request = next(self._request_ids)
        return self.request

    def end_request(self) -> None:
        """The current generation is over (no-op if none is open)."""
        if self.request is not None:
            self._send(End(self.request), reply=False)
            self.request = None

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (a print-friendly map)."""
        return self._call(Stats())

    def ping(self) -> float:
        """Round-trip time to the daemon, in seconds."""
        start = time.perf_counter()
        self._call(Ping(reply=True))
        return time.perf_counter() - start

    def shutdown(self) -> None:
        """Ask the daemon to stop (an admin operation: `PermissionDenied` otherwise)."""
        self._call(Shutdown())

    def load_state(self, path: str | os.PathLike) -> None:
        """Start every tenant's predictor from the statistics in ``path``, a file on the
        daemon's machine (`expertd replay --save-state`): an admin operation."""
        self._call(LoadState(os.path.abspath(path)))

    def close(self) -> None:
        """Say bye (the daemon releases this client's leases at once) and close the socket."""
        if self.closed:
            return
        self.closed = True
        for slab in self._slabs.values():  # the bye frees every lease: queued GPU reads go first
            if slab.kind == "cuda":
                torch.cuda.synchronize(slab.flat.device)
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        if self._sock_lock.acquire(timeout=1.0):
            try:
                self._sock.send(encode_request(next(self._ids), Bye()), zmq.NOBLOCK)
            except zmq.Again:
                pass
            finally:
                self._sock.close(linger=BYE_LINGER_MS)
                self._sock_lock.release()

    def __enter__(self) -> ExpertClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()

    def __repr__(self) -> str:
        return f"ExpertClient({self.address!r}, tenant={self.tenant!r}, model={self.info.get('model')!r})"

    # --- session ---------------------------------------------------------------------------

    def _hello(self) -> None:
        if self.info:  # again (the daemon restarted): the same check before the token goes out
            check_before_connect(self.address, self.daemon_user, self.connect_timeout_s)
        request = Hello(PROTOCOL_VERSION, self.name, self.tenant, os.getpid(), self.admin_token)
        ok = self._wait(self._send(request, reply=True), self.connect_timeout_s, "hello")
        if ok.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"expertd at {self.address} speaks protocol {ok.get('protocol')!r}, "
                f"this client {PROTOCOL_VERSION}"
            )
        missing = [key for key in HELLO_KEYS if key not in ok]
        if missing:
            raise ProtocolError(f"hello reply from expertd at {self.address} lacks {', '.join(missing)}")
        try:
            layout = parse_layout(ok["tensors"], int(ok["slot_bytes"]))
            slabs = {str(tier): SlabViews(handle, layout) for tier, handle in ok["tiers"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ProtocolError(f"hello reply is malformed ({type(exc).__name__}: {exc})") from None
        except SlabError as exc:
            raise ExpertdError(f"cannot map a slab of expertd at {self.address}: {exc}") from None
        if self.info and _model_key(self.info) != _model_key(ok):
            raise SessionError(
                f"expertd at {self.address} restarted with another model "
                f"({ok['model']!r}, {ok['num_layers']} layers x {ok['num_experts']} experts); "
                f"this client was serving {self.info['model']!r}"
            )
        with self._cond:
            self.info, self.layout, self._slabs = ok, layout, slabs
            self._session += 1
            self._stale = False
            self._releases.clear()  # leases of the old session are void
            self._abandoned.clear()

    def _rehello(self, seen_session: int) -> None:
        """Say hello again unless another thread already did since ``seen_session``."""
        with self._hello_lock:
            if self._session == seen_session:
                log.info("expertd at %s does not know this client (restarted?): hello again", self.address)
                self._hello()

    def _call(self, request: Request) -> dict[str, Any]:
        """Send and wait; after ``no_session``, hello again and retry once."""
        if self._stale:
            self._rehello(self._session)
        session = self._session
        try:
            return self._wait(self._send(request, reply=True), self.timeout_s, request.op.value)
        except SessionError:
            self._rehello(session)
            return self._wait(self._send(request, reply=True), self.timeout_s, request.op.value)

    # --- acquire and release ---------------------------------------------------------------

    def _send_acquire(
        self, layer: int, experts: list[int], tier: str, *, carry: bool = True
    ) -> tuple[int, Acquire]:
        """Send an acquire carrying queued releases; returns its id and what was sent."""
        carried: list[int] = []
        if carry:
            with self._cond:
                carried = self._releases[:MAX_RELEASES_PER_ACQUIRE]
                del self._releases[: len(carried)]
        request = Acquire(layer, experts, tier, carried, self.request)
        try:
            return self._send(request, reply=True), request
        except DaemonUnavailable:
            with self._cond:
                self._releases[:0] = carried
            raise

    def _finish_acquire(self, pending: PendingAcquire, timeout: float | None) -> Lease:
        """Wait for an acquire; retry once after ``no_session``, or after a carried lease was unknown."""
        request, request_id, session = pending._request, pending._request_id, pending._session
        timeout = self.timeout_s if timeout is None else timeout
        retried = False
        while True:
            try:
                ok = self._wait(request_id, timeout, "acquire")
                break
            except SessionError:
                if retried:
                    raise
                self._rehello(session)  # the releases it carried are void with the old session
                session = self._session
            except DaemonUnavailable:
                raise
            except ExpertdError:
                self._release_now(request.release)  # refused before the releases were done
                raise
            retried = True
            request_id, request = self._send_acquire(
                request.layer, request.experts, request.tier, carry=False
            )
        return self._lease(ok, request, session)

    def _lease(self, ok: dict[str, Any], request: Acquire, session: int) -> Lease:
        try:
            lease_id, tier, slots = int(ok["lease"]), str(ok["tier"]), tuple(int(s) for s in ok["slots"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"acquire reply is malformed ({exc!r}): {ok!r:.200}") from None
        slab = self._slabs.get(tier)
        if slab is None or len(slots) != len(request.experts):
            self._release_now([lease_id])
            raise ProtocolError(
                f"acquire reply names tier {tier!r} (mapped: {', '.join(self._slabs)}) and "
                f"{len(slots)} slots for {len(request.experts)} experts"
            )
        hits = int(ok.get("hits", 0))
        return Lease(self, lease_id, request.layer, tuple(request.experts), tier, slots, hits, session, slab)

    def _queue_release(self, lease: Lease) -> None:
        with self._cond:
            if lease.session != self._session:
                return
            self._queue_release_id(lease.lease_id)
            flush = len(self._releases) >= RELEASE_FLUSH_COUNT
        if flush:
            self._flush_releases()

    def _queue_release_id(self, lease_id: int) -> None:
        with self._cond:
            if not self._releases:
                self._releases_since = time.monotonic()
                if self._releases_since + self.release_linger_s < self._wake_at:
                    self._wake.set()  # only if it would sleep past the linger: waking costs
            self._releases.append(lease_id)

    def _flush_releases(self) -> None:
        with self._cond:
            ids, self._releases = self._releases, []
        self._release_now(ids)

    def _release_now(self, lease_ids: list[int]) -> None:
        """Explicit release messages; their replies are not awaited (errors are only logged)."""
        for start in range(0, len(lease_ids), MAX_RELEASES_PER_ACQUIRE):
            self._send(Release(lease_ids[start : start + MAX_RELEASES_PER_ACQUIRE]), reply=False)

    def _abandon(self, request_id: int) -> None:
        """Nobody will wait for ``request_id``: drop its reply, releasing any lease it brings.

        Never blocks on the socket (it runs from ``__del__``): a lease goes to the release queue.
        """
        with self._cond:
            reply = self._replies.pop(request_id, _MISSING)
            if reply is _MISSING and request_id in self._waiting:
                self._waiting.discard(request_id)
                self._abandoned.add(request_id)
            elif isinstance(reply, dict) and "lease" in reply:
                self._queue_release_id(int(reply["lease"]))

    # --- transport -------------------------------------------------------------------------

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
        if time.monotonic() - self._last_send >= PING_AFTER_IDLE * self.info.get("heartbeat_s", 1e9):
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
            if isinstance(reply, SessionError):
                self._stale = True
            if abandoned and isinstance(reply, dict) and "lease" in reply:
                self._queue_release_id(int(reply["lease"]))
        if isinstance(reply, ExpertdError):
            log.debug("expertd at %s: unawaited request %d failed: %s", self.address, request_id, reply)

    def _background_step(self) -> float:
        """Ping if idle, send releases that waited too long, drain replies; seconds to the next step."""
        now = time.monotonic()
        with self._cond:
            flush = bool(self._releases) and now - self._releases_since >= self.release_linger_s
            if self._releases:
                next_flush = self._releases_since + self.release_linger_s
            elif now - self._releases_since < BUSY_WINDOW_S:
                next_flush = now + self.release_linger_s  # busy: tick, so releases need no wake-up
            else:
                next_flush = float("inf")
        ping_every = PING_AFTER_IDLE * self.heartbeat_s
        ping = now - self._last_send >= ping_every
        if (flush or ping) and self._sock_lock.acquire(blocking=False):
            try:
                if flush:
                    with self._cond:
                        ids, self._releases = self._releases, []
                    for start in range(0, len(ids), MAX_RELEASES_PER_ACQUIRE):
                        chunk = Release(ids[start : start + MAX_RELEASES_PER_ACQUIRE])
                        self._sock.send(encode_request(next(self._ids), chunk), zmq.NOBLOCK)
                    self._last_send = time.monotonic()
                self._pump(block=False)  # pings if still due, and files or drops replies nobody waits for
            except zmq.ZMQError as exc:
                log.debug("background step on %s: %s", self.address, exc)
            finally:
                self._sock_lock.release()
                self._wake_sleepers()
        elif flush or ping:
            return POLL_SLICE_S  # another thread is using the socket: it pings while it waits
        return max(0.001, min(next_flush, self._last_send + ping_every) - time.monotonic())


def _use_curve(sock: zmq.Socket, server_key: Any, client_key: Any) -> None:
    """tcp://: authenticate with CURVE (the daemon refuses anything else)."""
    from expertd.daemon.service.auth import AuthError, read_certificate

    server_key = server_key or os.environ.get("EXPERTD_SERVER_KEY")
    client_key = client_key or os.environ.get("EXPERTD_CLIENT_KEY")
    if not server_key or not client_key:
        raise DaemonUnavailable(
            "a tcp:// daemon needs CURVE keys: server_key= (its server.key) and client_key= (your "
            "NAME.key_secret), or $EXPERTD_SERVER_KEY and $EXPERTD_CLIENT_KEY"
        )
    try:
        server = read_certificate(Path(server_key))["public-key"]
        own = read_certificate(Path(client_key))
    except AuthError as exc:
        raise DaemonUnavailable(str(exc)) from None
    if "secret-key" not in own:
        raise DaemonUnavailable(f"{client_key}: no secret-key (give the NAME.key_secret file)")
    sock.curve_serverkey = server.encode()
    sock.curve_publickey = own["public-key"].encode()
    sock.curve_secretkey = own["secret-key"].encode()


def _default_name() -> str:
    """The program's name and pid, e.g. ``serve.py-1234`` (``python-1234`` under ``-c``)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    return f"{program or 'python'}-{os.getpid()}"[:128]


def _model_key(info: dict[str, Any]) -> tuple[Any, ...]:
    return (info["model"], info["num_layers"], info["num_experts"], info["tensors"])


def _background(client_ref: weakref.ref[ExpertClient], wake: threading.Event) -> None:
    """The heartbeat thread: holds the client only weakly, so a dropped client is collected."""
    while True:
        client = client_ref()
        if client is None or client.closed:
            return
        client._wake_at = float("inf")  # a release queued during the step wakes the next wait
        try:
            delay = client._background_step()
        except Exception:  # never let the heartbeat die silently
            log.exception("expertd client background step failed")
            delay = 1.0
        client._wake_at = time.monotonic() + delay
        del client
        wake.wait(delay)
        wake.clear()
