"""docs/getting-started.md's flow, end to end: pack, serve as a service user and group (as
packaging/expertd.service runs it), `expertd status`, a client in the group, shutdown.

Needs root to create the service user (`useradd --system`, removed afterwards), as CI has;
skips with that reason elsewhere.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import pytest
from daemon_util import EXPERTD, ForkedDaemon, as_root_or_skip, run_as

from expertd.client import ExpertClient

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def service_user():
    """A system user and group of its own, like the packaged `expertd`; removed afterwards."""
    as_root_or_skip()
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd/userdel to create a service user")
    name = f"exd-svc-{os.getpid() % 100_000}"
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _client_in_the_group(address: str, daemon_user: str) -> dict:
    """As a user in the daemon's group: connect (trusting the service user), acquire, see its own tenant."""
    with ExpertClient(address, daemon_user=daemon_user, name="group-member") as client:
        with client.acquire(0, [1, 2]) as lease:
            tier, slots = lease.tier, list(lease.slots)
        return {"model": client.model, "tier": tier, "slots": slots, "tenant": client.stats()["tenant"]}


def test_pack_serve_as_a_service_user_status_and_a_client(service_user, short_dir):
    name, uid, gid = service_user.pw_name, service_user.pw_uid, service_user.pw_gid
    os.chmod(short_dir, 0o755)  # a parent other users may enter, as /run and /var/lib are
    store = short_dir / "store"
    subprocess.run(
        [*EXPERTD, "pack", "--synthetic", "mixtral-8x7b", "--scale", "64", "--layers", "2", "--quiet",
         str(store)],
        check=True, capture_output=True,
    )  # fmt: skip
    run_dir = short_dir / "run"  # what systemd's RuntimeDirectory=expertd, RuntimeDirectoryMode=0750 make
    run_dir.mkdir(mode=0o750)
    os.chown(run_dir, uid, gid)
    address = f"ipc://{run_dir}/expertd.sock"
    config = short_dir / "expertd.toml"
    config.write_text(
        f'[server]\nstore = "{store}"\naddress = "{address}"\n'
        '[tiers]\nhost_size = "16 slots"\ndevice = "cpu"\ndevice_size = "8 slots"\n'
        f'[auth]\nsocket_group = "{name}"\n'
    )
    os.chmod(config, 0o644)
    daemon = ForkedDaemon(["serve", "--config", str(config)], uid, gid, short_dir / "daemon.log", address)
    try:
        socket = os.stat(run_dir / "expertd.sock")
        assert (socket.st_uid, socket.st_gid, socket.st_mode & 0o777) == (uid, gid, 0o660)

        status = [*EXPERTD, "status", "--address", address]
        refused = subprocess.run(status, capture_output=True, text=True)
        assert refused.returncode == 1 and f"is owned by {name}" in refused.stderr, refused.stderr
        told = subprocess.run([*status, "--daemon-user", name], capture_output=True, text=True)
        assert told.returncode == 0, told.stderr
        assert "model synthetic mixtral-8x7b" in told.stdout  # root is admin: the full page

        seen = run_as(NOBODY.pw_uid, NOBODY.pw_gid, _client_in_the_group, address, name, groups=(gid,))
        assert seen == {"model": "synthetic mixtral-8x7b / 64", "tier": "device", "slots": seen["slots"],
                        "tenant": "nobody"}, seen  # fmt: skip
        assert len(seen["slots"]) == 2

        shutdown = subprocess.run(
            [*EXPERTD, "shutdown", "--address", address, "--daemon-user", name],
            capture_output=True,
            text=True,
        )
        assert shutdown.returncode == 0, shutdown.stderr
        assert daemon.stop() == 0, daemon.log()
        assert not (run_dir / "expertd.sock").exists()
    finally:
        daemon.stop()
