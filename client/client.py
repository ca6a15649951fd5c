"""`ExpertClient`: talk to expertd, acquire experts as zero-copy torch views, release them lazily.

One ZeroMQ DEALER socket per client, shared by every thread (`expertd.client.transport`).
A background thread pings while the client is idle,
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
from typing import Any

import torch
import zmq

from expertd.client.fast_session import FastSession
from expertd.client.fastpath import SUPPORTED, FastPath
from expertd.client.lease import FastLease, Lease, PendingAcquire, ReadyAcquire
from expertd.client.transport import _MISSING, POLL_SLICE_S, SPIN_S
from expertd.client.views import SlabViews
from expertd.daemon.protocol import (
    AUTO_PROTOCOL,
    AUTO_TIER,
    FAST_PROTOCOL,
    MAX_RELEASES_PER_ACQUIRE,
    PROTOCOL_VERSION,
    Acquire,
    Bye,
    DaemonUnavailable,
    End,
    ExpertdError,
    Hello,
    HelloReply,
    Hint,
    LeaseReply,
    LoadState,
    Ping,
    ProtocolError,
    Release,
    ReplyBody,
    Request,
    SessionError,
    Shutdown,
    Stats,
    StatsReply,
    TensorSpec,
    encode_request,
    parse_reply,
)
from expertd.daemon.protocol.local import SlabError, default_address
from expertd.daemon.protocol.socket_trust import check_before_connect

log = logging.getLogger("expertd.client")

RELEASE_LINGER_S = 0.05  # a released lease waits this long for an acquire to carry it
RELEASE_FLUSH_COUNT = 32  # ...or until this many wait
BUSY_WINDOW_S = 1.0  # after a release, the background thread ticks each linger this long
PING_AFTER_IDLE = 0.5  # ping once idle for this share of the daemon's heartbeat_s
BYE_LINGER_MS = 200  # how long the closed socket keeps trying to deliver bye


class ExpertClient(FastSession):
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
        fast_path: bool = True,
    ) -> None:
        """``server_key``/``client_key``: certificate files (`expertd keys`) for a tcp:// daemon
        (default: $EXPERTD_SERVER_KEY, $EXPERTD_CLIENT_KEY); ``admin_token``: for admin
        operations over ipc:// when the daemon requires it; ``daemon_user``: who runs the daemon,
        if not root, this user or `expertd` (default: $EXPERTD_DAEMON_USER): an ipc:// socket in a
        directory anyone else owns or may write is refused (`UntrustedSocket`) before anything is sent.
        ``fast_path``: serve hits from shared memory without a round trip where the daemon offers
        it (`expertd.client.fastpath`); False: every acquire asks the daemon."""
        if address is None:
            address = default_address()
        check_before_connect(address, daemon_user, connect_timeout_s)  # before a socket exists
        self.address = address
        self.daemon_user = daemon_user
        self.tenant = tenant
        self.name = name or _default_name()
        super().__init__(address, timeout_s, spin_s, server_key, client_key)
        self.connect_timeout_s = connect_timeout_s
        self.release_linger_s = release_linger_s
        self.generation: int | None = None  # the open generation (`begin_generation`), sent with acquires
        self._generation_ids = itertools.count(1)
        self.info: dict[str, Any] = {}  # the hello reply's map, as it came (for display and extensions)
        self.hello: HelloReply | None = None  # ... and parsed
        self.layout: tuple[TensorSpec, ...] = ()
        self._slabs: dict[str, SlabViews] = {}
        self._session = 0  # bumped by every hello: leases of an older session are void
        self._stale = False  # an unsolicited no_session arrived: say hello before the next call
        self._releases: list[int] = []
        self._releases_since = 0.0
        self._hello_lock = threading.Lock()
        self._wake = threading.Event()  # wakes the background thread early
        self._wake_at = 0.0  # when the background thread wakes on its own
        self.admin_token = admin_token
        self._fast_wanted = fast_path and SUPPORTED
        self._fast: FastPath | None = None
        self._report_lock = threading.Lock()  # taking a report and sending it are one step
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

    def _hello_reply(self) -> HelloReply:
        assert self.hello is not None, "set by the hello in __init__"
        return self.hello

    @property
    def model(self) -> str:
        return self._hello_reply().model

    @property
    def num_layers(self) -> int:
        return self._hello_reply().num_layers

    @property
    def num_experts(self) -> int:
        return self._hello_reply().num_experts

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.layout)

    @property
    def default_tier(self) -> str:
        return self._hello_reply().default_tier

    @property
    def heartbeat_s(self) -> float:
        return self._hello_reply().heartbeat_s

    # --- public operations -----------------------------------------------------------------

    def acquire(
        self, layer: int, experts: Iterable[int], tier: str | None = None, tokens: Iterable[int] | None = None
    ) -> Lease:
        """Pin ``experts`` of ``layer`` in ``tier`` (default: the daemon's) and wait for them.

        ``tier="auto"``: the daemon places each expert, on the device or in the host tier (whose
        read-only view the caller computes from on the CPU); `Lease.place` says which.
        ``tokens[i]``: tokens routed to the i-th expert (auto only; a prefill's belong on the device).
        """
        return self.acquire_async(layer, experts, tier, tokens).result()

    def acquire_async(
        self, layer: int, experts: Iterable[int], tier: str | None = None, tokens: Iterable[int] | None = None
    ) -> PendingAcquire | ReadyAcquire:
        """Send an acquire now; the returned `PendingAcquire` waits for its lease (a hit served
        from shared memory comes back as a `ReadyAcquire`; tier "auto" always asks the daemon,
        which places each expert)."""
        layer, experts, tier = int(layer), [int(e) for e in experts], tier or self.default_tier
        fast = self._fast
        if fast is not None and not self._stale and tier != AUTO_TIER:
            lease = self._fast_acquire(fast, layer, experts, tier)
            if lease is not None:
                return ReadyAcquire(lease)
        if self._stale:
            self._rehello(self._session)
        session = self._session
        if tier == AUTO_TIER and self._hello_reply().protocol < AUTO_PROTOCOL:
            raise ProtocolError(
                f"expertd at {self.address} speaks protocol {self._hello_reply().protocol}: "
                f"no tier {AUTO_TIER!r} (acquire 'device' or 'host')"
            )
        counts = None if tokens is None else [int(t) for t in tokens]
        request_id, request = self._send_acquire(layer, experts, tier, tokens=counts)
        return PendingAcquire(self, request, request_id, session)

    @property
    def auto(self) -> bool:
        """Does the daemon place experts (``tier="auto"``)? Protocol 3 and a device tier."""
        hello = self._hello_reply()
        return hello.protocol >= AUTO_PROTOCOL and "device" in hello.tiers

    def release(self, lease: Lease) -> None:
        """Release ``lease`` now and wait for the daemon to confirm (no-op if already sent)."""
        if isinstance(lease, FastLease):
            lease.release()  # unpinned at once; the daemon needs no answer
            return
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
        self._send(Hint(int(layer), [int(e) for e in experts], score_list, self.generation), reply=False)

    def begin_generation(self) -> int:
        """Start a new generation: later acquires and hints belong to it (the previous one ends).

        The daemon's predictors keep routing history per generation; telling them where one
        ends and the next begins keeps one prompt's routing from steering the next one's.
        """
        self.end_generation()
        self.generation = next(self._generation_ids)
        return self.generation

    def end_generation(self) -> None:
        """The current generation is over (no-op if none is open)."""
        if self.generation is not None:
            self._send(End(self.generation), reply=False)
            self.generation = None

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (a print-friendly map)."""
        reply = self._call(Stats())
        assert isinstance(reply, StatsReply)
        return dict(reply.counters)

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
        fast, self._fast = self._fast, None
        if fast is not None:
            report = fast.take_report()
            if report is not None and self._sock_lock.acquire(timeout=1.0):
                try:  # before bye: the daemon's counters see these hits
                    self._sock.send(encode_request(next(self._ids), report), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                finally:
                    self._sock_lock.release()
            fast.close()
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
        model = self.hello.model if self.hello else None
        return f"ExpertClient({self.address!r}, tenant={self.tenant!r}, model={model!r})"

    # --- session ---------------------------------------------------------------------------

    def _hello(self) -> None:
        if self.info:  # again (the daemon restarted): the same check before the token goes out
            check_before_connect(self.address, self.daemon_user, self.connect_timeout_s)
        request = Hello(PROTOCOL_VERSION, self.name, self.tenant, os.getpid(), self.admin_token)
        ok = self._wait(self._send(request, reply=True), self.connect_timeout_s, "hello")
        try:
            hello = HelloReply.from_wire(ok)
        except ProtocolError as exc:
            raise ProtocolError(f"expertd at {self.address}: {exc}", exc.code) from None
        try:
            slabs = {tier: SlabViews(handle, hello.tensors) for tier, handle in hello.tiers.items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ProtocolError(f"hello reply is malformed ({type(exc).__name__}: {exc})") from None
        except SlabError as exc:
            raise ExpertdError(f"cannot map a slab of expertd at {self.address}: {exc}") from None
        if self.hello is not None and self.hello.model_key() != hello.model_key():
            raise SessionError(
                f"expertd at {self.address} restarted with another model "
                f"({hello.model!r}, {hello.num_layers} layers x {hello.num_experts} experts); "
                f"this client was serving {self.hello.model!r}"
            )
        fast = None
        if (
            self._fast_wanted
            and hello.protocol >= FAST_PROTOCOL
            and any("fast" in h for h in hello.tiers.values())
        ):
            try:
                fast = FastPath(hello.tiers, hello.num_layers, hello.num_experts)
            except (OSError, ProtocolError, KeyError, TypeError, ValueError) as exc:
                log.info("expertd at %s: no shared-memory hits (%s)", self.address, exc)
        with self._cond:
            old, self._fast = self._fast, fast  # pins and reports of the old session are void
            self.info, self.hello, self.layout, self._slabs = ok, hello, hello.tensors, slabs
            self._ping_after_s = PING_AFTER_IDLE * hello.heartbeat_s
            self._session += 1
            self._stale = False
            self._releases.clear()  # leases of the old session are void
            self._abandoned.clear()
        if old is not None:
            old.close()

    def _rehello(self, seen_session: int) -> None:
        """Say hello again unless another thread already did since ``seen_session``."""
        with self._hello_lock:
            if self._session == seen_session:
                log.info("expertd at %s does not know this client (restarted?): hello again", self.address)
                self._hello()

    def _call(self, request: Request) -> ReplyBody:
        """Send and wait for the typed reply; after ``no_session``, hello again and retry once."""
        if self._stale:
            self._rehello(self._session)
        session = self._session
        try:
            ok = self._wait(self._send(request, reply=True), self.timeout_s, request.op.value)
        except SessionError:
            self._rehello(session)
            ok = self._wait(self._send(request, reply=True), self.timeout_s, request.op.value)
        return parse_reply(request.op, ok)

    # --- acquire and release ---------------------------------------------------------------

    def _send_acquire(
        self,
        layer: int,
        experts: list[int],
        tier: str,
        *,
        carry: bool = True,
        tokens: list[int] | None = None,
    ) -> tuple[int, Acquire]:
        """Send an acquire carrying queued releases; returns its id and what was sent."""
        carried: list[int] = []
        if carry:
            with self._cond:
                carried = self._releases[:MAX_RELEASES_PER_ACQUIRE]
                del self._releases[: len(carried)]
        request = Acquire(layer, experts, tier, carried, self.generation, tokens)
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
                request.layer, request.experts, request.tier, carry=False, tokens=request.tokens
            )
        return self._lease(ok, request, session)

    def _lease(self, ok: dict[str, Any], request: Acquire, session: int) -> Lease:
        reply = LeaseReply.from_wire(ok)
        places = reply.places
        named = {reply.tier} if places is None else set(places)
        slab = self._slabs.get(reply.tier if places is None else places[0] if places else "")
        if slab is None or not named <= self._slabs.keys() or len(reply.slots) != len(request.experts):
            self._release_now([reply.lease])
            raise ProtocolError(
                f"acquire reply names tier(s) {', '.join(sorted(named))} "
                f"(mapped: {', '.join(self._slabs)}) and "
                f"{len(reply.slots)} slots for {len(request.experts)} experts"
            )
        return Lease(
            self, reply.lease, request.layer, tuple(request.experts), reply.tier, reply.slots, reply.hits,
            session, slab, places, None if places is None else {t: self._slabs[t] for t in named},
        )  # fmt: skip

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

    def _unclaimed(self, reply: dict[str, Any] | ExpertdError, abandoned: bool) -> None:
        if isinstance(reply, SessionError):
            self._stale = True  # the daemon restarted: hello again before the next call
        if abandoned and isinstance(reply, dict) and "lease" in reply:
            self._queue_release_id(int(reply["lease"]))

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
        fast = self._fast
        if fast is not None and fast.events:
            if now - fast.since >= self.release_linger_s:
                self._flush_report(fast)
            else:
                next_flush = min(next_flush, fast.since + self.release_linger_s)
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


def _default_name() -> str:
    """The program's name and pid, e.g. ``serve.py-1234`` (``python-1234`` under ``-c``)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    return f"{program or 'python'}-{os.getpid()}"[:128]


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
