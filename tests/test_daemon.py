"""The daemon as a process: a real `expertd serve` on a temporary ipc:// socket, real shared memory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from daemon_util import EXPERTD, DaemonProcess, RawClient, ping

from expertd.daemon import protocol as proto
from expertd.daemon.protocol.local import open_shm_readonly
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=4)  # 4 layers x 8 experts, 84 KiB each
    return path


@pytest.fixture
def daemon(store, short_dir):
    proc = DaemonProcess(
        store, short_dir, "--host-size", "12 slots", "--device", "cpu", "--device-size", "3 slots",
        "--lease-timeout-s", "1.0", "--max-pinned-share", "1",  # a holder may pin the whole tier
    )  # fmt: skip
    yield proc
    proc.kill()


def test_hello_describes_the_layout_and_the_slabs(daemon):
    client = RawClient(daemon.address)
    hello = client.hello()
    assert hello["num_layers"] == 4 and hello["num_experts"] == 8
    assert [t["name"] for t in hello["tensors"]] == ["w1", "w3", "w2"]
    assert hello["tiers"]["host"]["slots"] == 12 and hello["tiers"]["device"]["slots"] == 3
    assert hello["default_tier"] == "device"
    assert Path(hello["tiers"]["host"]["path"]).exists()


def test_acquired_slots_hold_the_stores_bytes_in_every_tier(daemon, store):
    client = RawClient(daemon.address)
    hello = client.hello()
    slot_bytes, raw_bytes = hello["slot_bytes"], hello["raw_bytes"]
    views = {name: open_shm_readonly(handle)[1] for name, handle in hello["tiers"].items()}
    reader = StoreReader(store)
    expected = np.zeros(reader.manifest.slot_bytes, dtype=np.uint8)
    lease = None
    for request_id, (layer, experts, tier) in enumerate(
        [(0, [1, 2], "device"), (1, [7], "host"), (3, [0, 5, 6], "device"), (0, [1, 2], "device")], start=2
    ):
        release = [lease] if lease else []
        reply = client.request(request_id, proto.Acquire(layer, experts, tier, release))
        assert isinstance(reply, dict), reply
        lease = reply["lease"]
        for expert, slot in zip(experts, reply["slots"], strict=True):
            reader.read_expert(layer, expert, expected)
            got = views[tier][slot * slot_bytes : slot * slot_bytes + raw_bytes]
            assert np.array_equal(got, expected[:raw_bytes]), (layer, expert, tier)


BAD_FRAMES = [
    b"",
    b"\xc1",  # never valid msgpack
    os.urandom(64),
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"op": "acquire"}),
    msgpack.packb({"op": "acquire", "id": 9, "layer": "0", "experts": [1]}),
    msgpack.packb({"op": "acquire", "id": 9, "layer": 0, "experts": [True]}),
    msgpack.packb({"op": "acquire", "id": 9, "layer": 0, "experts": list(range(5000))}),
    msgpack.packb({"op": "acquire", "id": 9, "layer": 0, "experts": [1], "extra": 1}),
    msgpack.packb({"op": "acquire", "id": -1, "layer": 0, "experts": [1]}),
    msgpack.packb({"op": "acquire", "id": 9, "layer": 2**40, "experts": [1]}),
    msgpack.packb({"op": "launch_missiles", "id": 9}),
    msgpack.packb({"op": "hello", "id": 9, "version": 1, "client": "x" * 10_000}),
    b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion entries
    b"\xdb\x7f\xff\xff\xff" + b"a" * 10,  # a string claiming 2 GiB
    msgpack.packb({"op": "ping", "id": 1, "reply": True, "x": b"\0" * 100_000}),  # over 64 KiB
    msgpack.packb(msgpack.ExtType(3, b"boom")),
]


@pytest.mark.parametrize("frame", BAD_FRAMES, ids=range(len(BAD_FRAMES)))
def test_bad_messages_get_error_replies_and_the_daemon_keeps_serving(daemon, frame):
    client = RawClient(daemon.address)
    client.hello()
    client.send_frames(frame)
    _, error = client.recv()
    assert isinstance(error, proto.ProtocolError), error
    assert ping(daemon.address)
    assert isinstance(client.request(5, proto.Acquire(0, [1], "host")), dict)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (proto.Acquire(9, [0], "host"), proto.RangeError),
        (proto.Acquire(0, [8], "device"), proto.RangeError),
        (proto.Acquire(0, [0, 1, 2, 3], "device"), proto.CapacityError),
        (proto.Acquire(0, [0], "disk"), proto.ProtocolError),
        (proto.Release([12345]), proto.LeaseError),
        (proto.Hello(version=99, client="future"), proto.ProtocolError),
    ],
)
def test_requests_the_model_cannot_serve_are_typed_errors(daemon, message, error):
    client = RawClient(daemon.address)
    client.hello()
    assert isinstance(client.request(3, message), error)


def test_a_client_that_never_said_hello_is_told_to(daemon):
    client = RawClient(daemon.address)
    reply = client.request(4, proto.Acquire(0, [1], "host"))
    assert isinstance(reply, proto.SessionError)


def test_two_frames_in_one_message_are_rejected(daemon):
    client = RawClient(daemon.address)
    client.send_frames(b"a", b"b")
    _, error = client.recv()
    assert isinstance(error, proto.ProtocolError)


HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from daemon_util import RawClient
    from expertd.daemon import protocol as proto
    client = RawClient({address!r})
    client.hello("holder")
    reply = client.request(2, proto.Acquire(0, [0, 1, 2], "device"))
    assert isinstance(reply, dict), reply
    print("held", flush=True)
    time.sleep(60)
    """
)


def start_holder(address: str) -> subprocess.Popen:
    """A client process that leases every device slot and then hangs."""
    code = HOLDER.format(tests=str(REPO / "tests"), address=address)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_clients_slots_come_back_after_the_lease_timeout(daemon):
    holder = start_holder(daemon.address)
    client = RawClient(daemon.address, timeout_ms=15_000)
    client.hello("patient")
    holder.kill()  # SIGKILL: no bye, leases still held
    holder.wait()
    started = time.monotonic()
    reply = client.request(3, proto.Acquire(1, [3, 4, 5], "device"))
    waited = time.monotonic() - started
    assert isinstance(reply, dict), reply
    stats = client.request(4, proto.Stats())
    assert [s["name"] for s in stats["sessions"]] == ["patient"]
    assert waited < 15  # answered once the 1 s lease timeout ran out, not never


def test_other_clients_do_not_notice_a_killed_one(daemon):
    holder = start_holder(daemon.address)
    client = RawClient(daemon.address)
    client.hello()
    holder.kill()
    holder.wait()
    for request_id, layer in enumerate(range(4), start=2):  # host tier: not blocked by the holder
        assert isinstance(client.request(request_id, proto.Acquire(layer, [6, 7], "host")), dict)


def test_sigterm_answers_waiting_acquires_and_removes_shared_memory(daemon):
    holder = start_holder(daemon.address)
    waiting = RawClient(daemon.address)
    waiting.hello()
    waiting.send_frames(proto.encode_request(7, proto.Acquire(2, [1, 2, 3], "device")))
    time.sleep(0.3)  # the acquire now waits for the holder's slots
    assert daemon.shm_files()
    assert daemon.terminate() == 0
    reply_id, error = waiting.recv()
    assert reply_id == 7 and isinstance(error, proto.ShuttingDown)
    assert daemon.shm_files() == []
    assert not Path(daemon.address[len("ipc://") :]).exists()
    holder.kill()


def test_restart_after_sigkill_cleans_stale_shared_memory_and_old_clients_hello_again(daemon):
    client = RawClient(daemon.address)
    client.hello()
    assert isinstance(client.request(2, proto.Acquire(0, [1], "device")), dict)
    stale = daemon.shm_files()
    assert stale and daemon.kill() == -signal.SIGKILL
    assert all(path.exists() for path in stale)  # a SIGKILL leaves them behind
    daemon.start()
    assert not any(path.exists() for path in stale)
    assert isinstance(client.request(3, proto.Acquire(0, [1], "device")), proto.SessionError)
    client.hello()
    assert isinstance(client.request(4, proto.Acquire(0, [1], "device")), dict)


def test_ready_is_notified_after_the_socket_is_bound_and_the_watchdog_is_fed(store, short_dir):
    notify_path = short_dir / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(20)
    address = f"ipc://{short_dir / 'd.sock'}"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "300000"}
    proc = subprocess.Popen([*EXPERTD, "serve", "--store", str(store), "--address", address], env=env)
    try:
        messages = listener.recv(4096).decode()
        assert "READY=1" in messages.splitlines()
        assert ping(address, timeout_ms=2000)  # bound before READY
        seen = ""
        while "WATCHDOG=1" not in seen:
            seen += listener.recv(4096).decode()
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen += listener.recv(4096).decode()
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        listener.close()


@pytest.fixture
def patient_daemon(store, short_dir):
    """The same daemon with a lease timeout no slow start of a second process outlives."""
    proc = DaemonProcess(
        store, short_dir, "--host-size", "12 slots", "--device", "cpu", "--device-size", "3 slots",
        "--lease-timeout-s", "60",
    )  # fmt: skip
    yield proc
    proc.kill()


def test_status_command_shows_tiers_and_clients(patient_daemon):
    daemon = patient_daemon  # a 1 s timeout expired the client before a loaded machine started `status`
    client = RawClient(daemon.address)
    client.hello("visible-client")
    client.request(2, proto.Acquire(1, [2], "device"))
    out = subprocess.run([*EXPERTD, "status", "--address", daemon.address], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "device" in out.stdout and "visible-client" in out.stdout and "hit % by layer" in out.stdout


def test_status_of_no_daemon_is_a_one_line_error(short_dir):
    address = f"ipc://{short_dir / 'nobody.sock'}"
    out = subprocess.run(
        [*EXPERTD, "status", "--address", address, "--timeout-s", "0.3"], capture_output=True
    )
    assert out.returncode == 1 and b"no expertd answered" in out.stderr and out.stderr.count(b"\n") == 1


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["--host-size", "lots"], None, "host_size: 'lots' is not a size"),
        (["--device", "cpu", "--device-size", "0 slots"], None, "slot count must be a positive integer"),
        ([], "[tiers]\nhost_sise = '1GiB'\n", "unknown key [tiers] host_sise"),
        ([], "[tiers\n", "not valid TOML"),
        (["--host-policy", "nope"], None, "unknown policy 'nope'"),
        (["--device", "cpu", "--device-policy", "belady"], None, "needs the future"),
        ([], "[prefetch]\npredictor = 'psychic'\n", "unknown predictor 'psychic'"),
    ],
)
def test_bad_configuration_is_a_one_line_error(store, short_dir, args, config, message):
    extra = []
    if config is not None:
        (short_dir / "expertd.toml").write_text(config)
        extra = ["--config", str(short_dir / "expertd.toml")]
    address = f"ipc://{short_dir / 'x.sock'}"
    out = subprocess.run(
        [*EXPERTD, "serve", "--store", str(store), "--address", address, *extra, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (1, 2) and message in out.stderr, out.stderr
    (error,) = [line for line in out.stderr.splitlines() if "error:" in line]  # one line, no traceback
    assert message in error and "Traceback" not in out.stderr


def test_a_missing_store_is_a_startup_error(short_dir):
    out = subprocess.run(
        [*EXPERTD, "serve", "--store", str(short_dir / "none"), "--address", f"ipc://{short_dir / 'y.sock'}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "cannot open store" in out.stderr


def test_a_second_daemon_on_the_same_address_is_refused(daemon, store):
    out = subprocess.run(
        [*EXPERTD, "serve", "--store", str(store), "--address", daemon.address],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "another expertd is serving" in out.stderr
    assert ping(daemon.address)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path):
    unit = (REPO / "packaging" / "expertd.service").read_text()
    expertd = shutil.which("expertd") or str(Path(sys.executable).parent / "expertd")
    (tmp_path / "expertd.service").write_text(unit.replace("/usr/local/bin/expertd", expertd))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "expertd.service")], capture_output=True
    )
    assert out.returncode == 0, out.stderr.decode()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "RuntimeDirectory=",
        "LimitMEMLOCK=",
        "NoNewPrivileges=",
    ):
        assert directive in unit


def test_config_reference_and_example_match_the_code():
    from expertd.daemon.service.config import ServeConfig, config_doc

    assert (REPO / "docs" / "config.md").read_text() == config_doc(), "run: expertd serve --print-config-doc"
    example = ServeConfig.load(REPO / "packaging" / "expertd.toml")  # every key known and valid
    assert example.tiers_device == "cuda"  # its defaults: tests/test_packaging.py


@pytest.mark.parametrize("policy", ["lru", "layer-distance", "s3fifo"])
def test_the_daemons_hits_are_what_replay_predicted(tmp_path_factory, short_dir, policy):
    """One client acquiring a real trace's rows in order: the live counters equal the simulator's."""
    from expertd import traces
    from expertd.traces.format import read_trace
    from expertd.traces.replay import forward_ids, replay_timed
    from expertd.traces.timing import TimingModel

    trace = read_trace(traces.shipped())
    trace = trace.select(forward_ids(trace) < 40)  # 40 tokens x 24 layers
    store = tmp_path_factory.mktemp("granite") / "store"
    manifest = pack_synthetic(store, "granite-3.0-1b-a400m", scale=16)
    daemon = DaemonProcess(
        store, short_dir, "--host-size", "300 slots", "--device", "cpu", "--device-size", "80 slots",
        "--device-policy", policy, "--load-threads", "1",  # reads land in order, as in the simulator
        "--predictor", "none",  # demand loads only: prefetches would land on the daemon's clock
    )  # fmt: skip
    try:
        client = RawClient(daemon.address)
        client.hello()
        lease = None
        for request_id, (layer, experts) in enumerate(
            zip(trace.layer.tolist(), trace.experts.tolist(), strict=True), 2
        ):
            reply = client.request(
                request_id, proto.Acquire(layer, experts, "device", [lease] if lease else [])
            )
            lease = reply["lease"]
        live = client.request(10**6, proto.Stats())["tiers"]
    finally:
        daemon.kill()
    timing = TimingModel(
        expert_bytes=manifest.raw_bytes, h2d_gbps=10.0, nvme_gbps=1.0, layer_s=0.0, host_slots=300
    )
    predicted = replay_timed(trace, policy, 80, timing)
    assert live["device"]["hits"] == predicted.hits and live["device"]["accesses"] == predicted.accesses


@pytest.mark.parametrize("policy", ["lru", "layer-distance"])
def test_replay_agrees_with_a_daemon_serving_hits_from_shared_memory(tmp_path_factory, short_dir, policy):
    """As above through `ExpertClient` with the fast path on: hits it served itself, reported
    afterwards, leave the daemon's counters exactly where replay puts them. (500 of the 768
    experts fit: whole layers hit, and evictions still happen.)"""
    from expertd import traces
    from expertd.client import ExpertClient
    from expertd.traces.format import read_trace
    from expertd.traces.replay import forward_ids, replay_timed
    from expertd.traces.timing import TimingModel

    trace = read_trace(traces.shipped())
    trace = trace.select(forward_ids(trace) < 40)
    store = tmp_path_factory.mktemp("granite") / "store"
    manifest = pack_synthetic(store, "granite-3.0-1b-a400m", scale=16)
    daemon = DaemonProcess(
        store, short_dir, "--host-size", "300 slots", "--device", "cpu", "--device-size", "500 slots",
        "--device-policy", policy, "--load-threads", "1", "--predictor", "none",
    )  # fmt: skip
    try:
        with ExpertClient(daemon.address) as client:
            assert client._fast is not None, "the daemon offers shared-memory hits over ipc://"
            for layer, experts in zip(trace.layer.tolist(), trace.experts.tolist(), strict=True):
                client.acquire(layer, experts, "device").release()
            fast_hits = client._fast.hits
            live = client.stats()
    finally:
        daemon.kill()
    timing = TimingModel(
        expert_bytes=manifest.raw_bytes, h2d_gbps=10.0, nvme_gbps=1.0, layer_s=0.0, host_slots=300
    )
    predicted = replay_timed(trace, policy, 500, timing)
    assert fast_hits > 100, fast_hits and live["fast_path"]["report_gaps"] == 0
    device = live["tiers"]["device"]
    assert device["hits"] == predicted.hits and device["accesses"] == predicted.accesses


def test_the_trace_demo_runs_end_to_end():
    out = subprocess.run(
        [*EXPERTD, "demo", "--trace", "granite-3.0-1b-a400m", "--max-tokens", "12", "--scale", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens/s" in out.stdout and "it agrees with the daemon's" in out.stdout
    assert "stopped the daemon cleanly" in out.stdout


def test_a_client_of_the_previous_protocol_is_told_which_versions_differ(daemon):
    client = RawClient(daemon.address)
    client.send_frames(msgpack.packb({"op": "hello", "id": 1, "version": 1, "client": "old"}))
    _, error = client.recv()
    assert isinstance(error, proto.ProtocolError) and error.code == proto.ErrorCode.UNSUPPORTED_VERSION
    assert f"client speaks protocol 1, this daemon {proto.PROTOCOL_VERSION}" in str(error)
