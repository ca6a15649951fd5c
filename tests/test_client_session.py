"""The client's own logic against a scripted fake daemon: dispatch, lazy release, reconnect, timeouts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from client_fake_daemon import FakeDaemon, wait_for

from expertd.client import (
    CapacityError,
    DaemonUnavailable,
    ExpertClient,
    LeaseError,
    ProtocolError,
    RangeError,
    SessionError,
)
from expertd.client.client import RELEASE_FLUSH_COUNT
from expertd.daemon import protocol as proto
from expertd.daemon.store.pack import pack_synthetic


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client") / "store"
    pack_synthetic(path, "olmoe-1b-7b", scale=64, layers=2)  # 64 experts of 4 KiB per layer
    return path


@pytest.fixture
def address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/expertd.sock"


@pytest.fixture
def fake(address: str, store: Path):
    with FakeDaemon(address, str(store), slots=40) as daemon:
        yield daemon


@pytest.fixture
def client(fake: FakeDaemon, address: str):
    with ExpertClient(address, name="test", timeout_s=2.0, release_linger_s=60.0) as c:
        yield c


def test_hello_reports_the_model_and_maps_the_tiers(client: ExpertClient, fake: FakeDaemon) -> None:
    hello = fake.ops("hello")[0]
    assert (hello.version, hello.client, hello.tenant) == (proto.PROTOCOL_VERSION, "test", "default")
    assert (client.num_layers, client.num_experts) == (2, 64)
    assert client.tensor_names == ("gate_proj", "up_proj", "down_proj")
    assert client.default_tier == "host"


def test_release_is_carried_by_the_next_acquire(client: ExpertClient, fake: FakeDaemon) -> None:
    with client.acquire(0, [1, 2]) as first:
        assert first.slots == (fake.slot_of(0, 1), fake.slot_of(0, 2))
    second = client.acquire(1, [3])
    assert fake.ops("acquire")[1].release == [first.lease_id]
    assert fake.ops("release") == []
    assert list(fake.leases) == [second.lease_id]


def test_queued_releases_are_sent_when_no_acquire_comes(fake: FakeDaemon, address: str) -> None:
    with ExpertClient(address, timeout_s=2.0, release_linger_s=0.02) as client:
        lease = client.acquire(0, [5])
        lease.release()
        wait_for(lambda: fake.ops("release"))
        assert [r.leases for r in fake.ops("release")] == [[lease.lease_id]]
        wait_for(lambda: not fake.leases)


def test_release_queue_is_flushed_when_it_grows(client: ExpertClient, fake: FakeDaemon) -> None:
    leases = [client.acquire_async(0, [e]) for e in range(RELEASE_FLUSH_COUNT)]
    for pending in leases:
        pending.result().release()
    wait_for(lambda: sum(len(r.leases) for r in fake.ops("release")) == RELEASE_FLUSH_COUNT)
    assert len(fake.ops("release")) == 1  # one message for the whole queue
    wait_for(lambda: not fake.leases)


def test_explicit_release_waits_for_the_daemon(client: ExpertClient, fake: FakeDaemon) -> None:
    lease = client.acquire(0, [7])
    client.release(lease)
    assert not fake.leases and lease.released
    client.release(lease)  # already released: nothing is sent
    assert len(fake.ops("release")) == 1
    with pytest.raises(LeaseError, match="lease .* was released"):
        lease.tensors(0)


def test_replies_are_dispatched_by_id_in_completion_order(client: ExpertClient, fake: FakeDaemon) -> None:
    fake.reorder = 3  # the daemon answers the third acquire first
    pending = [client.acquire_async(0, [e]) for e in (10, 11, 12)]
    leases = [p.result() for p in pending]
    assert [lease.experts for lease in leases] == [(10,), (11,), (12,)]
    assert [lease.slots[0] for lease in leases] == [fake.slot_of(0, e) for e in (10, 11, 12)]


def test_concurrent_waiters_each_get_their_reply(client: ExpertClient, fake: FakeDaemon) -> None:
    fake.reorder = 4
    results: dict[int, tuple[int, ...]] = {}

    def worker(expert: int) -> None:
        with client.acquire(1, [expert]) as lease:
            results[expert] = lease.experts

    threads = [threading.Thread(target=worker, args=(e,)) for e in (20, 21, 22, 23)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert results == {e: (e,) for e in (20, 21, 22, 23)}


def test_restarted_daemon_gets_hello_again_and_the_retry(client: ExpertClient, fake: FakeDaemon) -> None:
    old = client.acquire(0, [1])
    old_slab = fake.slab
    fake.restart()
    new = client.acquire(0, [1])  # no_session -> hello -> the same acquire again
    assert len(fake.ops("hello")) == 2
    assert fake.ops("acquire")[-1].release == []  # leases of the old session are void
    assert old.stale and not new.stale
    with pytest.raises(SessionError, match=f"lease {old.lease_id} was taken before the daemon restarted"):
        old[1]
    assert new[1]["up_proj"].data_ptr() != old_slab.array.ctypes.data  # remapped to the new slab
    old.release()  # a void lease is dropped, not sent
    new.release()
    client.acquire(0, [2])
    assert fake.ops("acquire")[-1].release == [new.lease_id]


def test_daemon_restarted_with_another_model_is_refused(client: ExpertClient, fake: FakeDaemon) -> None:
    good = fake._hello
    fake._hello = lambda: {**good(), "model": "other", "num_experts": 8}
    fake.restart()
    with pytest.raises(
        SessionError, match="restarted with another model \\('other', 2 layers x 8 experts\\)"
    ):
        client.acquire(0, [1])


def test_pending_acquire_is_done_once_its_reply_arrived(client: ExpertClient) -> None:
    pending = client.acquire_async(1, [9])
    wait_for(pending.done)  # nobody waits in result(): done() reads the socket itself
    assert pending.result().experts == (9,)


def test_session_error_twice_is_raised(client: ExpertClient, fake: FakeDaemon) -> None:
    fake.errors["acquire"] = proto.SessionError("unknown client: say hello", "no_session")
    with pytest.raises(SessionError, match="unknown client: say hello"):
        client.acquire(0, [1])
    assert len(fake.ops("hello")) == 2 and len(fake.ops("acquire")) == 2


def test_error_replies_raise_typed_exceptions(client: ExpertClient) -> None:
    with pytest.raises(RangeError, match=r"layer 0 experts \[64\] out of range"):
        client.acquire(0, [64])
    with pytest.raises(CapacityError, match="no free slot"):
        client.acquire(0, list(range(41)))


def test_refused_acquire_still_releases_what_it_carried(client: ExpertClient, fake: FakeDaemon) -> None:
    client.acquire(0, [1]).release()
    with pytest.raises(RangeError):
        client.acquire(0, [99])  # refused before the carried release was done...
    wait_for(lambda: fake.ops("release"))  # ...so the client sends it explicitly
    wait_for(lambda: not fake.leases)


def test_acquire_carrying_an_expired_lease_still_releases_the_others(
    client: ExpertClient, fake: FakeDaemon
) -> None:
    expired, kept = client.acquire(0, [1]), client.acquire(0, [2])
    with fake._lock:
        fake._release(expired.lease_id)  # the daemon dropped it (lease timeout)
    expired.release()
    kept.release()
    lease = client.acquire(0, [3])  # the daemon ignores the expired one it was carried
    assert fake.ops("acquire")[-1].release == [expired.lease_id, kept.lease_id]
    assert list(fake.leases) == [lease.lease_id]


def test_no_daemon_raises_daemon_unavailable(address: str) -> None:
    with pytest.raises(DaemonUnavailable, match=f"expertd at {address} did not answer hello within 0.2 s"):
        ExpertClient(address, connect_timeout_s=0.2)


def test_silent_daemon_raises_daemon_unavailable(fake: FakeDaemon, address: str) -> None:
    client = ExpertClient(address, timeout_s=0.2)
    fake.mute.add("stats")
    with pytest.raises(DaemonUnavailable, match=r"did not answer stats within 0.2 s"):
        client.stats()
    fake.mute.add("acquire")
    with pytest.raises(DaemonUnavailable, match=r"did not answer acquire within 0.1 s"):
        client.acquire_async(0, [3]).result(timeout=0.1)
    client.close()


def test_lease_of_an_abandoned_acquire_is_released(client: ExpertClient, fake: FakeDaemon) -> None:
    fake.reorder = 2  # holds the first acquire's reply until a second acquire comes
    pending = client.acquire_async(0, [4])
    with pytest.raises(DaemonUnavailable):
        pending.result(timeout=0.05)
    client.acquire(0, [5])  # both replies come now; the abandoned lease goes to the release queue
    fake.reorder = 0
    client.ping()  # replies arrive in order: the late one is filed before the pong
    client.acquire(0, [6])
    abandoned_lease = fake.ops("acquire")[-1].release
    assert len(abandoned_lease) == 1 and abandoned_lease[0] not in fake.leases


def test_idle_client_pings_within_the_heartbeat(address: str, store: Path) -> None:
    with FakeDaemon(address, str(store), heartbeat_s=0.05) as fake, ExpertClient(address):
        time.sleep(0.3)
        pings = fake.ops("ping")
        assert len(pings) >= 4 and not any(p.reply for p in pings)


def test_client_waiting_for_a_slow_acquire_keeps_pinging(address: str, store: Path) -> None:
    with FakeDaemon(address, str(store), heartbeat_s=0.05) as fake, ExpertClient(address) as client:
        fake.mute.add("acquire")
        with pytest.raises(DaemonUnavailable):
            client.acquire_async(0, [1]).result(timeout=0.3)
        assert len(fake.ops("ping")) >= 4


def test_ping_stats_shutdown_and_hint(client: ExpertClient, fake: FakeDaemon) -> None:
    assert client.ping() > 0
    assert client.stats() == {"leases": 0, "resident": 0}
    client.hint(1, [3, 4], [0.7, 0.2])
    client.shutdown()
    hint = fake.ops("hint")[0]
    assert (hint.layer, hint.experts, hint.scores) == (1, [3, 4], [0.7, 0.2])
    assert fake.ops("ping")[0].reply and fake.ops("shutdown")


def test_close_says_bye_and_the_daemon_releases(fake: FakeDaemon, address: str) -> None:
    client = ExpertClient(address, release_linger_s=60.0)
    client.acquire(0, [1])
    client.close()
    wait_for(lambda: fake.ops("bye"))
    with pytest.raises(DaemonUnavailable, match="is closed"):
        client.stats()


def test_malformed_hello_is_a_protocol_error(fake: FakeDaemon, address: str) -> None:
    good = fake._hello
    fake._hello = lambda: {**good(), "tiers": {"host": {"kind": "nvme", "slots": 1, "slot_bytes": 4096}}}
    with pytest.raises(ProtocolError, match="unknown tier kind 'nvme' \\(known: host, cpu, cuda\\)"):
        ExpertClient(address, connect_timeout_s=1.0)
    fake._hello = lambda: {**good(), "protocol": proto.PROTOCOL_VERSION + 1}
    with pytest.raises(
        ProtocolError,
        match=f"speaks protocol {proto.PROTOCOL_VERSION + 1}, this client {proto.PROTOCOL_VERSION}",
    ):
        ExpertClient(address, connect_timeout_s=1.0)
