"""The daemon: one thread owns all state and drives the cache manager with real I/O.

It blocks on one ZeroMQ ROUTER socket that carries client requests and, over
inproc, the engine's completions; every message is validated by `protocol`,
every error is a reply. Startup is explicit: slabs are allocated and sockets bound before
systemd hears ``READY=1``; SIGTERM stops the loop, lets running transfers finish,
answers waiting acquires with ``shutting_down`` and removes the shared memory.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import select
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq

from expertd.daemon import protocol as proto
from expertd.daemon.core.cache_core import CacheCore
from expertd.daemon.core.events import DEVICE, HOST, Command, ErrorReply, Reply, StartTransfer
from expertd.daemon.service.auth import parse_user_id
from expertd.daemon.service.config import ServeConfig
from expertd.daemon.service.engine import (
    ENGINE_PREFIX,
    decode_completion,
)
from expertd.daemon.service.fast_hits import apply_report
from expertd.daemon.service.local_trust import Peer, Refused, ipc_identity, process_gone, process_start
from expertd.daemon.service.placement import auto_arguments, auto_refusal, hello_host_compute, reply_places
from expertd.daemon.service.residency import Residency
from expertd.daemon.service.sessions import (
    DAEMON_VERSION,
    Session,
    daemon_stats,
    status_line,
    tenant_stats,
)
from expertd.daemon.service.startup import TICK_S, Parts, load_predictor_state, start_parts
from expertd.daemon.service.systemd import Notifier

log = logging.getLogger("expertd")

STATUS_EVERY_S = 5.0
PEER_CHECK_S = 0.5  # how often ipc:// clients' processes are checked for having exited
DEFERRED_POLL_S = 0.001  # how often a write held back by a shared-memory pin looks again


class Server:
    """One expertd instance; `start` allocates and binds, `run` serves until stopped."""

    def __init__(self, config: ServeConfig, *, notifier: Notifier | None = None, clock=time.monotonic):
        self.config = config.checked()
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.address: str = self.config.address
        self._stopping = False
        self._closers: list[Any] = []  # undone in reverse at close()
        self.sessions: dict[bytes, Session] = {}
        self.core: CacheCore | None = None  # tenants, counters, reply order: built at start
        self._user_of: dict[bytes, str] = {}  # CURVE: sender identity -> its key's tenant/role
        self._last_frame: Any = None  # ipc://: the message being handled, for its peer credentials
        self._peers_checked_at = 0.0
        self.admin_token: str | None = None
        self.messages = {"received": 0, "rejected": 0}
        self.metrics: Any = None  # the Prometheus endpoint, with [metrics] port
        self.residency: Residency | None = None  # shared-memory hits (`service.residency`), if on

    # --- startup ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, allocate the slabs, bind the sockets, start the workers."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self.started_at = self.clock()
        self.notifier.ready(self._status_line())
        log.info("serving %s at %s", self.manifest.model, self.address)

    def _start(self) -> None:
        parts = Parts(self._closers)
        try:
            start_parts(self.config, parts, self.clock)
        finally:  # what did start is closed by `close`, the socket files removed
            self.listener = parts.listener
        assert parts.reader and parts.manifest and parts.host and parts.core
        assert parts.listener and parts.engine
        self.reader, self.manifest, self.host, self.device = (
            parts.reader,
            parts.manifest,
            parts.host,
            parts.device,
        )
        self.core, self.engine, self.metrics = parts.core, parts.engine, parts.metrics
        self.host_compute = parts.host_compute
        self.router, self.curve = parts.listener.router, parts.listener.curve
        self._router_fd = self.router.getsockopt(zmq.FD)
        self.admin_token = parts.listener.admin_token
        self.residency = parts.residency
        if self.residency is not None:  # only with every tenant shared: the shared pool is the one manager
            self.core.partitions.shared.held_outside = self.residency.held

    # The core's parts, as stats and tests read them.
    @property
    def manager(self):
        assert self.core is not None
        return self.core.partitions

    @property
    def timing(self):
        assert self.core is not None
        return self.core.timing

    @property
    def acquires(self) -> dict[str, Any]:
        assert self.core is not None
        return self.core.acquires

    def _load_predictor_state(self, path: Path) -> None:
        load_predictor_state(self.manager, path, self.manifest.model)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or a `shutdown` request.

        One blocking wait on one socket (clients and completions alike) of at most `TICK_S`,
        so signals, which only set a flag, are noticed within a tick; shorter when a private
        tenant's held-back reply is due (`HeldReplies`: nothing new starts in its guard).
        """
        previous = {}
        if _in_main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        secret = self.engine.secret
        core = self.core
        assert core is not None
        last_tick = last_status = self.clock()
        try:
            while not self._stopping:
                wait_s = core.wait_s(self.clock(), TICK_S)
                if wait_s is not None and self.residency is not None and self.residency.deferred:
                    wait_s = min(wait_s, DEFERRED_POLL_S)  # a held-back write waits for a client's unpin
                if wait_s is None:  # a held-back reply is due: it leaves on time, before any new work
                    self._send_held()
                    continue
                frames = self._receive(wait_s)
                now = self.clock()
                if frames is not None:
                    try:
                        if (
                            len(frames) == 2
                            and frames[1][:16] == secret
                            and frames[0].startswith(ENGINE_PREFIX)
                        ):
                            self._completion(frames[1][16:])
                        else:
                            self._request(frames, now)
                    except Exception as exc:  # a bug must cost one request, not the daemon
                        log.exception("internal error handling a message; still serving")
                        self.messages["internal_errors"] = self.messages.get("internal_errors", 0) + 1
                        if len(frames) == 2:
                            request_id = proto.request_id_of(frames[1])
                            self._send_error(
                                frames[0],
                                request_id,
                                proto.ErrorCode.INTERNAL,
                                f"internal error: {exc!r:.200}",
                            )
                if self.residency is not None and self.residency.deferred:
                    for command in self.residency.ready(now):
                        self.engine.submit(command)
                if now - last_tick >= TICK_S:
                    self._expire(now)
                    last_tick = now
                    self.notifier.progress()
                    if self.metrics is not None and self.metrics.wanted():
                        self.metrics.publish(self.stats())  # a scrape waits for it
                    if now - last_status >= STATUS_EVERY_S:
                        self.notifier.status(self._status_line())
                        last_status = now
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only enqueue: the loop sees the flag when its receive returns (within a tick).
        self._stopping = True

    def stop(self) -> None:
        """Ask the loop to stop; it does within a tick."""
        self._stopping = True

    def _receive(self, timeout_s: float) -> list[bytes] | None:
        """The next message, waiting at most ``timeout_s`` (to the microsecond: a held-back
        reply's guard must not be overslept by a millisecond-granular socket timeout); None if none."""
        router = self.router
        if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            # The socket's FD is edge-triggered: it wakes the select on any change, and EVENTS says which.
            select.select([self._router_fd], [], [], timeout_s)
            if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return None
        try:
            return self._recv_with_peer(router) if not self.curve else self._recv_with_user(router)
        except zmq.Again:
            return None

    def _recv_with_peer(self, router: zmq.Socket) -> list[bytes]:
        """ipc://: the frames, keeping the last one: its Peer-Address names the sender's uid/pid."""
        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
        self._last_frame = frames[-1]
        return [frame.bytes for frame in frames]

    def _recv_with_user(self, router: zmq.Socket) -> list[bytes]:
        """CURVE: the frames, noting the authenticated key's tenant/role for the sender."""
        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
        if len(frames) >= 2:
            with contextlib.suppress(zmq.ZMQError):  # no ZAP on the engine's inproc connections
                self._user_of[frames[0].bytes] = frames[1].get("User-Id")
        return [frame.bytes for frame in frames]

    def _completion(self, frame: bytes) -> None:
        transfer_id, ok, error = decode_completion(frame)
        if self.residency is not None:
            self.residency.done(transfer_id, ok)  # its slot may be pinned from shared memory now
        if not ok:
            log.error("transfer %d failed: %s", transfer_id, error)
        self._execute(self.core.transfer_done(transfer_id, ok, error, self.clock()))

    def _request(self, frames: list[bytes], now: float) -> None:
        self.messages["received"] += 1
        if len(frames) != 2:
            self.messages["rejected"] += 1
            self._send_error(
                frames[0], 0, proto.ErrorCode.BAD_REQUEST, f"expected 1 frame, got {len(frames) - 1}"
            )
            return
        self._handle(frames[0], frames[1], now)

    # --- requests ---------------------------------------------------------------------------

    def _handle(self, identity: bytes, frame: bytes, now: float) -> None:
        try:
            request_id, request = proto.decode_request(frame)
        except proto.ProtocolError as exc:
            self.messages["rejected"] += 1
            self._send_error(identity, proto.request_id_of(frame), exc.code, str(exc))
            return
        if isinstance(request, proto.Hello):
            self._hello(identity, request_id, request, now)
            return
        if isinstance(request, proto.Ping) and request.reply:
            self._send_ok(identity, request_id, proto.Pong())  # a liveness probe needs no session
        session = self.sessions.get(identity)
        if session is None:
            if request.op not in proto.NO_REPLY:
                self._send_error(
                    identity, request_id, proto.ErrorCode.NO_SESSION, "say hello first (daemon restarted?)"
                )
            return
        session.requests += 1
        core = self.core
        core.heartbeat(identity, now)
        match request:
            case proto.Acquire():
                if self._stopping:
                    self._send_error(
                        identity, request_id, proto.ErrorCode.SHUTTING_DOWN, "the daemon is stopping"
                    )
                    return
                refused = auto_refusal(request, session, core.isolation(session.tenant))
                if refused is not None:
                    self._send_error(identity, request_id, *refused)
                    return
                self._execute(
                    core.acquire(
                        identity, request_id, request.layer, request.experts, request.tier, now,
                        request.release, request.generation, **auto_arguments(request),
                    )
                )  # fmt: skip
            case proto.Release():
                unknown, freed = core.release(identity, request.leases, now)
                if unknown:
                    text = f"no lease {', '.join(map(str, unknown))} (the others were released)"
                    self._send_error(identity, request_id, proto.ErrorCode.UNKNOWN_LEASE, text)
                else:
                    self._send_ok(identity, request_id, proto.Done())
                self._execute(freed)
            case proto.Hint():
                self._execute(
                    core.hint(
                        identity, request.layer, request.experts, now,
                        generation=request.generation, scores=request.scores,
                    )
                )  # fmt: skip
            case proto.End():
                core.end_generation(identity, request.generation)
            case proto.Stats():
                stats = self.stats() if session.role == "admin" else self.tenant_stats(session.tenant)
                self._send_ok(identity, request_id, proto.StatsReply(stats))
            case proto.Ping():
                pass  # the heartbeat above is all it does
            case proto.Bye():
                self._forget(identity)
            case proto.Shutdown():
                if self._admin(identity, request_id, session, "shutdown"):
                    log.info("shutdown requested by %s (pid %d)", session.name, session.pid)
                    self._send_ok(identity, request_id, proto.Done())
                    self._stopping = True
            case proto.Report():
                apply_report(self, identity, request, now)
            case proto.LoadState():
                if self._admin(identity, request_id, session, "load_state"):
                    self._load_state_now(identity, request_id, Path(request.path))

    def _admin(self, identity: bytes, request_id: int, session: Session, op: str) -> bool:
        """May this session do admin operation ``op``? Refused (and logged) otherwise."""
        if session.role == "admin":
            return True
        log.warning("refused %s from %s (tenant %s): not admin", op, session.name, session.tenant)
        self._send_error(identity, request_id, proto.ErrorCode.FORBIDDEN, f"{op} needs the admin role")
        return False

    def _load_state_now(self, identity: bytes, request_id: int, path: Path) -> None:
        """Admin `load_state`: as ``[prefetch] state``, while serving (the loop pauses to read it)."""
        from expertd.daemon.core.prefetch_state import StateError

        try:
            self._load_predictor_state(path)
        except StateError as exc:
            log.warning("load_state refused: %s", exc)
            self._send_error(identity, request_id, proto.ErrorCode.BAD_REQUEST, str(exc))
            return
        self._send_ok(identity, request_id, proto.LoadStateReply(str(path)))

    def _hello(self, identity: bytes, request_id: int, hello: proto.Hello, now: float) -> None:
        if hello.version not in proto.SUPPORTED_VERSIONS:
            self._send_error(
                identity,
                request_id,
                proto.ErrorCode.UNSUPPORTED_VERSION,
                f"client speaks protocol {hello.version}, this daemon {proto.PROTOCOL_VERSION} "
                f"(and {', '.join(map(str, proto.SUPPORTED_VERSIONS[:-1]))}): "
                "use an expertd client of the daemon's version",
            )
            return
        if identity in self.sessions:
            self._forget(identity)  # a second hello starts over
        if len(self.sessions) >= self.config.clients_max_clients:
            self._send_error(
                identity,
                request_id,
                proto.ErrorCode.TOO_MANY_CLIENTS,
                f"{self.config.clients_max_clients} clients connected",
            )
            return
        peer = None if self.curve else Peer.from_property(_peer_address(self._last_frame))
        try:
            tenant, role = self._credentials(identity, hello, peer)
        except Refused as exc:
            log.warning(
                "refused client %s (uid %s, pid %s): %s",
                hello.client, peer.uid if peer else "?", peer.pid if peer else "?", exc,
            )  # fmt: skip
            self._send_error(identity, request_id, "forbidden", str(exc))
            return
        session = Session(hello.client, tenant, hello.pid, now, role, protocol=hello.version)
        if peer is not None:  # the kernel's word, not the hello's
            session.pid, session.uid, session.started = peer.pid, peer.uid, process_start(peer.pid)
        self.sessions[identity] = session
        self.core.connect(identity, tenant, now)
        log.info(
            "client %s (tenant %s, %s, uid %d, pid %d) connected",
            hello.client, tenant, role, session.uid, session.pid,
        )  # fmt: skip
        fast = {}
        if (
            self.residency is not None
            and hello.version >= proto.FAST_PROTOCOL
            and self.core.isolation(tenant).isolation == "shared"
        ):
            fast = self.residency.add_client(identity, session.uid, self.core.max_pinned(identity))
        self._send_ok(identity, request_id, self.hello_reply(identity, hello.version, fast))

    def _credentials(self, identity: bytes, hello: proto.Hello, peer: Peer | None) -> tuple[str, str]:
        """The tenant and role of a new session: its key's over tcp://, its OS user's over ipc://."""
        if self.curve:
            tenant, role = parse_user_id(self._user_of.get(identity) or "?/none")
            if tenant != hello.tenant and hello.tenant != "default":
                log.warning(
                    "client %s claimed tenant %s; its key says %s", hello.client, hello.tenant, tenant
                )
            return tenant, role
        token_ok = (
            self.admin_token is not None
            and hello.token is not None
            and hmac.compare_digest(hello.token, self.admin_token)
        )
        return ipc_identity(peer, hello.tenant, self.config.tenants, self.config.auth_ipc_admin, token_ok)

    def hello_reply(
        self, identity: bytes | None = None, version: int = proto.PROTOCOL_VERSION, fast: Any = None
    ) -> proto.HelloReply:
        manifest = self.manifest
        tiers = {HOST: self.host.handle()}
        if self.device is not None:
            tiers[DEVICE] = self.device.handle()
        if identity is not None:
            for tier, cap in self.core.max_pinned(identity).items():
                tiers[tier]["max_pinned"] = (
                    cap  # what this client may pin at once ([clients] max_pinned_share)
                )
        for tier, handle in (fast or {}).items():
            tiers[tier]["fast"] = handle  # its pin row and the tier's residency table
        return proto.HelloReply(
            protocol=version,  # the client's, which this daemon speaks too
            daemon=DAEMON_VERSION,
            model=manifest.model,
            num_layers=manifest.num_layers,
            num_experts=manifest.num_experts,
            checkpoint_layers=tuple(manifest.checkpoint_layers),
            dtype=manifest.dtype,
            tensors=manifest.tensors,
            expert_layout=None if manifest.expert_layout is None else manifest.expert_layout.to_json(),
            raw_bytes=manifest.raw_bytes,
            slot_bytes=manifest.slot_bytes,
            tiers=tiers,
            default_tier=DEVICE if self.device is not None else HOST,
            heartbeat_s=self.config.clients_heartbeat_s,
            lease_timeout_s=self.config.clients_lease_timeout_s,
            host_compute=hello_host_compute(self.host_compute, version),
        )

    def _expire(self, now: float) -> None:
        """Clients silent past the lease timeout, or whose process exited, lose their leases and session."""
        if now - self._peers_checked_at >= PEER_CHECK_S:
            self._peers_checked_at = now
            for identity, session in list(self.sessions.items()):
                if session.uid >= 0 and process_gone(session.pid, session.started):
                    log.warning(
                        "client %s (pid %d) exited without bye: its leases were released",
                        session.name, session.pid,
                    )  # fmt: skip
                    self._forget(identity)
        if self.residency is not None:
            self.residency.tick()
            for identity in self.residency.misbehaving:
                self._forget(identity)  # its pin row broke the rules: as a silent client's leases
            self.residency.misbehaving.clear()
        self._execute(self.core.tick(now))
        for identity in [i for i in self.sessions if not self.core.knows(i)]:
            session = self.sessions.pop(identity)
            log.warning("client %s (pid %d) fell silent: its leases were released", session.name, session.pid)

    def _forget(self, identity: bytes) -> None:
        session = self.sessions.pop(identity, None)
        if session is not None:
            log.info("client %s (pid %d) left", session.name, session.pid)
        if self.residency is not None:
            self.residency.drop_client(identity)  # before the core frees the slots its row pinned
        self._execute(self.core.client_gone(identity, self.clock()))

    # --- commands -----------------------------------------------------------------------------

    def _execute(self, commands: Iterable[Command]) -> None:
        """Carry out what the core says, in order (see `CacheCore`: the work behind each command
        is done as the next is asked for, so a hit's reply leaves before its prediction work)."""
        for command in commands:
            if isinstance(command, StartTransfer):
                if self.residency is None or self.residency.start(command, self.clock()):
                    self.engine.submit(command)
            elif isinstance(command, Reply):
                self._send_lease(command)
            elif isinstance(command, ErrorReply):
                self._send_error(command.client, command.request_id, command.code, command.message)

    def _send_lease(self, reply: Reply) -> None:
        body = proto.LeaseReply(reply.lease_id, reply.tier, reply.slots, reply.hits, reply_places(reply))
        self._send(reply.client, proto.encode_reply(reply.request_id, body))

    def _send_held(self) -> None:
        """Wait until the next held-back reply is due; send every reply due by then."""
        core = self.core
        assert core is not None
        core.held.wait_for_next(self.clock)
        for reply, release in core.due(self.clock()):
            self._send_lease(reply)
            core.sent(release, self.clock())

    def _send(self, identity: Any, payload: bytes) -> None:
        try:
            self.router.send(identity, zmq.SNDMORE | zmq.NOBLOCK)
            self.router.send(payload, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # Gone (EHOSTUNREACH) or not reading (EAGAIN at the high-water mark): either
            # way it cannot hold leases any more.
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN) and identity in self.sessions:
                log.warning(
                    "client %s unreachable (%s): releasing its leases", self.sessions[identity].name, exc
                )
                self._forget(identity)

    def _send_ok(self, identity: Any, request_id: int, body: proto.ReplyBody) -> None:
        self._send(identity, proto.encode_reply(request_id, body))

    def _send_error(self, identity: Any, request_id: int, code: str, message: str) -> None:
        self._send(identity, proto.encode_error(request_id, code, message))

    # --- status and shutdown ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return daemon_stats(self)

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        return tenant_stats(self, tenant)

    def _status_line(self) -> str:
        return status_line(self)

    def close(self) -> None:
        """Answer waiting acquires, stop the workers, free the slabs and the socket file."""
        self.notifier.stopping()
        router = getattr(self, "router", None)
        if router is not None and self.core is not None:
            for client, request_id in self.core.waiting():
                self._send_error(client, request_id, proto.ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        for closer in reversed(self._closers):
            try:
                if isinstance(closer, zmq.Context):
                    closer.destroy(linger=0)
                else:
                    closer.close()
            except Exception:  # keep closing the rest
                log.exception("while closing %s", type(closer).__name__)
        self._closers.clear()
        listener = getattr(self, "listener", None)
        if listener is not None:
            listener.remove_files()
        self.notifier.close()


def _peer_address(frame: Any) -> str | None:
    try:
        return frame.get("Peer-Address") if frame is not None else None
    except zmq.ZMQError:  # not reported by this libzmq
        return None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def serve(config: ServeConfig) -> None:
    """Start, serve until stopped, clean up."""
    server = Server(config)
    server.start()
    try:
        server.run()
    finally:
        server.close()
        log.info("stopped")
