"""A socket only its daemon could have placed: what every client checks before it says hello.

A Unix socket is only as trustworthy as the directories above it: whoever can write the
socket's directory (or rename it in its parent) can put a socket of their own at the same
path. The daemon makes its directory itself and refuses one another user made
(daemon/service/local_trust.py); clients check the same here, before any message (a hello
may carry the admin token) goes out, so no token and no routing reaches a stand-in.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from expertd.daemon.protocol.errors import DaemonUnavailable, PermissionDenied, UntrustedSocket

DAEMON_USER_ENV = "EXPERTD_DAEMON_USER"  # who clients trust to own the socket, besides root and themselves
SERVICE_USER = "expertd"  # packaging/expertd.service's user: trusted when it exists
SOCKET_POLL_S = 0.05  # how often a client looks again for a socket that is not there yet


class UntrustedPath(Exception):
    """Another user could replace the socket at this path; the message names who and where."""


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def resolve_user(user: str | int) -> int:
    """A uid from a user name or number; KeyError names an unknown one."""
    return _resolve(user, lambda name: pwd.getpwnam(name).pw_uid, "user")


def resolve_group(group: str | int) -> int:
    """A gid from a group name or number; KeyError names an unknown one."""
    return _resolve(group, lambda name: grp.getgrnam(name).gr_gid, "group")


def _resolve(name: str | int, lookup: Any, what: str) -> int:
    if isinstance(name, int) or name.isdigit():
        return int(name)
    try:
        return int(lookup(name))
    except KeyError:
        raise KeyError(f"no {what} {name!r}") from None


def trusted_owners(daemon_user: str | Iterable[str | int] | None = None) -> frozenset[int]:
    """Who a client trusts to own the daemon's socket directory: root, itself, and the daemon's
    user (``daemon_user``, else $EXPERTD_DAEMON_USER, else the packaged service user if it exists)."""
    owners = {0, os.geteuid()}
    named = daemon_user if daemon_user is not None else os.environ.get(DAEMON_USER_ENV)
    if named is None:
        with contextlib.suppress(KeyError):
            owners.add(pwd.getpwnam(SERVICE_USER).pw_uid)
        return frozenset(owners)
    users = named.split(",") if isinstance(named, str) else named
    for user in users:
        if str(user).strip():
            try:
                owners.add(resolve_user(str(user).strip()))
            except KeyError as exc:
                raise UntrustedPath(f"{DAEMON_USER_ENV} / daemon_user: {exc.args[0]}") from None
    return frozenset(owners)


def _owner_names(owners: Collection[int]) -> str:
    return ", ".join(sorted(user_name(uid) for uid in owners))


def check_ancestors(directory: Path, owners: Collection[int]) -> None:
    """Every directory above ``directory`` is owned by root or a trusted user, and others cannot rename
    entries in it (not writable by group/other, or sticky like /tmp)."""
    real = Path(os.path.realpath(directory.parent))
    for parent in (*reversed(real.parents), real):
        info = os.stat(parent)
        if info.st_uid not in owners and info.st_uid != 0:
            raise UntrustedPath(
                f"{parent} (above {directory}) is owned by {user_name(info.st_uid)}, "
                f"not by {_owner_names(owners)}: its owner could replace the socket directory"
            )
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise UntrustedPath(
                f"{parent} (above {directory}) is writable by others (mode {stat.S_IMODE(info.st_mode):04o}, "
                "not sticky): another user could replace the socket directory"
            )


def check_directory(directory: Path, owners: Collection[int]) -> os.stat_result:
    """``directory`` (not a link) is owned by one of ``owners`` and writable by nobody else,
    and so is every directory above it; `UntrustedPath` names the problem."""
    info = os.lstat(directory)  # FileNotFoundError: the caller says what that means
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedPath(f"{directory} is not a directory (a link or a file): refusing a socket under it")
    if info.st_uid not in owners:
        raise UntrustedPath(
            f"{directory} is owned by {user_name(info.st_uid)}, not by {_owner_names(owners)}: "
            "another user could stand in for the daemon there"
        )
    if info.st_mode & 0o022:
        raise UntrustedPath(
            f"{directory} is writable by its group or others (mode {stat.S_IMODE(info.st_mode):04o}): "
            "another user could stand in for the daemon there"
        )
    check_ancestors(directory, owners)
    return info


def check_socket(path: Path, owners: Collection[int]) -> None:
    """Before a client connects to ``path``: refuse a socket another user could have placed
    (`UntrustedPath`), name a socket this user may not open (`PermissionError`, "Permission
    denied"), and a missing one (`FileNotFoundError`)."""
    try:
        check_directory(path.parent, owners)
    except FileNotFoundError:
        raise FileNotFoundError(f"no directory {path.parent}: is expertd running?") from None
    except PermissionError:  # a directory above we may not even look into
        raise PermissionError(f"Permission denied: cannot look into {path.parent}") from None
    if not os.access(path.parent, os.X_OK):
        raise _denied(path.parent, os.stat(path.parent))
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no socket {path}: is expertd running?") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise UntrustedPath(f"{path} is not a socket: refusing to connect")
    if info.st_uid not in owners:
        raise UntrustedPath(
            f"socket {path} is owned by {user_name(info.st_uid)}, not by {_owner_names(owners)}: "
            "refusing a stand-in for the daemon"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        raise _denied(path, info)


def _denied(path: Path, info: os.stat_result) -> PermissionError:
    """What a user who may not reach the socket is told: whose it is, and which group opens it."""
    return PermissionError(
        f"Permission denied: {path} (owner {user_name(info.st_uid)}, group {group_name(info.st_gid)}, "
        f"mode {stat.S_IMODE(info.st_mode):04o}): {user_name(os.geteuid())} is not in group "
        f"{group_name(info.st_gid)} (the daemon's [auth] socket_group)"
    )


def check_before_connect(
    address: str, daemon_user: str | Iterable[str | int] | None = None, wait_s: float = 0.0
) -> None:
    """What every client does before its first ipc:// message (a hello may carry a token): raise
    `UntrustedSocket`, `PermissionDenied` ("Permission denied: ...") or, when no socket appears
    within ``wait_s``, `DaemonUnavailable`."""
    if not address.startswith("ipc://"):
        return
    path = Path(address[len("ipc://") :])
    deadline = time.monotonic() + wait_s
    while True:
        try:
            check_socket(path, trusted_owners(daemon_user))
            return
        except FileNotFoundError as exc:
            if time.monotonic() >= deadline:
                raise DaemonUnavailable(
                    f"expertd at {address} did not answer hello within {wait_s:g} s: {exc}"
                ) from None
            time.sleep(SOCKET_POLL_S)
        except UntrustedPath as exc:
            hint = f" (if that user runs expertd, say so: daemon_user= / ${DAEMON_USER_ENV} / --daemon-user)"
            raise UntrustedSocket(f"{address}: {exc}{hint}") from None
        except PermissionError as exc:
            raise PermissionDenied(f"{address}: {exc}") from None
