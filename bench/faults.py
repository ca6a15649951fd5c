"""The fault campaign, long form: figures for docs/reliability.md.

    .venv/bin/python bench/faults.py [--messages 10000] [--client-kills 20] [--daemon-kills 5] [--clients 64]
    .venv/bin/python bench/faults.py --hostile-only [--hostile-attempts 5]     # as root
    .venv/bin/python bench/faults.py --fast-only [--fast-clients 8] [--fast-seconds 60] [--fast-kills 8]

Phases (tests/fault_campaign.py has the machinery; tests/test_faults.py the short form):
fuzzing with random frames and hypothesis-generated messages, clients SIGKILLed while
holding leases with transfers in flight, the daemon SIGKILLed mid-work and restarted by
a supervisor loop, store faults (flipped bytes, truncation underneath, injected I/O
errors, the directory replaced underneath), overload (N clients against a device tier
smaller than their demand), with the daemon's memory sampled throughout; then, as root, a
hostile second local user (tests/hostile_user.py: socket hijacks, tenant claims, admin
operations, a client starving the rest); and the shared-memory hit path (tests/fast_campaign.py:
clients with mixed hits and misses on a small tier, SIGKILLed and replaced, one daemon restart,
every view checked against the store). Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fast_campaign  # noqa: E402
import fault_campaign as fc  # noqa: E402
from daemon_util import DaemonProcess  # noqa: E402

from expertd.daemon.store.manifest import load_manifest  # noqa: E402
from expertd.daemon.store.pack import pack_synthetic  # noqa: E402


class MemoryWatch:
    """Samples a daemon's resident set and its shared-memory files while a phase runs."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.max_rss_mib = 0.0
        self.max_shm_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = Path(f"/proc/{self.daemon.pid}/status").read_text()
                rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
                shm = sum(p.stat().st_size for p in Path("/dev/shm").glob(f"expertd-{self.daemon.pid}-*"))
                self.max_rss_mib = max(self.max_rss_mib, rss / 1024)
                self.max_shm_mib = max(self.max_shm_mib, shm / 2**20)
            except (OSError, StopIteration):
                pass  # between a kill and a restart
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def hypothesis_frames(count: int, seed: int) -> list[bytes]:
    """Messages drawn by hypothesis (maps of known and unknown fields, every msgpack type)."""
    import msgpack
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    frames: list[bytes] = []
    values = st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(), st.text(max_size=40),
        st.binary(max_size=40), st.none(), st.booleans(), st.lists(st.integers(-5, 300), max_size=20),
    )  # fmt: skip

    @hyp_seed(seed)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(op=st.sampled_from(fc.OPS), body=st.dictionaries(st.sampled_from(fc.FIELDS), values, max_size=6))
    def collect(op, body):
        frames.append(msgpack.packb({**body, "op": op}, use_bin_type=True))

    collect()
    return frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--client-kills", type=int, default=20)
    parser.add_argument("--daemon-kills", type=int, default=5)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="overload phase length")
    parser.add_argument("--hostile-attempts", type=int, default=5, help="rounds of each hostile-user attempt")
    parser.add_argument("--hostile-only", action="store_true", help="only the hostile-local-user section")
    parser.add_argument("--fast-clients", type=int, default=8, help="fast-path section: client processes")
    parser.add_argument("--fast-seconds", type=float, default=60.0, help="fast-path section: run length")
    parser.add_argument("--fast-kills", type=int, default=8, help="fast-path section: clients SIGKILLed")
    parser.add_argument("--fast-only", action="store_true", help="only the shared-memory hit path section")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="exd-faults-", dir="/tmp"))
    store = work / "store"
    pack_synthetic(store, "mixtral-8x7b", scale=64, layers=4)
    if args.hostile_only:
        report = {"bench": "faults", "hostile": hostile_section(store, work, args.hostile_attempts)}
        shutil.rmtree(work, ignore_errors=True)
        print_hostile(report["hostile"])
        print(json.dumps(report))
        return 0
    if args.fast_only:
        report = {"bench": "faults", "fast_path": fast_section(store, work, args)}
        shutil.rmtree(work, ignore_errors=True)
        print_fast(report["fast_path"])
        print(json.dumps(report))
        return 0
    (work / "expertd.toml").write_text('[auth]\nipc_admin = "token"\n')
    daemon = DaemonProcess(store, work / "d", *fc.daemon_flags(), "--config", str(work / "expertd.toml"))
    watch = MemoryWatch(daemon)
    report: dict = {"bench": "faults"}
    try:
        rng = random.Random(0)
        started = time.monotonic()
        random_part = args.messages - args.messages // 5
        frames = [fc.random_frame(rng) for _ in range(random_part)]
        frames += hypothesis_frames(args.messages - random_part, seed=1)
        report["fuzz"] = fc.fuzz(daemon.address, frames)
        report["fuzz"]["seconds"] = time.monotonic() - started
        report["client_kills"] = fc.kill_clients(daemon.address, store, args.client_kills, seed=2)
        report["after_client_kills"] = fc.leftovers(daemon)
        report["overload"] = fc.overload(daemon.address, store, args.clients, args.seconds)
        report["after_overload"] = fc.leftovers(daemon)
        report["daemon_kills"] = fc.kill_daemon(daemon, store, args.daemon_kills, seed=3)
        report["after_daemon_kills"] = fc.leftovers(daemon)
    finally:
        watch.stop()
        daemon.kill()
    report["store_faults"] = fc.store_faults(store, work)
    report["hostile"] = hostile_section(store, work, args.hostile_attempts)
    report["fast_path"] = fast_section(store, work, args)
    slabs_mib = (24 + 6) * load_manifest(store).slot_bytes / 2**20  # the host and device slots
    report["memory"] = {
        "max_rss_mib": watch.max_rss_mib,
        "max_shm_mib": watch.max_shm_mib,
        "slab_budget_mib": slabs_mib,
    }
    shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    print_hostile(report["hostile"])
    print_fast(report["fast_path"])
    print(json.dumps(report))
    return 0


def fast_section(store: Path, work: Path, args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]
    result = fast_campaign.run(store, work, args.fast_clients, args.fast_seconds, args.fast_kills, seed=4)
    result["loadavg_before"] = load_before
    return result


def print_fast(f: dict) -> None:
    print(
        f"shared-memory hit path: {f['clients']} clients x {f['seconds']:g} s, "
        f"{f['clients_killed']} SIGKILLed, {f['daemon_restarts']} daemon restart "
        f"(load average {f['loadavg_before']:.1f} before)"
    )
    rows = [
        ("acquires (of them served from shared memory)", f"{f['acquires']} ({f['fast']})"),
        ("views checked against the store / wrong bytes", f"{f['checked_views']} / {f['wrong_bytes']}"),
        ("leaked leases / pin files / fast-path clients", f"{f['leaked_leases']} / {f['leaked_pin_files']} / "
         f"{f['fast_path_clients_left']}"),
        ("writes held back by a pin (last daemon)", f["deferred_writes"]),
        ("daemon up at the end; internal errors", f"{f['daemon_alive']}; {f['internal_errors']}"),
    ]  # fmt: skip
    for label, value in rows:
        print(f"  {label:<50} {value}")


def hostile_section(store: Path, work: Path, attempts: int) -> dict:
    """A second local user's attempts (as `nobody`): needs root to become one."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to act as a second local user"}
    from hostile_user import hostile_local_user

    hostile = work / "hostile"
    hostile.mkdir()
    os.chmod(work, 0o755)  # `nobody` must reach the socket directories below, as it would under /run
    return hostile_local_user(store, hostile, attempts)


def print_hostile(h: dict) -> None:
    print("hostile local user (as `nobody`, against root's daemon):")
    if "skipped" in h:
        print(f"  skipped: {h['skipped']}")
        return
    print(f"  {'attempt':<44} {'tries':>5} {'successes':>9} {'refused':>7} {'crashes':>7}")
    labels = {
        "hijack": "socket hijack (directory first, impostor)",
        "tenant_claims": "claim another tenant",
        "admin_ops": "shutdown / load_state / every tenant's stats",
        "starving_client": "pin past the cap; starve a third client",
    }
    for key, label in labels.items():
        c = h[key]
        print(f"  {label:<44} {c['attempts']:>5} {c['successes']:>9} {c['refused']:>7} {c['crashes']:>7}")
    print(f"  daemon still answering: {h['daemon_up']}; internal errors logged: {h['internal_errors']}")


def _stray_files(left: dict) -> int:
    """Shared-memory files beyond the two slabs, their two residency tables, and one pin file per
    connected client."""
    pins = sum(1 for name in left["shm_files"] if "-pins-" in name)
    return len(left["shm_files"]) - pins - 4 + max(0, pins - left["clients"])


def print_table(r: dict) -> None:
    leftovers = [r["after_client_kills"], r["after_overload"], r["after_daemon_kills"]]
    leaks = sum(x["leases"] + x["pending"] + _stray_files(x) for x in leftovers)
    wrong = r["daemon_kills"]["wrong_bytes"] + r["store_faults"]["wrong_bytes"]
    rows = [
        ("messages fuzzed (random frames + hypothesis)", r["fuzz"]["sent"]),
        ("  replies not as the protocol promises", r["fuzz"]["wrong_reply_count"] + r["fuzz"]["unanswered"]),
        ("clients SIGKILLed holding leases", r["client_kills"]["clients_killed"]),
        ("daemon SIGKILLs survived (supervised restarts)", r["daemon_kills"]["daemon_kills"]),
        ("  stale shared-memory files left after restarts", r["daemon_kills"]["stale_shm_left"]),
        ("store faults: typed load errors", r["store_faults"]["typed_load_errors"]),
        (
            "experts verified against their checksums",
            r["daemon_kills"]["verified_experts"] + r["store_faults"]["verified_experts"],
        ),  # fmt: skip
        ("replies with wrong bytes", wrong),
        ("leaks (leases, waiting acquires, shm files)", leaks),
        ("internal errors logged", sum(x["internal_errors"] for x in leftovers)),
        (f"overload: {r['overload']['clients']} clients, acquires", r["overload"]["acquires"]),
        ("  fewest acquires by one client", r["overload"]["min_acquires_per_client"]),
        ("  worst wait for one acquire (s)", round(r["overload"]["worst_wait_s"], 3)),
        ("daemon peak RSS (MiB)", round(r["memory"]["max_rss_mib"], 1)),
        (
            "shared memory peak / slab budget (MiB)",
            f"{r['memory']['max_shm_mib']:.1f} / {r['memory']['slab_budget_mib']:.1f}",
        ),  # fmt: skip
    ]
    for label, value in rows:
        print(f"{label:<52} {value}")


if __name__ == "__main__":
    sys.exit(main())
