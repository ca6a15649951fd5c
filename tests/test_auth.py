"""Who may connect, as whom: ipc:// socket modes and the admin token, tcp:// with CURVE keys."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import zmq
from daemon_util import EXPERTD, DaemonProcess, RawClient

from expertd.client import ExpertClient
from expertd.daemon import protocol as proto
from expertd.daemon.cli.main import main
from expertd.daemon.service.auth import AuthError, allow, load_clients, new_keypair, revoke
from expertd.daemon.store.pack import pack_synthetic


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth-store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=2)
    return path


def config(directory: Path, text: str) -> list[str]:
    (directory / "expertd.toml").write_text(text)
    return ["--config", str(directory / "expertd.toml")]


def test_the_ipc_socket_is_owner_only_by_default(store, short_dir):
    daemon = DaemonProcess(store, short_dir)
    try:
        mode = stat.S_IMODE(os.stat(short_dir / "expertd.sock").st_mode)
        assert mode == 0o600, oct(mode)
    finally:
        daemon.kill()


def test_a_socket_group_opens_the_socket_to_that_group(store, short_dir):
    daemon = DaemonProcess(store, short_dir, *config(short_dir, '[auth]\nsocket_group = "root"\n'))
    try:
        info = os.stat(short_dir / "expertd.sock")
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == 0
    finally:
        daemon.kill()


def test_with_an_admin_token_only_its_holders_shut_down_or_see_other_tenants(store, short_dir):
    daemon = DaemonProcess(store, short_dir, *config(short_dir, '[auth]\nipc_admin = "token"\n'))
    try:
        token_file = short_dir / "expertd.sock.admin-token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        alice = ExpertClient(daemon.address, tenant="alice", name="alice-client")
        bob = ExpertClient(daemon.address, tenant="bob", name="bob-client")
        alice.acquire(0, [1]).release()
        bob.acquire(1, [2, 3]).release()
        view = alice.stats()
        assert view["tenant"] == "alice" and view["accesses"] == 1
        assert "tiers" not in view and [s["name"] for s in view["sessions"]] == ["alice-client"]
        with pytest.raises(proto.PermissionDenied):
            alice.shutdown()
        admin = ExpertClient(daemon.address, admin_token=token_file.read_text().strip())
        everything = admin.stats()
        assert everything["tenants"]["bob"]["accesses"] == 2 and "tiers" in everything
        out = subprocess.run(
            [*EXPERTD, "shutdown", "--address", daemon.address], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr  # the CLI reads the token file: same user
        assert daemon.wait(20) == 0
        assert not token_file.exists()
    finally:
        daemon.kill()


@pytest.fixture
def keys(short_dir) -> Path:
    keys_dir = short_dir / "keys"
    new_keypair(keys_dir, "server")
    for name, tenant, role in (("alice", "alice", "client"), ("ops", "ops", "admin")):
        public, _ = new_keypair(short_dir / "clients-side", name)
        allow(keys_dir, public, tenant, role)
    new_keypair(short_dir / "clients-side", "mallory")  # made, never allowed
    return keys_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tcp_daemon(store, short_dir, keys):
    address = f"tcp://127.0.0.1:{free_port()}"
    flags = config(short_dir, f'[auth]\nkeys_dir = "{keys}"\n')
    daemon = DaemonProcess(store, short_dir, *flags, probe=False, address=address)
    assert f"at {address}" in daemon.log()
    yield daemon
    daemon.kill()


def curve_client(short_dir: Path, keys: Path, name: str, address: str, **kw) -> ExpertClient:
    side = short_dir / "clients-side"
    return ExpertClient(
        address,
        server_key=keys / "server.key",
        client_key=side / f"{name}.key_secret",
        connect_timeout_s=5,
        **kw,
    )


def test_tcp_without_a_key_or_with_an_unlisted_one_is_refused_and_logged(tcp_daemon, short_dir, keys):
    raw = RawClient(tcp_daemon.address, timeout_ms=1500)  # no CURVE at all
    raw.send_frames(proto.encode_request(1, proto.Hello(version=1, client="plain")))
    with pytest.raises(TimeoutError):
        raw.recv()
    with pytest.raises(proto.DaemonUnavailable):
        curve_client(short_dir, keys, "mallory", tcp_daemon.address, timeout_s=1.5)
    assert "refused a tcp:// client" in tcp_daemon.log()


def test_tcp_tenants_are_bound_to_keys_not_to_what_clients_claim(tcp_daemon, short_dir, keys):
    alice = curve_client(short_dir, keys, "alice", tcp_daemon.address, tenant="ops")  # claims another tenant
    alice.acquire(0, [4]).release()
    view = alice.stats()
    assert view["tenant"] == "alice" and "tiers" not in view
    with pytest.raises(proto.PermissionDenied):
        alice.shutdown()
    ops = curve_client(short_dir, keys, "ops", tcp_daemon.address)
    assert ops.stats()["tenants"]["alice"]["accesses"] == 1
    ops.shutdown()


def test_serving_tcp_without_keys_is_refused_at_start(store, short_dir):
    flags = config(short_dir, '[server]\naddress = "tcp://127.0.0.1:1"\n')
    out = subprocess.run([*EXPERTD, "serve", "--store", str(store), *flags], capture_output=True, text=True)
    assert out.returncode == 2 and "[auth] keys_dir is required" in out.stderr


def test_the_keys_tool_allows_lists_and_revokes(short_dir, capsys):
    keys_dir, side = short_dir / "k", short_dir / "side"
    assert main(["keys", "new", "--server", "--dir", str(keys_dir)]) == 0
    assert main(["keys", "new", "carol", "--dir", str(side)]) == 0
    assert stat.S_IMODE(os.stat(side / "carol.key_secret").st_mode) == 0o600
    assert main(["keys", "allow", str(side / "carol.key"), "--tenant", "team-c", "--dir", str(keys_dir)]) == 0
    assert main(["keys", "list", "--dir", str(keys_dir)]) == 0
    assert "team-c" in capsys.readouterr().out
    assert main(["keys", "allow", str(side / "carol.key"), "--tenant", "x", "--dir", str(keys_dir)]) == 2
    assert "already allowed" in capsys.readouterr().err
    assert main(["keys", "revoke", "carol", "--dir", str(keys_dir)]) == 0
    assert load_clients(keys_dir) == {}
    with pytest.raises(AuthError, match="no allowed client"):
        revoke(keys_dir, "carol")
    with pytest.raises(AuthError, match="tenant 'a b'"):
        allow(keys_dir, side / "carol.key", "a b")
    assert zmq.has("curve")


def test_a_private_tenant_is_never_answered_faster_than_its_own_history_explains(store, short_dir):
    text = '[auth]\nipc_admin = "token"\n[tenants.eve]\nisolation = "private"\n'
    daemon = DaemonProcess(
        store, short_dir, "--device", "cpu", "--device-size", "8 slots", *config(short_dir, text)
    )
    try:
        victim = ExpertClient(daemon.address, tenant="vic", name="victim")
        eve = ExpertClient(daemon.address, tenant="eve", name="eve")
        admin = ExpertClient(
            daemon.address, admin_token=(short_dir / "expertd.sock.admin-token").read_text().strip()
        )
        for _ in range(3):
            victim.acquire(0, [5]).release()  # resident now, brought in by the victim
        lease = eve.acquire(0, [5])
        assert lease.hits == 1  # the physical copy is shared...
        lease.release()
        held = admin.stats()["isolation"]
        assert held["private_replies_held"] == 1 and held["private_held_s"] > 0  # ...the timing is not
        eve.acquire(0, [5]).release()  # now in eve's own history: answered as a hit
        assert admin.stats()["isolation"]["private_replies_held"] == 1
        victim.acquire(1, [6]).release()
        shared = ExpertClient(daemon.address, tenant="bob", name="bob")
        shared.acquire(1, [6]).release()  # a shared tenant: no holding back
        assert admin.stats()["isolation"]["private_replies_held"] == 1
    finally:
        daemon.kill()


def test_a_partitioned_tenant_shares_no_residency(store, short_dir):
    text = '[auth]\nipc_admin = "token"\n[tenants.carol]\nisolation = "partitioned"\nshare = 0.5\n'
    daemon = DaemonProcess(
        store, short_dir, "--device", "cpu", "--device-size", "8 slots", "--host-size", "16 slots",
        *config(short_dir, text),
    )  # fmt: skip
    try:
        victim = ExpertClient(daemon.address, tenant="vic", name="victim")
        carol = ExpertClient(daemon.address, tenant="carol", name="carol")
        admin = ExpertClient(
            daemon.address, admin_token=(short_dir / "expertd.sock.admin-token").read_text().strip()
        )
        victim_slots = set()
        for expert in range(4):
            with victim.acquire(0, [expert]) as lease:
                victim_slots |= set(lease.slots)
        with carol.acquire(0, [0, 1]) as lease:
            assert lease.hits == 0  # the victim's copies are not hers
            assert not set(lease.slots) & victim_slots  # her own slots
            assert all(slot < 4 for slot in lease.slots)  # half of the 8 device slots, the first half
        stats = admin.stats()
        assert set(stats["partitions"]) == {"carol", "shared"}
        assert stats["partitions"]["carol"]["device"]["slots"] == 4
        assert stats["tiers"]["device"]["slots"] == 8
    finally:
        daemon.kill()


def test_partition_shares_that_leave_nothing_for_the_others_are_refused(store, short_dir):
    text = "[tenants.a]\nisolation = 'partitioned'\nshare = 0.7\n"
    text += "[tenants.b]\nisolation = 'partitioned'\nshare = 0.6\n"
    flags = config(short_dir, text)
    out = subprocess.run([*EXPERTD, "serve", "--store", str(store), *flags], capture_output=True, text=True)
    assert out.returncode == 1 and "leave no host slot" in out.stderr, out.stderr


def test_a_start_that_fails_after_binding_leaves_no_socket_file(short_dir):
    import zmq

    from expertd.daemon.service.config import ServeConfig
    from expertd.daemon.service.listener import StartupError, listen

    config = ServeConfig.from_mapping({"auth": {"socket_group": "no-such-group-expertd"}}, "test")
    context, closers = zmq.Context(), []
    try:
        with pytest.raises(StartupError, match="socket_group 'no-such-group-expertd'"):
            listen(context, f"ipc://{short_dir / 'x.sock'}", config, closers, 0.1)
        assert not (short_dir / "x.sock").exists()
    finally:
        context.destroy(linger=0)
