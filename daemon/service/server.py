"""The daemon: one thread owns all state and drives the cache manager with real I/O.

It blocks on one ZeroMQ ROUTER socket that carries client requests and, over
inproc, the engine's completions; every message is validated by `protocol`,
every error is a reply. Startup is explicit: slabs are allocated and sockets bound before
systemd hears ``READY=1``; SIGTERM stops the loop, lets running transfers finish,
answers waiting acquires with ``shutting_down`` and removes the shared memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import heapq
import hmac
import itertools
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq

from expertd.daemon import protocol as proto
from expertd.daemon.core.events import DEVICE, HOST, ErrorReply, Predict, Reply, StartTransfer
from expertd.daemon.core.isolation import PrivateTiming
from expertd.daemon.core.manager import ManagerConfig
from expertd.daemon.core.partitions import PartitionError, Partitions
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.daemon.service.auth import parse_user_id
from expertd.daemon.service.config import ServeConfig, TenantPolicy
from expertd.daemon.service.engine import (
    ENGINE_PREFIX,
    TransferEngine,
    cpu_copier,
    cuda_copier,
    decode_completion,
)
from expertd.daemon.service.faults import read_errors_from_env
from expertd.daemon.service.listener import StartupError, listen, share_slabs
from expertd.daemon.service.local_trust import Peer, Refused, ipc_identity, process_gone, process_start
from expertd.daemon.service.slabs import CpuDeviceSlab, CudaDeviceSlab, HostSlab, SlabError, clean_stale
from expertd.daemon.service.systemd import Notifier
from expertd.daemon.store.reader import StoreReader
from expertd.policies.base import Geometry

log = logging.getLogger("expertd")

DAEMON_VERSION = "0.1.0"
SHARED = TenantPolicy()
TICK_S = 0.1  # lease expiry and watchdog granularity
STATUS_EVERY_S = 5.0
PEER_CHECK_S = 0.5  # how often ipc:// clients' processes are checked for having exited


def _top_k(manifest: Any) -> int:
    """Experts one token uses per layer, as the store recorded it (1 where it did not)."""
    top_k = manifest.source.get("top_k")
    if isinstance(top_k, int) and 0 < top_k <= manifest.num_experts:
        return top_k
    log.warning("the store does not record its model's top-k (packed by an older expertd): assuming 1")
    return 1


def tier_slots(key: str, size: Any, manifest: Any, top_k: int) -> int:
    """Slots of a tier of ``size``: at most one per expert of the store (logged when shrunk),
    and refused when one layer's top-k would not fit."""
    num_keys = manifest.num_layers * manifest.num_experts
    slot_bytes = manifest.slot_bytes
    asked = size.slots(slot_bytes)
    if asked < top_k:
        raise StartupError(
            f"[tiers] {key} {size} holds {asked} slot(s) of {slot_bytes} bytes; one layer's top-{top_k} "
            f"needs {top_k}: every acquire would fail"
        )
    if asked > num_keys:
        log.warning(
            "[tiers] %s %s is more than the store's %d experts (%.1f MiB): allocating %d slots",
            key, size, num_keys, num_keys * slot_bytes / 2**20, num_keys,
        )  # fmt: skip
        return num_keys
    return asked


def prefetch_settings(cfg: ServeConfig) -> PrefetchConfig:
    """The [prefetch] keys as the cache manager takes them (ValueError names a bad one)."""
    return PrefetchConfig(
        None if cfg.prefetch_predictor == "none" else cfg.prefetch_predictor,
        depth=cfg.prefetch_depth,
        min_prob=cfg.prefetch_min_prob,
        budget=cfg.prefetch_budget,
        width=cfg.prefetch_width,
        share=cfg.prefetch_share,
        window=cfg.prefetch_window,
    )


@dataclasses.dataclass
class Session:
    name: str
    tenant: str
    pid: int
    since: float
    role: str = "client"  # or "admin": shutdown, every tenant's stats
    requests: int = 0
    uid: int = -1  # ipc://: the peer's user as the kernel says (-1: tcp://, unknown)
    started: int | None = None  # ipc://: the peer process's start time, to tell it died


@dataclasses.dataclass
class TenantCounters:
    """What one tenant's acquires met: the stats it may see (not other tenants' routing)."""

    acquires: int = 0
    accesses: int = 0
    hits: int = 0
    waited: int = 0
    stall_s: float = 0.0
    errors: int = 0


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
        self._started: dict[tuple[bytes, int], float] = {}  # acquire start times
        self.acquires = {"count": 0, "waited": 0, "stall_s": 0.0, "max_stall_s": 0.0, "errors": 0}
        self.tenants: dict[str, TenantCounters] = {}
        self._user_of: dict[bytes, str] = {}  # CURVE: sender identity -> its key's tenant/role
        self._last_frame: Any = None  # ipc://: the message being handled, for its peer credentials
        self._peers_checked_at = 0.0
        self.admin_token: str | None = None
        self._held: list[tuple[float, int, Any, bytes]] = []  # private tenants' replies, held back
        self._held_seq = itertools.count()
        self.messages = {"received": 0, "rejected": 0}
        self.metrics: Any = None  # the Prometheus endpoint, with [metrics] port

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
        cfg = self.config
        removed = clean_stale()
        if removed:
            log.warning("removed %d stale shared-memory file(s) of dead daemons", len(removed))
        direct = {"auto": None, "on": True, "off": False}[cfg.transfers_direct_io]
        try:
            self.reader = StoreReader(cfg.store, direct=direct)
        except Exception as exc:
            raise StartupError(f"cannot open store {cfg.store}: {exc}") from None
        self._closers.append(self.reader)
        manifest = self.manifest = self.reader.manifest
        top_k = _top_k(manifest)
        host_slots = tier_slots("host_size", cfg.tiers_host_size, manifest, top_k)
        try:
            slot_bytes = manifest.slot_bytes
            self.host = HostSlab("host", host_slots, slot_bytes)
            self._closers.append(self.host)
            self.device = None
            if cfg.tiers_device != "off":
                device_slots = tier_slots("device_size", cfg.tiers_device_size, manifest, top_k)
                if cfg.tiers_device == "cpu":
                    self.device = CpuDeviceSlab("device", device_slots, slot_bytes)
                else:
                    self.device = CudaDeviceSlab(device_slots, slot_bytes, cfg.tiers_cuda_device)
                    self.host.pin_for_cuda()
                self._closers.append(self.device)
            if cfg.auth_socket_group:
                share_slabs(cfg.auth_socket_group, (self.host, self.device))
        except SlabError as exc:
            raise StartupError(str(exc)) from None
        from expertd.policies.registry import parse_spec, policy_class

        for key, spec in (("host", cfg.policy_host), ("device", cfg.policy_device)):
            policy = policy_class(parse_spec(spec)[0])
            if policy.offline:
                raise StartupError(f"[policy] {key} = {spec!r} needs the future: it is for replay only")
            if policy.wants_estimates and cfg.prefetch_predictor == "none":
                log.warning(
                    "[policy] %s = %r with [prefetch] predictor = 'none': the policy learns with a "
                    "predictor of its own inside every acquire (slower hits); without prediction, choose lru",
                    key,
                    spec,
                )
        try:
            prefetch = prefetch_settings(cfg)
        except ValueError as exc:
            raise StartupError(f"[prefetch]: {exc}") from None
        shares = {t: p.share for t, p in cfg.tenants.items() if p.isolation == "partitioned"}
        manager_config = ManagerConfig(
            Geometry(manifest.num_layers, manifest.num_experts),
            host_slots=host_slots,
            device_slots=self.device.num_slots if self.device else 0,
            host_policy=cfg.policy_host,
            device_policy=cfg.policy_device,
            load_depth=cfg.transfers_load_threads or 1,
            h2d_depth=cfg.transfers_h2d_depth or 1,
            lease_timeout_s=cfg.clients_lease_timeout_s,
            max_pending_per_client=cfg.clients_max_pending or 1,
            max_queued_prefetches=cfg.transfers_max_queued_prefetches,
            expert_bytes=manifest.raw_bytes,
            prefetch=prefetch,
            max_pinned_share=cfg.clients_max_pinned_share,
            min_pinned=top_k,
            capacity_wait_s=cfg.clients_capacity_wait_s,
        )
        try:
            self.manager = Partitions(manager_config, shares)
        except PartitionError as exc:
            raise StartupError(f"[tenants]: {exc}") from None
        if cfg.prefetch_state is not None:
            from expertd.daemon.core.prefetch_state import StateError

            try:
                self._load_predictor_state(cfg.prefetch_state)
            except StateError as exc:
                raise StartupError(f"[prefetch] state: {exc}") from None
        self.timing = PrivateTiming(
            Geometry(manifest.num_layers, manifest.num_experts),
            {HOST: host_slots, DEVICE: self.device.num_slots if self.device else 0},
            {HOST: cfg.policy_host, DEVICE: cfg.policy_device},
        )
        self.context = zmq.Context()
        self._closers.append(self.context)
        self.listener = listen(self.context, self.address, cfg, self._closers, TICK_S)
        self.router, self.curve = self.listener.router, self.listener.curve
        self.admin_token = self.listener.admin_token
        copier = None
        if isinstance(self.device, CpuDeviceSlab):
            copier = cpu_copier(self.host.slot, self.device.slot)
        elif isinstance(self.device, CudaDeviceSlab):
            copier = cuda_copier(self.host, self.device)
        self.engine = TransferEngine(
            self.context,
            self.listener.completion_address,
            read_expert=self._read_expert(),
            num_experts=manifest.num_experts,
            host_slot=self.host.slot,
            copy_to_device=copier,
            raw_bytes=manifest.raw_bytes,
            load_threads=cfg.transfers_load_threads or 1,
            h2d_depth=cfg.transfers_h2d_depth or 1,
            prepare_thread=self.reader.prepare_thread,
            curve=self.listener.engine_curve,
        )
        self.engine.start()
        self._closers.append(self.engine)
        if cfg.metrics_port:
            from expertd.daemon.service.metrics import MetricsExporter, MetricsUnavailable

            try:
                self.metrics = MetricsExporter(cfg.metrics_port, cfg.metrics_address)
            except MetricsUnavailable as exc:
                raise StartupError(str(exc)) from None
            self._closers.append(self.metrics)
            log.info("metrics at http://%s:%d/metrics", cfg.metrics_address, self.metrics.port)

    def _read_expert(self):
        try:
            return read_errors_from_env(self.reader.read_expert)
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    def _load_predictor_state(self, path: Path) -> None:
        """The statistics every tenant's predictor starts from; `StateError` naming the problem."""
        from expertd.daemon.core.prefetch_state import StateError, read_state
        from expertd.policies.base import PolicyError

        if self.manager.config.prefetch.predictor is None:
            raise StateError(f"{path}: loading statistics needs a predictor ([prefetch] predictor)")
        try:
            self.manager.load_predictor_state(read_state(path, self.manifest.model))
        except PolicyError as exc:
            raise StateError(f"{path}: {exc}") from None
        log.info("predictor statistics loaded from %s", path)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or a `shutdown` request.

        One blocking receive on one socket (clients and completions alike) with a
        timeout of `TICK_S`: the lowest latency pyzmq offers, and signals, which only
        set a flag, are noticed within a tick.
        """
        previous = {}
        if _in_main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        router = self.router
        secret = self.engine.secret
        curve = self.curve
        timeout_set = False
        last_tick = last_status = self.clock()
        try:
            while not self._stopping:
                if self._held:  # wake for the next held-back reply, not only each tick
                    wait_s = min(TICK_S, max(0.0, self._held[0][0] - self.clock()))
                    router.setsockopt(zmq.RCVTIMEO, int(wait_s * 1000))  # early, not late: then spin
                    timeout_set = True
                elif timeout_set:
                    router.setsockopt(zmq.RCVTIMEO, int(TICK_S * 1000))
                    timeout_set = False
                try:
                    frames = self._recv_with_peer(router) if not curve else self._recv_with_user(router)
                except zmq.Again:
                    frames = None
                now = self.clock()
                if self._held:
                    self._send_held(now)
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
                                frames[0], request_id, "internal", f"internal error: {exc!r:.200}"
                            )
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

    def _recv_with_peer(self, router: zmq.Socket) -> list[bytes]:
        """ipc://: the frames, keeping the last one: its Peer-Address names the sender's uid/pid."""
        frames = router.recv_multipart(copy=False)
        self._last_frame = frames[-1]
        return [frame.bytes for frame in frames]

    def _recv_with_user(self, router: zmq.Socket) -> list[bytes]:
        """CURVE: the frames, noting the authenticated key's tenant/role for the sender."""
        frames = router.recv_multipart(copy=False)
        if len(frames) >= 2:
            with contextlib.suppress(zmq.ZMQError):  # no ZAP on the engine's inproc connections
                self._user_of[frames[0].bytes] = frames[1].get("User-Id")
        return [frame.bytes for frame in frames]

    def _completion(self, frame: bytes) -> None:
        transfer_id, ok, error = decode_completion(frame)
        if not ok:
            log.error("transfer %d failed: %s", transfer_id, error)
        self._execute(self.manager.transfer_done(transfer_id, ok, error), self.clock())

    def _request(self, frames: list[bytes], now: float) -> None:
        self.messages["received"] += 1
        if len(frames) != 2:
            self.messages["rejected"] += 1
            self._send_error(frames[0], 0, "bad_request", f"expected 1 frame, got {len(frames) - 1}")
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
            self._send_ok(identity, request_id, {"pong": True})  # a liveness probe needs no session
        session = self.sessions.get(identity)
        if session is None:
            if request.op not in proto.NO_REPLY:
                self._send_error(identity, request_id, "no_session", "say hello first (daemon restarted?)")
            return
        session.requests += 1
        manager = self.manager
        manager.heartbeat(identity, now)
        match request:
            case proto.Acquire():
                if self._stopping:
                    self._send_error(identity, request_id, "shutting_down", "the daemon is stopping")
                    return
                self.acquires["count"] += 1
                tenant = self.tenant_policy(session.tenant)
                if tenant.isolation == "private" and request.tier in self.manager.tiers:
                    self.timing.before_acquire(
                        (identity, request_id), session.tenant, tenant.share, request.tier, request.layer,
                        request.experts, now,
                    )  # fmt: skip
                commands = manager.acquire(
                    identity, request_id, request.layer, request.experts, request.tier, now, request.release,
                    request.request,
                )  # fmt: skip
                if self._answered_at_once(commands, identity, request_id):
                    self._send_lease(commands[0])  # the hit path
                    for predict in commands[1:]:  # the reply is out: now the prediction work
                        self._execute(manager.predict(predict), now)
                else:
                    self._started[(identity, request_id)] = now
                    self._execute(commands, now)
            case proto.Release():
                unknown = manager.release_many(identity, request.leases, now)
                if unknown:
                    text = f"no lease {', '.join(map(str, unknown))} (the others were released)"
                    self._send_error(identity, request_id, "unknown_lease", text)
                else:
                    self._send_ok(identity, request_id, {})
                self._execute(manager.settle(), now)
            case proto.Hint():
                commands = manager.hint(
                    identity,
                    request.layer,
                    request.experts,
                    now,
                    request=request.request,
                    scores=request.scores,
                )
                self._execute(commands, now)
            case proto.End():
                manager.end_request(identity, request.request)
            case proto.Stats():
                stats = self.stats() if session.role == "admin" else self.tenant_stats(session.tenant)
                self._send_ok(identity, request_id, stats)
            case proto.Ping():
                pass  # the heartbeat above is all it does
            case proto.Bye():
                self._forget(identity)
            case proto.Shutdown():
                if self._admin(identity, request_id, session, "shutdown"):
                    log.info("shutdown requested by %s (pid %d)", session.name, session.pid)
                    self._send_ok(identity, request_id, {})
                    self._stopping = True
            case proto.LoadState():
                if self._admin(identity, request_id, session, "load_state"):
                    self._load_state_now(identity, request_id, Path(request.path))

    def _admin(self, identity: bytes, request_id: int, session: Session, op: str) -> bool:
        """May this session do admin operation ``op``? Refused (and logged) otherwise."""
        if session.role == "admin":
            return True
        log.warning("refused %s from %s (tenant %s): not admin", op, session.name, session.tenant)
        self._send_error(identity, request_id, "forbidden", f"{op} needs the admin role")
        return False

    def _load_state_now(self, identity: bytes, request_id: int, path: Path) -> None:
        """Admin `load_state`: as ``[prefetch] state``, while serving (the loop pauses to read it)."""
        from expertd.daemon.core.prefetch_state import StateError

        try:
            self._load_predictor_state(path)
        except StateError as exc:
            log.warning("load_state refused: %s", exc)
            self._send_error(identity, request_id, "bad_request", str(exc))
            return
        self._send_ok(identity, request_id, {"path": str(path)})

    def _hello(self, identity: bytes, request_id: int, hello: proto.Hello, now: float) -> None:
        if hello.version != proto.PROTOCOL_VERSION:
            self._send_error(
                identity,
                request_id,
                "unsupported_version",
                f"client speaks protocol {hello.version}, this daemon {proto.PROTOCOL_VERSION}",
            )
            return
        if identity in self.sessions:
            self._forget(identity)  # a second hello starts over
        if len(self.sessions) >= self.config.clients_max_clients:
            self._send_error(
                identity,
                request_id,
                "too_many_clients",
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
        session = Session(hello.client, tenant, hello.pid, now, role)
        if peer is not None:  # the kernel's word, not the hello's
            session.pid, session.uid, session.started = peer.pid, peer.uid, process_start(peer.pid)
        self.sessions[identity] = session
        isolation = self.tenant_policy(tenant).isolation
        self.manager.set_tenant(identity, tenant, now, tenant if isolation == "partitioned" else None)
        log.info(
            "client %s (tenant %s, %s, uid %d, pid %d) connected",
            hello.client, tenant, role, session.uid, session.pid,
        )  # fmt: skip
        self._send_ok(identity, request_id, self.hello_reply(identity))

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

    def hello_reply(self, identity: bytes) -> dict[str, Any]:
        manifest = self.manifest
        tiers = {HOST: self.host.handle()}
        if self.device is not None:
            tiers[DEVICE] = self.device.handle()
        for tier, cap in self.manager.max_pinned(identity).items():
            tiers[tier]["max_pinned"] = cap  # what this client may pin at once ([clients] max_pinned_share)
        return {
            "protocol": proto.PROTOCOL_VERSION,
            "daemon": DAEMON_VERSION,
            "model": manifest.model,
            "num_layers": manifest.num_layers,
            "num_experts": manifest.num_experts,
            "checkpoint_layers": list(manifest.checkpoint_layers),  # store layer i is checkpoint layer [i]
            "dtype": manifest.dtype,
            "tensors": [t.to_json() for t in manifest.tensors],
            "raw_bytes": manifest.raw_bytes,
            "slot_bytes": manifest.slot_bytes,
            "tiers": tiers,
            "default_tier": DEVICE if self.device is not None else HOST,
            "heartbeat_s": self.config.clients_heartbeat_s,
            "lease_timeout_s": self.config.clients_lease_timeout_s,
        }

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
        self._execute(self.manager.tick(now), now)
        for identity in [i for i in self.sessions if not self.manager.knows(i)]:
            session = self.sessions.pop(identity)
            log.warning("client %s (pid %d) fell silent: its leases were released", session.name, session.pid)

    def _forget(self, identity: bytes) -> None:
        session = self.sessions.pop(identity, None)
        if session is not None:
            log.info("client %s (pid %d) left", session.name, session.pid)
        for key in [k for k in self._started if k[0] == identity]:
            del self._started[key]
        self._execute(self.manager.client_gone(identity), self.clock())

    # --- commands -----------------------------------------------------------------------------

    @staticmethod
    def _answered_at_once(commands: list, identity: Any, request_id: int) -> bool:
        """The hit path: the acquire's own reply, then at most the prediction work it put off
        (a reply for someone else, freed by a piggy-backed release, goes the long way)."""
        if not commands:
            return False
        first = commands[0]
        return (
            type(first) is Reply
            and first.client == identity
            and first.request_id == request_id
            and all(type(c) is Predict for c in commands[1:])
        )

    def _execute(self, commands: list, now: float) -> None:
        for command in commands:
            if isinstance(command, StartTransfer):
                self.engine.submit(command)
            elif isinstance(command, Reply):
                started = self._started.pop((command.client, command.request_id), now)
                waited = now - started
                counters = self._tenant_counters(command.client)
                self.timing.miss_answered(command.tier, len(command.slots) - command.hits, waited)
                if command.hits < len(command.slots):
                    self.acquires["waited"] += 1
                    self.acquires["stall_s"] += waited
                    self.acquires["max_stall_s"] = max(self.acquires["max_stall_s"], waited)
                    counters.waited += 1
                    counters.stall_s += waited
                self._send_lease(command)
            elif isinstance(command, Predict):
                self._execute(self.manager.predict(command), now)
            elif isinstance(command, ErrorReply):
                self._started.pop((command.client, command.request_id), None)
                self.timing.forget((command.client, command.request_id))
                self.acquires["errors"] += 1
                self._send_error(command.client, command.request_id, command.code, command.message)

    def _tenant_counters(self, identity: Any) -> TenantCounters:
        session = self.sessions.get(identity)
        tenant = session.tenant if session is not None else "?"
        counters = self.tenants.get(tenant)
        if counters is None:
            counters = self.tenants[tenant] = TenantCounters()
        return counters

    def _send_lease(self, reply: Reply) -> None:
        counters = self._tenant_counters(reply.client)
        counters.acquires += 1
        counters.accesses += len(reply.slots)
        counters.hits += reply.hits
        body = {"lease": reply.lease_id, "tier": reply.tier, "slots": list(reply.slots), "hits": reply.hits}
        payload = proto.encode_reply(reply.request_id, body)
        misses = len(reply.slots) - reply.hits
        release_at = self.timing.release_at((reply.client, reply.request_id), self.clock(), misses)
        if release_at is not None and release_at > self.clock():
            # A private tenant: not faster than its own cache would have been (daemon/core/isolation.py).
            self.timing.held_back += 1
            self.timing.held_back_s += release_at - self.clock()
            heapq.heappush(self._held, (release_at, next(self._held_seq), reply.client, payload))
            return
        self._send(reply.client, payload)

    def _send_held(self, now: float) -> None:
        """Send the held-back replies whose time has come."""
        while self._held and self._held[0][0] <= now:
            _, _, identity, payload = heapq.heappop(self._held)
            self._send(identity, payload)

    def tenant_policy(self, tenant: str) -> TenantPolicy:
        return self.config.tenants.get(tenant, SHARED)

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

    def _send_ok(self, identity: Any, request_id: int, body: dict[str, Any]) -> None:
        self._send(identity, proto.encode_reply(request_id, body))

    def _send_error(self, identity: Any, request_id: int, code: str, message: str) -> None:
        self._send(identity, proto.encode_error(request_id, code, message))

    # --- status and shutdown ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats = self.manager.stats()
        stats["daemon"] = {
            "version": DAEMON_VERSION,
            "pid": os.getpid(),
            "address": self.address,
            "uptime_s": self.clock() - self.started_at,
            "store": str(self.config.store),
            "model": self.manifest.model,
            "num_layers": self.manifest.num_layers,
            "num_experts": self.manifest.num_experts,
            "expert_bytes": self.manifest.raw_bytes,
            "direct_io": self.reader.direct,
            "device": self.config.tiers_device,
        }
        stats["acquires"] = dict(self.acquires)
        stats["messages"] = dict(self.messages)
        stats["sessions"] = self.stats_sessions()
        stats["isolation"] = {
            "private_replies_held": self.timing.held_back,
            "private_held_s": self.timing.held_back_s,
            "miss_s": dict(self.timing.miss_s),
        }
        stats["tenants"] = {
            name: dict(dataclasses.asdict(c), hit_rate=c.hits / c.accesses if c.accesses else 0.0)
            for name, c in self.tenants.items()
        }
        return stats

    def stats_sessions(self) -> list[dict[str, Any]]:
        leases = self.manager.client_summary()
        return [
            {
                "name": s.name,
                "tenant": s.tenant,
                "pid": s.pid,
                "connected_s": self.clock() - s.since,
                "requests": s.requests,
                "leases": leases.get(identity, (0, 0))[0],
                "pending": leases.get(identity, (0, 0))[1],
            }
            for identity, s in self.sessions.items()
        ]

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        """What a non-admin client may see: its own tenant's counters and sessions, nothing shared."""
        counters = self.tenants.get(tenant, TenantCounters())
        return {
            "tenant": tenant,
            **dataclasses.asdict(counters),
            "hit_rate": counters.hits / counters.accesses if counters.accesses else 0.0,
            "sessions": [s for s in self.stats_sessions() if s["tenant"] == tenant],
        }

    def _status_line(self) -> str:
        stats = self.manager.stats()["tiers"]
        parts = [f"{len(self.sessions)} clients"]
        for name, tier in stats.items():
            parts.append(f"{name} {tier['used']}/{tier['slots']} slots, hit {tier['hit_rate']:.1%}")
        return "serving: " + "; ".join(parts)

    def close(self) -> None:
        """Answer waiting acquires, stop the workers, free the slabs and the socket file."""
        self.notifier.stopping()
        router = getattr(self, "router", None)
        if router is not None:
            for client, request_id in list(self._started):
                self._send_error(client, request_id, "shutting_down", "the daemon is stopping")
            self._started.clear()
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
