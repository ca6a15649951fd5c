"""Prometheus metrics: what `expertd status` shows, at http://ADDRESS:PORT/metrics.

``[metrics] port`` (or ``expertd serve --metrics-port N``) turns it on; it needs the
optional ``prometheus-client`` (``pip install 'expertd[metrics]'``). The HTTP server runs
in its own thread, but only the event loop touches the daemon's state: a scrape asks for a
snapshot, the loop publishes ``Server.stats()`` at its next tick (within ``TICK_S``), and the
scrape renders that. Nobody scraping costs nothing. A scrape the loop does not answer in
time gets the previous snapshot, marked by ``expertd_stats_age_seconds``.

Counters are lifetime totals since the daemon started (``_total``); ratios are lifetime too
(prefer ``rate(expertd_tier_hits_total[1m]) / rate(expertd_tier_accesses_total[1m])``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

SNAPSHOT_WAIT_S = 1.0  # how long a scrape waits for the loop's fresh snapshot

_TIER_GAUGES = {
    "slots": "Slots of the tier (fixed at start).",
    "used": "Slots holding an expert.",
    "filling": "Slots being filled by a transfer.",
    "pinned": "Slots pinned by leases.",
    "waiting_admission": "Acquires waiting for slots to free up.",
}
_TIER_COUNTERS = {
    "accesses": "Experts acquired from the tier.",
    "hits": "Acquired experts that were already resident.",
    "evictions": "Experts evicted.",
    "prefetch_used": "Prefetched experts used before eviction.",
    "prefetch_wasted": "Prefetched experts evicted unused.",
}
_LINK_COUNTERS = {"started": "Transfers started.", "failed": "Transfers failed.", "bytes": "Bytes moved."}
_LINK_GAUGES = {"running": "Transfers in flight.", "queued": "Transfers queued."}
_TENANT_COUNTERS = {
    "acquires": "Acquires answered.",
    "accesses": "Experts acquired.",
    "hits": "Experts already resident.",
    "waited": "Acquires that waited for a copy.",
    "stall_s": "Seconds acquires waited for copies.",
    "errors": "Acquires refused.",
}


class MetricsUnavailable(RuntimeError):
    """The metrics endpoint cannot start (prometheus-client missing, port taken)."""


class MetricsExporter:
    """The /metrics endpoint; the event loop calls `wanted` each tick and `publish` when it is."""

    def __init__(self, port: int, address: str = "127.0.0.1", *, clock=time.monotonic) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise MetricsUnavailable(
                "[metrics] port needs prometheus-client: pip install 'expertd[metrics]'"
            ) from None
        self.clock = clock
        self._want = threading.Event()
        self._cond = threading.Condition()
        self._stats: dict[str, Any] | None = None
        self._published = float("-inf")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        try:
            self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise MetricsUnavailable(f"metrics endpoint {address}:{port}: {exc.strerror or exc}") from None
        self.port = self._server.server_port
        self.address = address

    # --- the loop's side ----------------------------------------------------------------------

    def wanted(self) -> bool:
        """True when a scrape waits for a snapshot (cheap: the loop asks every tick)."""
        return self._want.is_set()

    def publish(self, stats: dict[str, Any]) -> None:
        with self._cond:
            self._want.clear()
            self._stats, self._published = stats, self.clock()
            self._cond.notify_all()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the scrape's side --------------------------------------------------------------------

    def _snapshot(self) -> tuple[dict[str, Any] | None, float]:
        asked = self.clock()
        with self._cond:
            self._want.set()
            self._cond.wait_for(lambda: self._published >= asked, SNAPSHOT_WAIT_S)
            return self._stats, self.clock() - self._published

    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol: the metric families of one snapshot."""
        from prometheus_client.core import GaugeMetricFamily

        stats, age = self._snapshot()
        up = GaugeMetricFamily("expertd_up", "1 when the daemon's loop answered this scrape.")
        up.add_metric([], 1.0 if stats is not None and age < SNAPSHOT_WAIT_S else 0.0)
        yield up
        if stats is None:
            return
        yield GaugeMetricFamily("expertd_stats_age_seconds", "Age of the snapshot rendered.", value=age)
        yield from families(stats)


def families(stats: dict[str, Any]) -> Iterator[Any]:
    """Metric families for one `Server.stats()` map (the shape `expertd status` prints)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, labels: tuple[str, ...] = (), value: float | None = None) -> Any:
        if value is not None:
            return GaugeMetricFamily(f"expertd_{name}", doc, value=value)
        return GaugeMetricFamily(f"expertd_{name}", doc, labels=list(labels))

    def counter(name: str, doc: str, labels: tuple[str, ...] = (), value: float | None = None) -> Any:
        if value is not None:
            return CounterMetricFamily(f"expertd_{name}", doc, value=value)
        return CounterMetricFamily(f"expertd_{name}", doc, labels=list(labels))

    def per(make: Any, name: str, doc: str, label: str, rows: dict[str, Any], key: str) -> Any:
        """One family, a sample per row (tier or link) of ``rows[...][key]``."""
        family = make(name, doc, (label,))
        for row_name, row in rows.items():
            family.add_metric([row_name], row.get(key, 0))
        return family

    daemon = stats.get("daemon", {})
    if daemon:
        info = gauge(
            "info", "The daemon and what it serves (value 1).", ("version", "model", "device", "store")
        )
        info.add_metric([str(daemon[k]) for k in ("version", "model", "device", "store")], 1.0)
        yield info
        yield gauge("uptime_seconds", "Seconds since the daemon started.", value=daemon["uptime_s"])
    tiers = stats.get("tiers", {})
    for key, doc in _TIER_GAUGES.items():
        name = {"slots": "slots", "waiting_admission": "waiting_acquires"}.get(key, f"{key}_slots")
        yield per(gauge, f"tier_{name}", doc, "tier", tiers, key)
    for key, doc in _TIER_COUNTERS.items():
        yield per(counter, f"tier_{key}", doc, "tier", tiers, key)
    ratio = gauge("tier_hit_ratio", "Hits / accesses since start.", ("tier",))
    layer_accesses = counter("layer_accesses", "Experts acquired, per MoE layer.", ("tier", "layer"))
    layer_hits = counter("layer_hits", "Experts already resident, per MoE layer.", ("tier", "layer"))
    for tier, t in tiers.items():
        ratio.add_metric([tier], t.get("hit_rate", 0.0))
        for layer, (accesses, hits) in enumerate(zip(t["layer_accesses"], t["layer_hits"], strict=True)):
            layer_accesses.add_metric([tier, str(layer)], accesses)
            layer_hits.add_metric([tier, str(layer)], hits)
    yield from (ratio, layer_accesses, layer_hits)
    links = stats.get("links", {})
    for key, doc in _LINK_COUNTERS.items():
        yield per(counter, "link_transfers" if key == "started" else f"link_{key}", doc, "link", links, key)
    for key, doc in _LINK_GAUGES.items():
        yield per(gauge, f"link_{key}", doc, "link", links, key)
    acquires = stats.get("acquires", {})
    if acquires:
        yield counter("acquires", "Acquires answered.", value=acquires["count"])
        yield counter("acquires_waited", "Acquires that waited for a copy.", value=acquires["waited"])
        yield counter("acquire_errors", "Acquires refused.", value=acquires["errors"])
        yield counter("stall_seconds", "Seconds acquires waited for copies.", value=acquires["stall_s"])
        yield gauge("stall_max_seconds", "Longest single wait.", value=acquires["max_stall_s"])
    host = stats.get("host_compute")
    if host:
        yield gauge(
            "host_compute_gbps",
            "Host compute bandwidth tier=auto placement weighs (GB/s of expert bytes; 0: off).",
            value=host["gbps"],
        )
        yield gauge(
            "host_compute_threads",
            "CPU threads clients compute host-placed experts on.",
            value=host["threads"],
        )
    placed = counter("auto_placed", "Experts of tier=auto acquires, by placement.", ("placement",))
    for key, value in stats.get("placed", {}).items():
        placed.add_metric([key], value)
    yield placed
    prefetch = stats.get("prefetch", {})
    for key, value in prefetch.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if key == "cancelled":
                yield counter("prefetch_cancelled", "Prefetches cancelled (stale guesses).", value=value)
            else:
                yield gauge(
                    f"prefetch_{key}", f"Predictor {key} (as `expertd status` shows it).", value=value
                )
    for key, doc in (
        ("leases", "Leases held."),
        ("pending", "Acquires waiting."),
        ("clients", "Clients connected."),
    ):
        if key in stats:
            name = "pending_acquires" if key == "pending" else key
            yield gauge(name, doc, value=stats[key])
    messages = stats.get("messages", {})
    for key in ("received", "rejected"):
        if key in messages:
            yield counter(f"messages_{key}", f"Messages {key}.", value=messages[key])
    tenants = stats.get("tenants", {})
    for key, doc in _TENANT_COUNTERS.items():
        name = "tenant_stall_seconds" if key == "stall_s" else f"tenant_{key}"
        family = counter(name, doc, ("tenant",))
        for tenant, t in tenants.items():
            family.add_metric([tenant], t.get(key, 0))
        yield family
    sessions = gauge("client_leases", "Leases each connected client holds.", ("client", "tenant", "pid"))
    waiting = gauge("client_pending_acquires", "Acquires each client waits for.", ("client", "tenant", "pid"))
    for s in stats.get("sessions", []):
        labels = [s["name"], s["tenant"], str(s["pid"])]
        sessions.add_metric(labels, s["leases"])
        waiting.add_metric(labels, s["pending"])
    yield from (sessions, waiting)
