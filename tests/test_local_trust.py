"""What another local user can and cannot do: stand in for the daemon, claim a tenant, shut it down.

Tests that act as a second user fork a child that setuid()s to `nobody` (see
`daemon_util.run_as`): they need root, which CI has, and skip with that reason elsewhere.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

import pytest
import zmq
from daemon_util import EXPERTD, DaemonProcess, RawClient, as_root_or_skip, ping, run_as

from expertd.client import ExpertClient
from expertd.daemon import protocol as proto
from expertd.daemon.service.config import TenantPolicy
from expertd.daemon.service.local_trust import Peer, Refused, ipc_identity
from expertd.daemon.store.pack import pack_synthetic

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trust-store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=2)  # 2 layers x 8 experts, top-2
    return path


@pytest.fixture
def open_dir(short_dir) -> Path:
    """A socket directory's parent that other users may enter (as /run is)."""
    os.chmod(short_dir, 0o755)
    return short_dir


def serve(store: Path, address: str, *flags: str) -> subprocess.CompletedProcess:
    """`expertd serve` expected to refuse to start: its exit and output."""
    return subprocess.run(
        [*EXPERTD, "serve", "--store", str(store), "--address", address, *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def config(directory: Path, text: str) -> list[str]:
    (directory / "expertd.toml").write_text(text)
    return ["--config", str(directory / "expertd.toml")]


# --- finding 1: nobody stands in for the daemon ---------------------------------------------


def test_serve_refuses_a_socket_directory_another_user_made(store, open_dir):
    as_root_or_skip()
    hostile = open_dir / "expertd-0"
    hostile.mkdir()
    os.chown(hostile, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(hostile, 0o777)  # as `nobody` made it, for root's daemon to use
    out = serve(store, f"ipc://{hostile}/expertd.sock")
    assert out.returncode == 1, out.stderr
    assert f"{hostile} is owned by nobody" in out.stderr
    assert list(hostile.iterdir()) == []  # no socket, no admin token


def test_serve_refuses_a_socket_directory_others_may_write(store, short_dir):
    shared = short_dir / "run"
    shared.mkdir()
    os.chmod(shared, 0o777)
    out = serve(store, f"ipc://{shared}/expertd.sock")
    assert out.returncode == 1
    assert "writable by its group or others (mode 0777)" in out.stderr
    assert list(shared.iterdir()) == []


def test_serve_makes_its_socket_directory_owner_only(store, short_dir):
    daemon = DaemonProcess(store, short_dir, address=f"ipc://{short_dir}/run/expertd.sock")
    try:
        info = os.stat(short_dir / "run")
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    finally:
        daemon.kill()


def test_a_client_refuses_an_impostor_socket_and_sends_it_nothing(open_dir):
    as_root_or_skip()
    hostile = open_dir / "expertd-0"
    hostile.mkdir()
    os.chown(hostile, NOBODY.pw_uid, NOBODY.pw_gid)  # `nobody`'s directory, `nobody`'s socket in it
    address = f"ipc://{hostile}/expertd.sock"
    impostor = zmq.Context.instance().socket(zmq.ROUTER)
    impostor.bind(address)
    try:
        with pytest.raises(proto.UntrustedSocket, match="is owned by nobody"):
            ExpertClient(address, admin_token="the-admin-token", connect_timeout_s=2)
        token_file = hostile / "expertd.sock.admin-token"
        token_file.write_text("the-admin-token\n")
        out = subprocess.run(
            [*EXPERTD, "status", "--address", address, "--timeout-s", "2"], capture_output=True, text=True
        )
        assert out.returncode == 1 and "is owned by nobody" in out.stderr, out.stderr
        assert not impostor.poll(500), "a hello (and its token) reached the impostor"
    finally:
        impostor.close(linger=0)


# --- finding 2: a tenant is who the kernel says ---------------------------------------------


def _nobody_tries(address: str) -> dict[str, str]:
    """As `nobody`: claim tenant alice, then connect as itself and try admin operations."""
    out = {}
    try:
        ExpertClient(address, tenant="alice", name="claims-alice", connect_timeout_s=5).close()
        out["alice"] = "accepted"
    except proto.ExpertdError as exc:
        out["alice"] = f"{type(exc).__name__}: {exc}"
    with ExpertClient(address, name="as-itself", connect_timeout_s=5) as client:
        out["tenant"] = client.stats()["tenant"]  # a non-admin sees only its own tenant
        client.acquire(0, [1, 2]).release()
        for op, call in (
            ("shutdown", client.shutdown),
            ("load_state", lambda: client.load_state("/etc/passwd")),
        ):
            try:
                call()
                out[op] = "done"
            except proto.ExpertdError as exc:
                out[op] = f"{type(exc).__name__}: {exc}"
    return out


def test_a_second_user_cannot_claim_another_tenant_or_shut_the_daemon_down(store, open_dir):
    as_root_or_skip()
    flags = config(
        open_dir,
        '[auth]\nsocket_group = "nogroup"\n'
        '[tenants.alice]\nisolation = "partitioned"\nshare = 0.5\nusers = ["root"]\n',
    )
    daemon = DaemonProcess(store, open_dir, *flags, address=f"ipc://{open_dir}/run/expertd.sock")
    try:
        seen = run_as(NOBODY.pw_uid, NOBODY.pw_gid, _nobody_tries, daemon.address, groups=(NOBODY.pw_gid,))
        assert seen["alice"].startswith("PermissionDenied: nobody may not act as tenant 'alice'"), seen
        assert seen["tenant"] == "nobody"
        assert seen["shutdown"].startswith("PermissionDenied") and seen["load_state"].startswith(
            "PermissionDenied"
        )
        assert ping(daemon.address)
        log = daemon.log()
        assert f"refused client claims-alice (uid {NOBODY.pw_uid}, pid " in log
        assert "refused shutdown from as-itself (tenant nobody)" in log
        with ExpertClient(daemon.address, tenant="alice") as alice:  # root: the tenant alice lists
            assert alice.stats()["tenants"]["nobody"]["accesses"] == 2  # and root is admin
    finally:
        daemon.kill()


# --- finding 3: errors name the real cause ---------------------------------------------------


def _connect(address: str) -> str:
    try:
        ExpertClient(address, connect_timeout_s=5).close()
        return "connected"
    except proto.ExpertdError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_a_socket_the_user_may_not_open_is_permission_denied_at_once(store, open_dir):
    as_root_or_skip()
    daemon = DaemonProcess(store, open_dir, address=f"ipc://{open_dir}/run/expertd.sock")  # 0700: root only
    try:
        started = time.monotonic()
        seen = run_as(NOBODY.pw_uid, NOBODY.pw_gid, _connect, daemon.address)
        assert seen.startswith("PermissionDenied: ") and "Permission denied" in seen, seen
        assert time.monotonic() - started < 4  # checked before connecting, not a hello timeout
    finally:
        daemon.kill()


def test_an_acquire_waiting_on_other_clients_pins_says_so(store, short_dir):
    flags = config(short_dir, "[clients]\ncapacity_wait_s = 0.5\n")
    daemon = DaemonProcess(store, short_dir, "--device", "cpu", "--device-size", "4 slots", *flags)
    try:
        first, second = ExpertClient(daemon.address), ExpertClient(daemon.address)
        held = [first.acquire(0, [0, 1]), second.acquire(0, [2, 3])]
        with ExpertClient(daemon.address, timeout_s=10) as starved:
            with pytest.raises(
                proto.CapacityError,
                match="waiting for capacity: 4 of 4 device slots pinned by 2 other clients",
            ):
                starved.acquire(1, [4])
            held[0].release()
            assert starved.acquire(1, [4]).slots  # capacity back: served
    finally:
        daemon.kill()


def test_one_client_may_pin_half_a_tier_and_is_refused_past_it_up_front(store, short_dir):
    daemon = DaemonProcess(store, short_dir, "--device", "cpu", "--device-size", "8 slots")
    try:
        with ExpertClient(daemon.address) as client:
            assert client.info["tiers"]["device"]["max_pinned"] == 4
            lease = client.acquire(0, [0, 1, 2])
            with pytest.raises(
                proto.CapacityError,
                match="would pin 5 of the device tier's 8 slots .3 held.; one client may pin 4",
            ):
                client.acquire(1, [0, 1])
            lease.release()
            client.acquire(1, [0, 1, 2, 3]).release()
    finally:
        daemon.kill()


# --- finding 5: sizes and dead clients -------------------------------------------------------


def test_serve_refuses_a_tier_smaller_than_one_layers_top_k(store, short_dir):
    out = serve(store, f"ipc://{short_dir}/expertd.sock", "--device", "cpu", "--device-size", "1 slots")
    assert out.returncode == 1
    assert "[tiers] device_size 1 slots holds 1 slot(s)" in out.stderr and "top-2 needs 2" in out.stderr


def test_serve_logs_a_tier_size_it_shrinks(store, short_dir):
    daemon = DaemonProcess(store, short_dir, "--host-size", "10TiB")
    try:
        assert "[tiers] host_size 10TiB is more than the store's 16 experts" in daemon.log()
        assert "allocating 16 slots" in daemon.log()
    finally:
        daemon.kill()


HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
from daemon_util import RawClient
from expertd.daemon import protocol as proto
client = RawClient({address!r})
client.hello("holder")
assert isinstance(client.request(2, proto.Acquire(0, [0, 1], "device")), dict)
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_clients_slots_come_back_long_before_the_lease_timeout(store, short_dir):
    daemon = DaemonProcess(
        store, short_dir, "--device", "cpu", "--device-size", "2 slots", "--max-pinned-share", "1",
        "--lease-timeout-s", "60",
    )  # fmt: skip
    try:
        code = HOLDER.format(tests=str(Path(__file__).parent), address=daemon.address)
        holder = subprocess.Popen([*EXPERTD[:1], "-c", code], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        client = RawClient(daemon.address, timeout_ms=20_000)
        client.hello("patient")
        holder.kill()  # SIGKILL: no bye
        holder.wait()
        started = time.monotonic()
        assert isinstance(client.request(2, proto.Acquire(1, [5, 6], "device")), dict)
        assert time.monotonic() - started < 5  # the 60 s lease timeout did not have to run out
        assert "client holder (pid" in daemon.log() and "exited without bye" in daemon.log()
    finally:
        daemon.kill()


# --- the rules, without a second user ----------------------------------------------------------


def test_libzmq_reports_the_kernels_credentials_of_an_ipc_peer(short_dir):
    context = zmq.Context.instance()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        router.bind(f"ipc://{short_dir}/peer.sock")
        dealer.connect(f"ipc://{short_dir}/peer.sock")
        dealer.send(b"hello")
        assert router.poll(5000)
        frame = router.recv_multipart(copy=False)[-1]
        peer = Peer.from_property(frame.get("Peer-Address"))
        assert peer == Peer(os.getuid(), os.getgid(), os.getpid())
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


TENANTS = {
    "alice": TenantPolicy("partitioned", 0.5, uids=frozenset({NOBODY.pw_uid})),
    "ops": TenantPolicy(gids=frozenset({12345})),
}


@pytest.mark.parametrize(
    ("claim", "expected"),
    [("default", "alice"), ("alice", "alice"), ("ops", None), ("nobody", None), ("root", None)],
)
def test_a_listed_user_is_its_tenant_whatever_it_claims(claim, expected):
    peer = Peer(NOBODY.pw_uid, NOBODY.pw_gid, 1)
    if expected is None:
        with pytest.raises(Refused, match=f"may not act as tenant '{claim}': its tenant is alice"):
            ipc_identity(peer, claim, TENANTS, "owner", token_ok=False)
    else:
        assert ipc_identity(peer, claim, TENANTS, "owner", token_ok=False) == (expected, "client")


def test_an_unlisted_user_is_the_tenant_named_after_it_and_the_owner_may_be_anyone():
    stranger = Peer(NOBODY.pw_uid, NOBODY.pw_gid, 1)
    assert ipc_identity(stranger, "default", {}, "owner", False) == ("nobody", "client")
    assert ipc_identity(stranger, "nobody", {}, "all", False) == ("nobody", "admin")
    with pytest.raises(Refused):
        ipc_identity(stranger, "alice", {}, "all", False)
    owner = Peer(os.geteuid(), os.getegid(), 1)
    assert ipc_identity(owner, "alice", TENANTS, "owner", False) == ("alice", "admin")
    assert ipc_identity(owner, "bob", TENANTS, "token", False) == ("bob", "client")
    assert ipc_identity(owner, "bob", TENANTS, "token", True) == ("bob", "admin")
    with pytest.raises(Refused, match="peer credentials"):
        ipc_identity(None, "default", {}, "all", False)


def test_a_partition_too_small_for_top_k_is_refused_by_name():
    from expertd.daemon.core.manager import ManagerConfig
    from expertd.daemon.core.partitions import PartitionError, Partitions
    from expertd.policies.base import Geometry

    config = ManagerConfig(Geometry(2, 8), host_slots=16, device_slots=8, min_pinned=2)
    Partitions(config, {"alice": 0.25})  # 2 of 8 device slots: one layer's top-2 fits
    with pytest.raises(
        PartitionError, match="tenant alice would get 1 device slot.s., fewer than one layer's top-2"
    ):
        Partitions(config, {"alice": 0.125})
