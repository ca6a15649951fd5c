"""The shared-memory hit path under faults: many client processes, mixed hits and misses on a
small tier, clients SIGKILLed and replaced, one daemon restart; every view is checked against
the store while it is pinned. `bench/faults.py --fast-*` runs it long; tests/test_fast_path.py
runs it short."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from daemon_util import DaemonProcess
from fault_campaign import leftovers

WORKER = textwrap.dedent(
    """
    import json, random, sys, time
    import torch
    from expertd.client import ExpertClient
    from expertd.client.lease import FastLease
    from expertd.daemon.protocol import ExpertdError
    from expertd.daemon.store.reader import StoreReader

    address, store, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    reader = StoreReader(store)
    layers, experts = reader.manifest.num_layers, reader.manifest.num_experts
    want = {(l, e): reader.read_expert_tensors(l, e) for l in range(layers) for e in range(experts)}
    counts = {"acquires": 0, "fast": 0, "wrong_bytes": 0, "errors": 0, "checked_views": 0}
    client, stop = None, time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            if client is None:
                client = ExpertClient(address, timeout_s=5.0, connect_timeout_s=10.0)
            hot = rng.random() < 0.8  # mostly the same few experts (hits), sometimes any (misses)
            layer = rng.randrange(2) if hot else rng.randrange(layers)
            chosen = rng.sample(range(3) if hot else range(experts), 2)
            with client.acquire(layer, chosen, "device") as lease:
                counts["acquires"] += 1
                counts["fast"] += isinstance(lease, FastLease)
                for expert, tensors in lease.items():
                    for name, tensor in tensors.items():
                        counts["checked_views"] += 1
                        if not torch.equal(tensor, want[(layer, expert)][name]):
                            counts["wrong_bytes"] += 1
        except ExpertdError:
            counts["errors"] += 1  # the daemon restarting, or capacity: try again
            time.sleep(0.05)
    if client is not None:
        client.close()
    print(json.dumps(counts), flush=True)
    """
)

FLAGS = ["--host-size", "24 slots", "--device", "cpu", "--device-size", "8 slots", "--lease-timeout-s", "2.0"]


def run(store: Path, work: Path, clients: int, seconds: float, kills: int, seed: int = 0) -> dict[str, Any]:
    """``clients`` workers for ``seconds``, ``kills`` of them SIGKILLed (and replaced) along the
    way, the daemon SIGKILLed and restarted once halfway; then what is left behind."""
    rng = random.Random(seed)
    daemon = DaemonProcess(store, work / "fast-daemon", *FLAGS, "--log-level", "warning")
    started = time.monotonic()
    procs: list[subprocess.Popen] = []
    results: list[dict[str, int]] = []
    killed = 0

    def spawn(until: float) -> None:
        left = max(1.0, until - time.monotonic())
        argv = [
            sys.executable,
            "-c",
            WORKER,
            daemon.address,
            str(store),
            str(left),
            str(rng.randrange(1 << 30)),
        ]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))

    end = started + seconds
    try:
        for _ in range(clients):
            spawn(end)
        kill_times = sorted(started + rng.uniform(0.2, 0.9) * seconds for _ in range(kills))
        restart_at, restarted = started + seconds / 2, False
        while time.monotonic() < end:
            now = time.monotonic()
            if kill_times and now >= kill_times[0]:
                kill_times.pop(0)
                victim = rng.choice([p for p in procs if p.poll() is None] or [None])
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    killed += 1
                    spawn(end)
            if not restarted and now >= restart_at:
                daemon.kill()
                daemon.start()
                restarted = True
            time.sleep(0.05)
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            if proc.returncode == 0 and out.strip():
                results.append(json.loads(out.strip().splitlines()[-1]))
        daemon_alive = daemon.proc.poll() is None
        time.sleep(1.0)  # the daemon notices the last exits (pid polling)
        left = leftovers(daemon)
        stats = _admin_stats(daemon)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        daemon.kill()
    total = {
        key: sum(r[key] for r in results)
        for key in ("acquires", "fast", "wrong_bytes", "errors", "checked_views")
    }
    pins = [name for name in left["shm_files"] if "-pins-" in name]
    return {
        **total,
        "clients": clients,
        "seconds": seconds,
        "clients_killed": killed,
        "daemon_restarts": 1,
        "daemon_alive": daemon_alive,
        "leaked_leases": left["leases"] + left["pending"],
        "leaked_pin_files": max(0, len(pins) - left["clients"]),
        "fast_path_clients_left": stats.get("fast_path", {}).get("clients", 0) - stats.get("clients", 0),
        "deferred_writes": stats.get("fast_path", {}).get("deferred", 0),
        "internal_errors": left["internal_errors"],
    }


def _admin_stats(daemon: DaemonProcess) -> dict[str, Any]:
    from daemon_util import RawClient

    from expertd.daemon import protocol as proto

    client = RawClient(daemon.address)
    client.hello(name="fast-audit")
    stats = client.request(2, proto.Stats())
    client.close()
    return stats if isinstance(stats, dict) else {}
