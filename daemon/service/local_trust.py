"""Local trust over ipc://, the daemon's side: its socket directory, and peers known by what the kernel says.

The daemon creates its socket directory itself (0700, or 0750 for a socket group) and
refuses one that another user owns or that others may write (the checks are the clients'
own, daemon/protocol/socket_trust.py). A peer's uid/gid/pid come from the kernel
(SO_PEERCRED at connect, which libzmq reports as a message's ``Peer-Address`` property
``...:UID:GID:PID``), never from what the peer claims.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import stat
from pathlib import Path
from typing import Any

from expertd.daemon.protocol.socket_trust import (
    UntrustedPath,
    check_ancestors,
    check_directory,
    resolve_group,
    resolve_user,
    user_name,
)

__all__ = ["UntrustedPath", "resolve_group", "resolve_user"]


def make_socket_dir(directory: Path, gid: int | None) -> None:
    """The daemon's socket directory, made by the daemon: 0700, or 0750 owned by group ``gid``.

    One that exists must already be this user's and writable by nobody else; `UntrustedPath`
    otherwise (a hostile user may have made it first).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    check_ancestors(directory, {os.geteuid()})
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass  # made earlier (by us, systemd's RuntimeDirectory, or someone else): checked below
    else:
        if gid is not None:
            os.chown(directory, -1, gid)
        os.chmod(directory, 0o750 if gid is not None else 0o700)  # exact, whatever the umask
    info = check_directory(directory, {os.geteuid()})
    if gid is not None and not (info.st_gid == gid and info.st_mode & 0o050 == 0o050):
        os.chown(directory, -1, gid)  # ours and no one else's to write: safe to open to the group
        os.chmod(directory, stat.S_IMODE(info.st_mode) | 0o050)


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is at the other end of an ipc:// connection, as the kernel says."""

    uid: int
    gid: int
    pid: int  # 0 where the peer's pid is not visible from the daemon's pid namespace

    @classmethod
    def from_property(cls, peer_address: str | None) -> Peer | None:
        """libzmq's ``Peer-Address`` of an ipc:// message: ``...:UID:GID:PID`` (None: not reported)."""
        if not peer_address:
            return None
        parts = peer_address.rsplit(":", 3)
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            return None
        return cls(int(parts[1]), int(parts[2]), int(parts[3]))

    def groups(self) -> set[int]:
        """Its primary group and, where it has a passwd entry, its supplementary ones."""
        try:
            return {self.gid, *os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid)}
        except KeyError:
            return {self.gid}


def process_start(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), or None where /proc does not show it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else -1


def process_gone(pid: int, started: int | None) -> bool:
    """Has process ``pid`` (started at ``started``) exited? False where that cannot be told."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: it exists
    now = process_start(pid)
    if now is None:  # hidden (ProtectProc=invisible): alive as far as we can tell
        return False
    return now == -1 or (started is not None and started >= 0 and now != started)  # a zombie, or pid reused


class Refused(Exception):
    """A hello whose claim the peer's identity does not back; the message says why."""


def ipc_identity(
    peer: Peer | None,
    claim: str,
    tenants: dict[str, Any],
    ipc_admin: str,
    token_ok: bool,
) -> tuple[str, str]:
    """(tenant, role) of an ipc:// client from what the kernel says it is, not what it claims.

    A tenant that lists the peer's user or group (``[tenants.NAME] users/groups``) is its
    tenant; the daemon's own user and root may act as any tenant; any other user is the tenant
    named after it. A claim of another tenant is `Refused`. Admin: see ``[auth] ipc_admin``.
    """
    if peer is None:
        raise Refused("this libzmq does not report ipc:// peer credentials (SO_PEERCRED): who are you?")
    owner = peer.uid in (0, os.geteuid())
    bound = sorted(name for name, policy in tenants.items() if policy.binds(peer.uid, peer.groups()))
    own = user_name(peer.uid).replace(" ", "-")  # "uid 123" -> "uid-123"
    own_policy = tenants.get(own)
    if claim in bound:
        tenant = claim
    elif claim == "default" and bound:
        tenant = bound[0]
    elif owner:
        tenant = claim
    elif not bound and claim in ("default", own) and not (own_policy and own_policy.binds_anyone):
        tenant = own
    else:
        mine = " or ".join(bound) if bound else f"{own} (named after its user)"
        raise Refused(f"{user_name(peer.uid)} may not act as tenant {claim!r}: its tenant is {mine}")
    if ipc_admin == "all":
        role = "admin"
    elif ipc_admin == "token":
        role = "admin" if token_ok else "client"
    else:
        role = "admin" if owner else "client"
    return tenant, role
