"""The Prometheus endpoint: a real daemon, scraped over HTTP, says what `expertd status` says."""

from __future__ import annotations

import io
import socket
import urllib.request

import pytest

pytest.importorskip("prometheus_client", reason="needs expertd[metrics] (prometheus-client)")

from daemon_util import DaemonProcess  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from expertd.client import ExpertClient  # noqa: E402
from expertd.daemon.cli.main import CliError  # noqa: E402
from expertd.daemon.cli.serve_cli import format_status  # noqa: E402
from expertd.daemon.cli.status_view import CLEAR, watch  # noqa: E402
from expertd.daemon.service.config import ConfigError, ServeConfig  # noqa: E402
from expertd.daemon.store.pack import pack_synthetic  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_shows_what_status_shows(short_dir):
    store = short_dir / "store"
    pack_synthetic(store, "olmoe-1b-7b", scale=32, layers=3)
    port = free_port()
    daemon = DaemonProcess(
        store, short_dir, "--host-size", "40 slots", "--device", "cpu", "--device-size", "8 slots",
        "--metrics-port", str(port),
    )  # fmt: skip
    try:
        with ExpertClient(daemon.address, name="scraped") as client:
            before = client.stats()
            for layer, experts in [
                (0, [1, 2]),
                (1, [3, 4]),
                (0, [1, 2]),
                (2, [6, 7]),
                (1, [0, 5, 6]),  # 9 experts in all: the 8-slot device tier must evict
            ]:
                client.acquire(layer, experts).release()
            held = client.acquire(1, [3])  # a lease still held while scraped
            status = client.stats()
            metrics = scrape(port)
            held.release()
    finally:
        daemon.kill()

    def value(name: str, **labels: str) -> float:
        return metrics[name, tuple(sorted(labels.items()))]

    assert value("expertd_up") == 1.0
    for tier, t in status["tiers"].items():
        assert value("expertd_tier_slots", tier=tier) == t["slots"]
        assert value("expertd_tier_accesses_total", tier=tier) == t["accesses"]
        assert value("expertd_tier_hits_total", tier=tier) == t["hits"]
        assert value("expertd_tier_hit_ratio", tier=tier) == pytest.approx(t["hit_rate"])
        assert value("expertd_tier_evictions_total", tier=tier) == t["evictions"]
        for layer, (accesses, hits) in enumerate(zip(t["layer_accesses"], t["layer_hits"], strict=True)):
            assert value("expertd_layer_accesses_total", tier=tier, layer=str(layer)) == accesses
            assert value("expertd_layer_hits_total", tier=tier, layer=str(layer)) == hits
    assert status["tiers"]["device"]["hits"] > 0 and status["tiers"]["device"]["evictions"] > 0
    for link, info in status["links"].items():
        assert value("expertd_link_bytes_total", link=link) == info["bytes"] > 0
        assert value("expertd_link_transfers_total", link=link) == info["started"]
        assert value("expertd_link_queued", link=link) == info["queued"]
    assert value("expertd_acquires_total") == status["acquires"]["count"]
    assert value("expertd_stall_seconds_total") >= status["acquires"]["stall_s"]
    assert value("expertd_clients") == 1 and value("expertd_leases") == 1
    session = status["sessions"][0]
    assert value("expertd_client_leases", client="scraped", tenant="default", pid=str(session["pid"])) == 1
    assert value("expertd_tenant_hits_total", tenant="default") == status["tenants"]["default"]["hits"]
    assert value("expertd_prefetch_cancelled_total") == status["prefetch"]["cancelled"]

    # The watch view: what changed between frames, then the status page; a gone daemon is shown.
    frames = iter(
        [before, status, CliError("no expertd answered at ipc://x within 5 s"), KeyboardInterrupt()]
    )

    def fetch() -> dict:
        frame = next(frames)
        if isinstance(frame, BaseException):
            raise frame
        return frame

    out = io.StringIO()
    assert watch(fetch, format_status, 0.0, "ipc://x", clock=iter([0.0, 2.0]).__next__, out=out) == 0
    first, second, gone = out.getvalue().split(CLEAR)[1:]
    assert "(first frame)" in first and "hit % by layer" in first
    device = status["tiers"]["device"]["hits"] - before["tiers"]["device"]["hits"]
    device_rate = device / (status["tiers"]["device"]["accesses"] - before["tiers"]["device"]["accesses"])
    assert "last 2.0 s: 3 acquires/s, host hit" in second and f"device hit {device_rate:.1%}" in second
    assert "no expertd answered at ipc://x within 5 s -- polling again" in gone


def test_metrics_are_off_unless_a_port_is_given_and_the_port_is_checked():
    assert ServeConfig.from_mapping({"server": {"store": "/s"}}).metrics_port == 0
    config = ServeConfig.from_mapping({"server": {"store": "/s"}, "metrics": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"\[metrics\] port 70000"):
        config.checked()
