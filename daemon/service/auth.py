"""Who may talk to the daemon, as whom: CURVE keys for tcp://, socket modes and an admin token for ipc://.

Over ``tcp://`` every client must present a CURVE key listed in ``KEYS_DIR/clients/``;
each listed key carries its tenant and role (``client`` or ``admin``) as certificate
metadata, so tenants are bound to credentials by the operator, never chosen by the
client. pyzmq's ZAP authenticator does the handshake check (in its own thread; it
shares nothing with the event loop) and stamps each message with the key's
``tenant/role`` as its User-Id.

Over ``ipc://`` the socket file's mode (owner, or owner and one group) decides who
connects, and the kernel's word on each peer's uid decides its tenant and whether it is
admin (daemon/service/local_trust.py): by default the daemon's own user and root are;
with ``[auth] ipc_admin = "token"`` only holders of the admin token, a random secret in a
file only the daemon's user can read; with ``"all"`` every client that can connect.

Key files are ZeroMQ's certificate format (text, ZPL); nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
from pathlib import Path

from expertd.daemon.protocol.local import AuthError, read_certificate

log = logging.getLogger("expertd.auth")

CLIENTS_DIR = "clients"
SERVER_KEY = "server"
ROLES = ("client", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class ClientKey:
    name: str
    public_key: str  # z85
    tenant: str
    role: str

    @property
    def user_id(self) -> str:
        return f"{self.tenant}/{self.role}"


def parse_user_id(user_id: str) -> tuple[str, str]:
    """``tenant/role`` as the authenticator stamped it."""
    tenant, _, role = user_id.rpartition("/")
    return tenant, role


def write_certificate(path: Path, public_key: str, secret_key: str | None = None, **metadata: str) -> Path:
    """A ZPL certificate; the secret one is readable by its owner only."""
    lines = ["#   expertd CURVE certificate (ZeroMQ ZPL format)", "", "metadata"]
    lines += [f'    {key} = "{value}"' for key, value in metadata.items()]
    lines += ["curve", f'    public-key = "{public_key}"']
    if secret_key is not None:
        lines.append(f'    secret-key = "{secret_key}"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret_key else 0o644)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    return path


def new_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """``NAME.key`` (public, give it to the daemon's operator) and ``NAME.key_secret`` (keep it)."""
    import zmq

    _check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = (k.decode() for k in zmq.curve_keypair())
    try:
        return (
            write_certificate(directory / f"{name}.key", public),
            write_certificate(directory / f"{name}.key_secret", public, secret),
        )
    except FileExistsError:
        raise AuthError(f"{directory / name}.key exists: refusing to overwrite a key") from None


def allow(
    keys_dir: Path, public_key_file: Path, tenant: str, role: str = "client", name: str | None = None
) -> Path:
    """List a client's public key: it may connect over tcp:// as ``tenant`` with ``role``."""
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    _check_name(tenant, "tenant")
    name = name or public_key_file.name.removesuffix(".key_secret").removesuffix(".key")
    _check_name(name)
    public = read_certificate(public_key_file)["public-key"]
    clients = keys_dir / CLIENTS_DIR
    clients.mkdir(parents=True, exist_ok=True)
    for key in load_clients(keys_dir).values():
        if key.public_key == public:
            raise AuthError(f"that key is already allowed as {key.name!r} (tenant {key.tenant})")
    try:
        return write_certificate(clients / f"{name}.key", public, tenant=tenant, role=role)
    except FileExistsError:
        raise AuthError(f"a client named {name!r} is already allowed; revoke it first") from None


def revoke(keys_dir: Path, name: str) -> None:
    path = keys_dir / CLIENTS_DIR / f"{_check_name(name)}.key"
    if not path.exists():
        raise AuthError(f"no allowed client {name!r} in {keys_dir / CLIENTS_DIR}")
    path.unlink()


def load_clients(keys_dir: Path) -> dict[str, ClientKey]:
    """Allowed clients by public key."""
    out = {}
    for path in sorted((keys_dir / CLIENTS_DIR).glob("*.key")):
        values = read_certificate(path)
        tenant, role = values.get("tenant", ""), values.get("role", "client")
        if not tenant or role not in ROLES:
            raise AuthError(f"{path}: needs metadata tenant and a role in {ROLES} (use `expertd keys allow`)")
        out[values["public-key"]] = ClientKey(path.stem, values["public-key"], tenant, role)
    return out


def server_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """The daemon's (public, secret) CURVE key."""
    values = read_certificate(keys_dir / f"{SERVER_KEY}.key_secret")
    if "secret-key" not in values:
        raise AuthError(f"{keys_dir / SERVER_KEY}.key_secret has no secret-key")
    return values["public-key"].encode(), values["secret-key"].encode()


class CurveAuthenticator:
    """pyzmq's ZAP authenticator thread, allowing exactly the listed keys, stamping tenant/role."""

    def __init__(self, context, keys_dir: Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator
        from zmq.utils import z85

        clients = self.clients = load_clients(keys_dir)

        class Authenticator(ThreadAuthenticator):
            def curve_user_id(self, client_public_key: bytes) -> str:
                key = clients.get(z85.encode(client_public_key).decode())  # the raw 32-byte key
                return key.user_id if key else "?/none"

        class Allowlist:
            def callback(self, domain: str, key: bytes) -> bool:
                if key.decode() in clients:
                    return True
                log.warning("refused a tcp:// client: its CURVE key %s is not allowed", key.decode())
                return False

        self._auth = Authenticator(context)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=Allowlist())

    def allow_key(self, key: ClientKey) -> None:
        """Admit one more key without a file (the engine's own, made at start)."""
        self.clients[key.public_key] = key

    def close(self) -> None:
        self._auth.stop()


def new_admin_token(path: Path) -> str:
    """Write a fresh admin token readable by this user only; return it."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def read_admin_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name):
        raise AuthError(f"{what} {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name
