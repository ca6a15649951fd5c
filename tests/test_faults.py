"""The fault campaign, short form: each fault gives its typed error, nothing is lost or leaked."""

from __future__ import annotations

import random
from pathlib import Path

import fault_campaign as fc
import pytest
from daemon_util import DaemonProcess, RawClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertd.daemon import protocol as proto
from expertd.daemon.store.pack import pack_synthetic


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fault-store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=4)
    return path


@pytest.fixture
def daemon(store, short_dir):
    (short_dir / "expertd.toml").write_text('[auth]\nipc_admin = "token"\n')  # fuzzed shutdowns are refused
    proc = DaemonProcess(store, short_dir, *fc.daemon_flags(), "--config", str(short_dir / "expertd.toml"))
    yield proc
    proc.kill()


def assert_clean(daemon: DaemonProcess, clients: int = 1) -> dict:
    left = fc.leftovers(daemon)
    assert left["leases"] == 0 and left["pending"] == 0 and left["clients"] <= clients, left
    slabs = [f"expertd-{daemon.pid}-{name}" for name in ("device", "host", "table-device", "table-host")]
    pins = [name for name in left["shm_files"] if name.startswith(f"expertd-{daemon.pid}-pins-")]
    assert sorted(set(left["shm_files"]) - set(pins)) == slabs and len(pins) <= clients, left
    assert left["internal_errors"] == 0, daemon.log()
    return left


def test_random_frames_each_get_the_replies_the_protocol_promises(daemon):
    rng = random.Random(1)
    counts = fc.fuzz(daemon.address, [fc.random_frame(rng) for _ in range(400)])
    assert counts["sent"] == 400 and counts["wrong_reply_count"] == 0 and counts["unanswered"] == 0, counts
    assert counts["error_replies"] > 200
    assert_clean(daemon)


message_maps = st.dictionaries(
    st.sampled_from(fc.FIELDS),
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(),
        st.text(max_size=40),
        st.binary(max_size=40),
        st.none(),
        st.booleans(),
        st.lists(st.integers(-5, 300), max_size=20),
    ),  # fmt: skip
    max_size=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(fc.OPS), body=message_maps)
def test_generated_messages_never_break_the_daemon(daemon, op, body):
    import msgpack

    frame = msgpack.packb({**body, "op": op}, use_bin_type=True)
    counts = fc.fuzz(daemon.address, [frame])
    assert counts["wrong_reply_count"] == 0 and counts["unanswered"] == 0, (frame, counts)


def test_killed_clients_leave_nothing_behind(daemon, store):
    fc.kill_clients(daemon.address, store, kills=4, seed=3)
    assert_clean(daemon)


def test_a_killed_and_restarted_daemon_never_serves_wrong_bytes(daemon, store):
    result = fc.kill_daemon(daemon, store, restarts=2, seed=4)
    assert result["wrong_bytes"] == 0 and result["untyped_errors"] == 0, result
    assert result["verified_experts"] > 0 and result["stale_shm_left"] == 0, result
    assert_clean(daemon)


def test_store_faults_are_typed_errors_and_never_wrong_bytes(store, short_dir):
    result = fc.store_faults(store, short_dir)
    assert result["wrong_bytes"] == 0 and result["typed_load_errors"] > 0 and result["served"] > 0, result


def test_overload_makes_progress_for_every_client(daemon, store):
    result = fc.overload(daemon.address, store, clients=16, seconds=3.0)
    assert result["errors"] == [] and result["hung_threads"] == 0, result
    assert result["min_acquires_per_client"] > 0, result
    assert_clean(daemon)


def test_an_injected_read_error_is_a_typed_error_for_that_acquire(store, short_dir):
    daemon = DaemonProcess(store, short_dir, *fc.daemon_flags(), env={"EXPERTD_INJECT_READ_ERRORS": "1.0"})
    try:
        client = RawClient(daemon.address)
        client.hello()
        reply = client.request(2, proto.Acquire(0, [1], "device"))
        assert isinstance(reply, proto.ExpertLoadError) and "injected I/O error" in str(reply)
        assert isinstance(client.request(3, proto.Stats()), dict)  # still serving
    finally:
        daemon.kill()
