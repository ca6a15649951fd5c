"""Shared-memory hits through a real `expertd serve`: served without a round trip, the right
bytes, every access accounted, pins that hold writes back, and the faults around them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from daemon_util import DaemonProcess

from expertd.client import ExpertClient
from expertd.client.lease import FastLease
from expertd.daemon.protocol.residency import H_GENERATION
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader

pytestmark = pytest.mark.skipif(
    not __import__("expertd.client.fastpath", fromlist=["SUPPORTED"]).SUPPORTED,
    reason="the shared-memory hit path is on for x86-64 only",
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=4)  # 4 layers x 8 experts
    return path


@pytest.fixture
def daemon(store, short_dir):
    proc = DaemonProcess(
        store, short_dir, "--host-size", "32 slots", "--device", "cpu", "--device-size", "6 slots",
        "--lease-timeout-s", "2.0", "--max-pinned-share", "1", "--predictor", "none",
    )  # fmt: skip
    yield proc
    proc.kill()


def assert_bytes(lease, store: Path) -> None:
    reader = StoreReader(store)
    for expert, tensors in lease.items():
        want = reader.read_expert_tensors(lease.layer, expert)
        for name, tensor in tensors.items():
            assert torch.equal(tensor, want[name]), (lease.layer, expert, name)


def test_a_resident_acquire_is_served_from_shared_memory_with_the_stores_bytes(daemon, store):
    with ExpertClient(daemon.address) as client:
        first = client.acquire(1, [2, 5], "device")  # a miss: through the socket
        assert not isinstance(first, FastLease)
        first.release()
        second = client.acquire(1, [5, 2], "device")
        assert isinstance(second, FastLease) and second.hits == 2
        assert_bytes(second, store)
        second.release()
        stats = client.stats()
    assert stats["tiers"]["device"]["accesses"] == 4 and stats["tiers"]["device"]["hits"] == 2
    assert stats["fast_path"]["reports"] >= 1 and stats["fast_path"]["report_gaps"] == 0


def test_a_client_without_the_fast_path_takes_the_socket(daemon):
    with ExpertClient(daemon.address, fast_path=False) as client:
        client.acquire(0, [1], "device").release()
        lease = client.acquire(0, [1], "device")
        assert not isinstance(lease, FastLease) and lease.hits == 1


def fill(client: ExpertClient, layer: int, experts: list[int]) -> None:
    """Make ``experts`` of ``layer`` resident in the device tier (through the socket), unpinned."""
    client.release(client.acquire(layer, experts, "device"))


def device_slot_generation(client: ExpertClient, slot: int) -> int:
    assert client._fast is not None
    return client._fast.slot_generation("device", slot)


def test_a_slot_pinned_from_shared_memory_is_not_overwritten_until_unpinned(daemon, store):
    """The core does not know of the pin (the report waits out a long linger): the write into
    the slot that the core chose waits for the unpin."""
    with (
        ExpertClient(daemon.address, release_linger_s=60) as holder,
        ExpertClient(daemon.address, fast_path=False) as other,
    ):
        fill(holder, 0, [0])
        pinned = holder.acquire(0, [0], "device")
        assert isinstance(pinned, FastLease)
        (slot,) = pinned.slots
        generation = device_slot_generation(holder, slot)
        waiting = other.acquire_async(3, [0, 1, 2, 3, 4, 5], "device")  # all 6 slots: one is pinned
        time.sleep(0.5)
        assert not waiting.done(), "a write into a pinned slot started"
        assert_bytes(pinned, store)
        assert device_slot_generation(holder, slot) == generation
        pinned.release()
        lease = waiting.result(timeout=10)
        assert_bytes(lease, store)
        assert slot in lease.slots
        lease.release()
        assert other.stats()["fast_path"]["deferred"] >= 1


CHILD = """
import sys, time
from expertd.client import ExpertClient
from expertd.client.lease import FastLease
from expertd.daemon.protocol.residency import H_GENERATION
client = ExpertClient(sys.argv[1], release_linger_s=60)  # the daemon hears of no hit before it dies
client.release(client.acquire(0, [0], "device"))
lease = client.acquire(0, [0], "device")
assert isinstance(lease, FastLease)
print(lease.slots[0], flush=True)
time.sleep(60)
"""


def test_a_killed_clients_pins_are_reclaimed(daemon, store):
    child = subprocess.Popen([sys.executable, "-c", CHILD, daemon.address], stdout=subprocess.PIPE, text=True)
    try:
        slot = int(child.stdout.readline())
        with ExpertClient(daemon.address, fast_path=False) as other:
            waiting = other.acquire_async(3, [0, 1, 2, 3, 4, 5], "device")
            time.sleep(0.3)
            assert not waiting.done()
            child.send_signal(signal.SIGKILL)
            child.wait()
            lease = waiting.result(timeout=10)  # the daemon saw the process go (pid polling)
            assert slot in lease.slots
            assert_bytes(lease, store)
            lease.release()
            stats = other.stats()
        assert stats["fast_path"]["clients"] == 1 and stats["fast_path"]["deferred"] >= 1  # `other`'s
        time.sleep(0.3)  # `other` said bye: no pin file is left
        assert not [p for p in daemon.shm_files() if "-pins-" in p.name]
    finally:
        child.kill()
        child.wait()


def test_after_a_daemon_restart_the_old_table_is_void_and_the_client_hellos_again(daemon, store):
    with ExpertClient(daemon.address) as client:
        fill(client, 1, [3])
        assert isinstance(client.acquire(1, [3], "device"), FastLease)
        old = client._fast
        daemon.kill()
        daemon.start()  # a new daemon at the same address: it voids the dead one's tables
        assert old is not None and old.tiers["device"].header[H_GENERATION] == 0
        lease = client.acquire(1, [3], "device")  # not from the void table: through the socket
        assert not isinstance(lease, FastLease) and client._fast is not old
        assert_bytes(lease, store)
        lease.release()
        again = client.acquire(1, [3], "device")
        assert isinstance(again, FastLease)
        assert_bytes(again, store)


def test_a_stopped_daemon_voids_its_tables(daemon):
    client = ExpertClient(daemon.address)
    fast = client._fast
    assert fast is not None and fast.tiers["host"].header[H_GENERATION] != 0
    daemon.terminate()
    assert fast.tiers["host"].header[H_GENERATION] == 0
    assert fast.pin(0, [0], "host", None) is None and fast.void
    client.closed = True  # nobody to say bye to


def test_garbage_in_a_clients_own_pin_row_costs_only_its_session(daemon, store):
    with ExpertClient(daemon.address) as liar, ExpertClient(daemon.address, fast_path=False) as honest:
        fill(liar, 0, [0, 1, 2])
        assert liar._fast is not None
        row = liar._fast.tiers["device"].row
        for slot in range(len(row)):
            row[slot] = 0xFFFF  # pins every slot, more than it may
        for layer in (1, 2, 3):  # every write needs a slot the liar claims
            lease = honest.acquire(layer, [0, 1, 2, 3, 4, 5], "device")
            assert_bytes(lease, store)
            lease.release()
        time.sleep(0.3)  # its session ends at the daemon's next tick
        stats = honest.stats()
    assert stats["fast_path"]["revoked"] == 1 and stats["clients"] == 1


def test_a_truncated_pin_file_costs_only_its_session(daemon, store):
    with ExpertClient(daemon.address) as liar, ExpertClient(daemon.address, fast_path=False) as honest:
        fill(liar, 0, [0])
        assert liar._fast is not None
        os.truncate(liar._fast.path, 0)  # its own file: a daemon that mapped it would SIGBUS
        lease = honest.acquire(2, [0, 1, 2, 3, 4, 5], "device")
        assert_bytes(lease, store)
        lease.release()
        assert honest.stats()["fast_path"]["revoked"] == 1


def test_a_pin_held_past_the_lease_timeout_loses_the_session(daemon, store):
    """A row that pins few slots but never lets go: the write waits the lease timeout, no longer."""
    with ExpertClient(daemon.address) as holder, ExpertClient(daemon.address, fast_path=False) as other:
        fill(holder, 0, [0])
        pinned = holder.acquire(0, [0], "device")
        assert isinstance(pinned, FastLease)
        start = time.monotonic()
        lease = other.acquire_async(3, [0, 1, 2, 3, 4, 5], "device").result(timeout=15)
        assert time.monotonic() - start >= 2.0  # --lease-timeout-s
        assert_bytes(lease, store)
        assert other.stats()["fast_path"]["revoked"] == 1


def test_fast_path_campaign_short_form(store, short_dir):
    """bench/faults.py's fast-path section, CI-sized: kills, a restart, every view checked."""
    import fast_campaign

    r = fast_campaign.run(store, short_dir, clients=3, seconds=6.0, kills=2, seed=1)
    assert r["acquires"] > 0 and r["fast"] > 0 and r["checked_views"] > 0, r
    assert r["wrong_bytes"] == 0 and r["daemon_alive"] and r["internal_errors"] == 0, r
    assert r["leaked_leases"] == 0 and r["leaked_pin_files"] == 0 and r["fast_path_clients_left"] == 0, r


@pytest.mark.parametrize("isolation", ["partitioned", "private"])
def test_no_shared_memory_hits_where_a_tenant_is_isolated(store, short_dir, isolation):
    """The residency table would show every client what an isolated tenant has resident, and a
    hit answered without the daemon could not be timed: the daemon offers neither (security.md)."""
    config = short_dir / "expertd.toml"
    config.write_text(f'[tenants.secret]\nisolation = "{isolation}"\nshare = 0.5\n')
    daemon = DaemonProcess(
        store, short_dir, "--config", str(config), "--host-size", "32 slots", "--device", "cpu",
        "--device-size", "8 slots",
    )  # fmt: skip
    try:
        with ExpertClient(daemon.address) as client:
            assert client._fast is None and not any("fast" in h for h in client.info["tiers"].values())
            client.acquire(0, [1], "device").release()
            assert not isinstance(client.acquire(0, [1], "device"), FastLease)
        assert not [p for p in daemon.shm_files() if "-table-" in p.name or "-pins-" in p.name]
    finally:
        daemon.kill()


def test_no_shared_memory_hit_while_an_acquire_of_the_client_is_in_flight(daemon):
    """The daemon could give the in-flight acquire a slot pinned after it was sent, and the
    client would wait for a write its own pin holds back: so that hit takes the socket."""
    with ExpertClient(daemon.address) as client:
        fill(client, 0, [0])
        in_flight = client.acquire_async(2, [4, 5], "device")  # a miss
        lease = client.acquire(0, [0], "device")
        assert not isinstance(lease, FastLease)
        lease.release()
        in_flight.result(timeout=10).release()
        assert isinstance(client.acquire(0, [0], "device"), FastLease)
