"""The daemon's one socket, bound with its access control in place from the first moment.

A ZeroMQ ROUTER carries client requests and, over inproc, the transfer engine's
completions. ``ipc://``: the socket's directory is the daemon's own (made 0700/0750 here;
one another user made or may write is refused, daemon/service/local_trust.py), the socket
file is owner-only (0600), or owner and one group
(0660) with ``[auth] socket_group``, which may then also map the shared-memory slabs
(0640); ``[auth] ipc_admin = "token"`` writes an admin token beside the socket. A socket
file left by a daemon that died is replaced; one that still answers is refused.
``tcp://``: CURVE only, through pyzmq's ZAP authenticator with the listed client keys
(daemon/service/auth.py); the engine gets a key of its own. docs/security.md says why.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq

from expertd.daemon import protocol as proto
from expertd.daemon.service.auth import AuthError, ClientKey, CurveAuthenticator, new_admin_token, server_keys
from expertd.daemon.service.config import ServeConfig
from expertd.daemon.service.local_trust import UntrustedPath, make_socket_dir

log = logging.getLogger("expertd")


class StartupError(RuntimeError):
    """The daemon cannot start (bad store, no memory, address in use); nothing was left behind."""


@dataclasses.dataclass
class Listener:
    router: zmq.Socket
    curve: bool  # tcp:// with CURVE (else ipc://)
    completion_address: str  # where the engine's workers report (inproc)
    engine_curve: tuple[bytes, bytes, bytes] | None = None  # server public, engine public, engine secret
    ipc_path: Path | None = None
    admin_token: str | None = None
    admin_token_path: Path | None = None

    def remove_files(self) -> None:
        """The socket file and the admin token go with the daemon."""
        for path in (self.ipc_path, self.admin_token_path):
            if path is not None:
                path.unlink(missing_ok=True)


def listen(
    context: zmq.Context, address: str, config: ServeConfig, closers: list[Any], tick_s: float
) -> Listener:
    """Bind the ROUTER at ``address``; a receive waits at most ``tick_s``; what must be
    closed later goes to ``closers``."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Frames up to 16x the protocol limit get an error reply; larger ones make ZeroMQ
    # drop the connection before anything is buffered.
    router.setsockopt(zmq.MAXMSGSIZE, 16 * proto.MAX_MESSAGE_BYTES)
    router.setsockopt(zmq.SNDHWM, 10_000)
    router.setsockopt(zmq.RCVHWM, 10_000)
    listener = Listener(router, address.startswith("tcp://"), f"inproc://expertd-completions-{id(router)}")
    if listener.curve:
        listener.engine_curve = _enable_curve(context, router, config.auth_keys_dir, closers)
    else:
        path = Path(address[len("ipc://") :])
        _own_socket_dir(path, config.auth_socket_group)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise StartupError(f"{path} exists and is not a socket: refusing to replace it")
            if answers(context, address):
                raise StartupError(f"another expertd is serving at {address}")
            path.unlink()  # left behind by a daemon that died
        listener.ipc_path = path
    # Owner only (0600), or owner and one group (0660): the socket file's mode is the
    # ipc:// access control, so it is right from the moment the file exists.
    group = config.auth_socket_group
    old_umask = os.umask(0o117 if group else 0o177)
    try:
        router.bind(address)
    except zmq.ZMQError as exc:
        raise StartupError(f"cannot bind {address}: {exc}") from None
    finally:
        os.umask(old_umask)
    if listener.ipc_path is not None:
        try:
            _secure_ipc(listener, group, config.auth_ipc_admin == "token")
        except StartupError:
            listener.remove_files()  # a failed start leaves nothing behind
            raise
    # Engine workers report completions to this same socket over inproc, each frame
    # prefixed with a secret of this run, so no client can forge one.
    router.bind(listener.completion_address)
    router.setsockopt(zmq.RCVTIMEO, int(tick_s * 1000))
    return listener


def _own_socket_dir(path: Path, group: str | None) -> None:
    """The socket's directory is the daemon's alone (made 0700/0750 here, or refused by name)."""
    try:
        gid = None if not group else grp.getgrnam(group).gr_gid
        make_socket_dir(path.parent, gid)
    except KeyError:
        raise StartupError(f"[auth] socket_group {group!r}: no such group") from None
    except UntrustedPath as exc:
        raise StartupError(f"socket directory: {exc}; remove it or choose another [server] address") from None
    except OSError as exc:
        raise StartupError(f"socket directory {path.parent}: {exc.strerror}") from None


def _enable_curve(
    context: zmq.Context, router: zmq.Socket, keys_dir: Path, closers: list[Any]
) -> tuple[bytes, bytes, bytes]:
    """tcp://: only listed CURVE keys connect; each message carries its key's tenant/role."""
    try:
        public, secret = server_keys(keys_dir)
        authenticator = CurveAuthenticator(context, keys_dir)
    except AuthError as exc:
        raise StartupError(str(exc)) from None
    closers.append(authenticator)
    # The engine's workers reach this socket over inproc with a key of their own.
    engine_public, engine_secret = zmq.curve_keypair()
    authenticator.allow_key(ClientKey("engine", engine_public.decode(), "-", "engine"))
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = public, secret
    log.info("tcp:// with CURVE: %d client keys allowed", len(authenticator.clients) - 1)
    return public, engine_public, engine_secret


def _secure_ipc(listener: Listener, group: str | None, admin_token: bool) -> None:
    path = listener.ipc_path
    assert path is not None
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, PermissionError) as exc:
            raise StartupError(f"[auth] socket_group {group!r}: {exc}") from None
    if admin_token:
        listener.admin_token_path = path.with_name(path.name + ".admin-token")
        listener.admin_token = new_admin_token(listener.admin_token_path)


def share_slabs(group: str, slabs: Iterable[Any]) -> None:
    """The group that may connect may also map the shared-memory slabs (read-only, 0640):
    a client of another user could not read a single weight otherwise."""
    try:
        gid = grp.getgrnam(group).gr_gid
        for slab in slabs:
            path = getattr(slab, "path", None)  # a CUDA slab is shared by IPC handle, not a file
            if path is not None:
                os.chown(path, -1, gid)
                os.chmod(path, 0o640)
    except (KeyError, PermissionError) as exc:
        raise StartupError(f"[auth] socket_group {group!r}: {exc}") from None


def answers(context: zmq.Context, address: str, timeout_ms: int = 300) -> bool:
    """Is a live expertd at ``address``? (a ping with reply)"""
    probe = context.socket(zmq.DEALER)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.connect(address)
        probe.send(proto.encode_request(0, proto.Ping(reply=True)))
        return bool(probe.poll(timeout_ms))
    finally:
        probe.close()
