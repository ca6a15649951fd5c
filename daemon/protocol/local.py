"""What a client needs besides messages: the default address, the shared-memory slabs
named in the hello reply, and CURVE keys for a tcp:// daemon."""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from expertd.daemon.protocol.errors import DaemonUnavailable

SHM_PREFIX = "expertd-"  # every slab file's name starts so (the daemon removes stale ones by it)
_LINE = re.compile(r'^\s+([a-z-]+)\s*=\s*"(.*)"\s*$')


class SlabError(RuntimeError):
    """A slab could not be created or opened (no memory, bad handle, gone)."""


class AuthError(ValueError):
    """A key file or key operation is wrong; the message names the file."""


def default_address() -> str:
    """ipc:// under systemd's RuntimeDirectory, else the user's runtime dir, else /tmp."""
    runtime = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime.split(":")[0]) if runtime else Path(f"/tmp/expertd-{os.getuid()}")
    return f"ipc://{base / 'expertd.sock'}"


def open_shm_readonly(handle: dict[str, Any]) -> tuple[mmap.mmap, np.ndarray]:
    """Client side: map a shared-memory slab read-only (a write into it faults)."""
    path = Path(str(handle["path"]))
    if not path.name.startswith(SHM_PREFIX):
        raise SlabError(f"refusing to map {path}: not an expertd slab")
    expected = int(handle["slots"]) * int(handle["slot_bytes"])
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SlabError(f"cannot open slab {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size != expected:
            raise SlabError(f"slab {path} holds {size} bytes, the daemon said {expected}")
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    return mapping, np.frombuffer(mapping, dtype=np.uint8)


def read_certificate(path: Path) -> dict[str, str]:
    """The ``public-key``, ``secret-key`` and metadata entries of a ZPL certificate file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuthError(f"{path}: {exc.strerror}") from None
    values = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            values[match[1]] = match[2]
    if "public-key" not in values or len(values["public-key"]) != 40:
        raise AuthError(f"{path}: not a CURVE certificate (no 40-character public-key)")
    return values


def use_curve(sock: zmq.Socket, server_key: Any, client_key: Any) -> None:
    """tcp://: authenticate ``sock`` with CURVE (the daemon refuses anything else).

    ``server_key``: the daemon's server.key; ``client_key``: your NAME.key_secret
    (default: $EXPERTD_SERVER_KEY, $EXPERTD_CLIENT_KEY).
    """
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
