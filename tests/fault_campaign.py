"""The fault campaign: hostile messages, killed clients, a killed daemon, broken stores, overload.

Each phase runs against real daemon processes and returns counts. "Nothing lost" is
checked the same way everywhere: every acquire reply is either the right bytes (each
leased expert's bytes hash to the manifest's xxh64) or a typed error, and afterwards
no lease, waiting acquire, shared-memory file or thread is left over. The test suite
runs a short form (tests/test_faults.py); bench/faults.py runs the long one and
writes docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import xxhash
from daemon_util import EXPERTD, DaemonProcess, RawClient

from expertd.daemon import protocol as proto
from expertd.daemon.store.manifest import load_manifest

OPS = ["hello", "acquire", "release", "hint", "stats", "ping", "end", "bye", "load_state", "nonsense", ""]
FIELDS = ["layer", "experts", "tier", "release", "request", "lease", "leases", "scores", "client", "tenant",
          "version", "pid", "token", "reply", "path", "id", "op", "zzz"]  # fmt: skip
TESTS_DIR = Path(__file__).resolve().parent


# --- values a fuzzer throws --------------------------------------------------------------------


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(11 if depth < 2 else 8)
    if kind == 0:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63), 2**40, 10**6])
    if kind == 1:
        return rng.random() * rng.choice([1, -1e300, 1e300]) if rng.random() < 0.9 else float("nan")
    if kind == 2:
        return rng.choice(["", "device", "host", "x" * rng.randrange(300), "\x00\n", "acquire", "é",
                           "/dev/zero", "/", "/proc/self/mem", "/nonexistent/state"])  # fmt: skip
    if kind == 3:
        return os.urandom(rng.randrange(64))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind in (5, 6, 7):
        return [rng.randrange(-3, 12) for _ in range(rng.choice([0, 1, 2, 3, 8, 2000]))]
    if kind == 8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 9:
        return {
            str(random_value(rng, depth + 1))[:8]: random_value(rng, depth + 1)
            for _ in range(rng.randrange(3))
        }
    return msgpack.ExtType(rng.randrange(128), b"x")


def random_frame(rng: random.Random) -> bytes:
    """One hostile frame: raw bytes, truncated msgpack, or a map of plausible and absurd fields."""
    kind = rng.random()
    if kind < 0.15:
        return os.urandom(rng.randrange(1, 200))
    message: dict[Any, Any] = {"op": rng.choice(OPS), "id": rng.choice([1, 2, -5, "x", 2**64 - 1, None])}
    for name in rng.sample(FIELDS, rng.randrange(len(FIELDS) // 2)):
        message[name] = random_value(rng)
    if rng.random() < 0.1:
        message[rng.randrange(5)] = "int key"
    frame = msgpack.packb(message, use_bin_type=True, strict_types=False)
    if kind < 0.3:
        return frame[: rng.randrange(len(frame))]
    return frame


def expected_replies(frame: bytes) -> int:
    """How many replies the protocol promises for ``frame``: error frames always get one."""
    try:
        _, request = proto.decode_request(frame)
    except proto.ProtocolError:
        return 1
    if isinstance(request, proto.Ping):
        return 1 if request.reply else 0
    return 0 if request.op in proto.NO_REPLY else 1


def fuzz(address: str, frames: list[bytes], seed: int = 0) -> dict[str, Any]:
    """Send each frame, then a ping; the replies before the pong must be what the protocol says."""
    client = RawClient(address, timeout_ms=5000)
    client.hello("fuzzer")
    counts = {"sent": 0, "error_replies": 0, "ok_replies": 0, "wrong_reply_count": 0, "unanswered": 0}
    for i, frame in enumerate(frames):
        client.send_frames(frame)
        counts["sent"] += 1
        pong_id = 10**12 + i
        client.send_frames(proto.encode_request(pong_id, proto.Ping(reply=True)))
        replies = []
        while True:
            try:
                reply_id, reply = client.recv()
            except TimeoutError:
                counts["unanswered"] += 1
                break
            if reply_id == pong_id and isinstance(reply, dict) and reply.get("pong"):
                break
            replies.append(reply)
        if len(replies) != expected_replies(frame):
            counts["wrong_reply_count"] += 1
        for reply in replies:
            counts["error_replies" if isinstance(reply, proto.ExpertdError) else "ok_replies"] += 1
        if any(isinstance(r, proto.SessionError) for r in replies):
            client.hello("fuzzer")  # a fuzzed bye ended the session
    client.send_frames(proto.encode_request(0, proto.Bye()))
    client.close()
    return counts


# --- verifying what is served ------------------------------------------------------------------


class Verifier:
    """Checks every leased expert's bytes against the manifest's checksum."""

    def __init__(self, store: Path) -> None:
        self.manifest = load_manifest(store)
        self.checked = 0
        self.wrong = 0

    def check(self, lease: Any) -> None:
        flat, slot_bytes = lease._slab.flat, lease._slab.slot_bytes  # the whole slab, as bytes
        for expert, slot in zip(lease.experts, lease.slots, strict=True):
            entry = self.manifest.entry(lease.layer, expert)
            raw = flat[slot * slot_bytes : slot * slot_bytes + entry.raw_bytes].numpy()
            self.checked += 1
            if xxhash.xxh64_intdigest(raw) != entry.xxh64:
                self.wrong += 1


# --- clients that die ----------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import random, sys, time
    sys.path.insert(0, {tests!r})
    from expertd.client import ExpertClient, ExpertdError
    client = ExpertClient({address!r}, name="victim", timeout_s=10)
    rng = random.Random({seed})
    cap = int(client.info["tiers"][client.default_tier]["max_pinned"])  # what one client may pin
    print("ready", flush=True)
    held = []
    while True:
        layer = rng.randrange({layers})
        experts = rng.sample(range({experts}), 2)
        while held and 2 * (len(held) + 1) > cap:
            held.pop(0).release()
        try:
            pending = client.acquire_async(layer, experts)
            lease = pending.result()
            held.append(lease)
            if len(held) > 2:
                held.pop(0).release()
        except ExpertdError:
            pass
    """
)


def kill_clients(address: str, store: Path, kills: int, seed: int = 0) -> dict[str, Any]:
    """Start clients that acquire in a loop (holding leases, with transfers in flight); SIGKILL them."""
    manifest = load_manifest(store)
    rng = random.Random(seed)
    killed = 0
    for i in range(kills):
        code = WORKER.format(
            tests=str(TESTS_DIR), address=address, seed=seed * 1000 + i,
            layers=manifest.num_layers, experts=manifest.num_experts,
        )  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
    return {"clients_killed": killed}


# --- a daemon that dies, under a supervisor ------------------------------------------------------


def kill_daemon(daemon: DaemonProcess, store: Path, restarts: int, seed: int = 0) -> dict[str, Any]:
    """SIGKILL the daemon mid-work and restart it, while a client keeps acquiring and verifying."""
    from expertd.client import DaemonUnavailable, ExpertClient, ExpertdError

    rng = random.Random(seed)
    verifier = Verifier(store)
    manifest = verifier.manifest
    stop = threading.Event()
    counts = {"acquires": 0, "typed_errors": 0, "untyped_errors": 0}

    def work() -> None:
        client = None
        while not stop.is_set():
            try:
                if client is None:
                    client = ExpertClient(daemon.address, name="survivor", timeout_s=2, connect_timeout_s=2)
                layer = rng.randrange(manifest.num_layers)
                with client.acquire(layer, rng.sample(range(manifest.num_experts), 2)) as lease:
                    verifier.check(lease)
                counts["acquires"] += 1
            except (DaemonUnavailable, ExpertdError):
                counts["typed_errors"] += 1
                time.sleep(0.05)
            except Exception:  # anything untyped is a finding
                counts["untyped_errors"] += 1
                time.sleep(0.05)
        if client is not None:
            client.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    stale_left = 0
    for _ in range(restarts):
        time.sleep(rng.uniform(0.2, 0.6))
        dead_pid = daemon.pid
        daemon.kill()  # SIGKILL
        daemon.start()  # the supervisor restarts it
        stale_left += len(list(Path("/dev/shm").glob(f"expertd-{dead_pid}-*")))
    time.sleep(0.5)
    stop.set()
    thread.join(30)
    return {
        "daemon_kills": restarts,
        "stale_shm_left": stale_left,
        "verified_experts": verifier.checked,
        "wrong_bytes": verifier.wrong,
        **counts,
    }


# --- stores that break ----------------------------------------------------------------------------


def store_faults(store: Path, workdir: Path) -> dict[str, Any]:
    """Flipped bytes, a truncated data file, injected I/O errors, the store replaced underneath."""
    from expertd.client import ExpertClient, ExpertLoadError

    manifest = load_manifest(store)
    broken = workdir / "broken-store"
    shutil.copytree(store, broken)
    data = broken / manifest.data_file
    flip = manifest.entry(1, 3)
    with open(data, "r+b") as f:  # one flipped byte in expert (1, 3)
        f.seek(flip.offset + 100)
        byte = f.read(1)
        f.seek(flip.offset + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    results: dict[str, Any] = {}
    verifier = Verifier(store)
    flags = [
        "--host-size",
        "24 slots",
        "--device",
        "cpu",
        "--device-size",
        "6 slots",
        "--lease-timeout-s",
        "2",
    ]
    daemon = DaemonProcess(broken, workdir / "d1", *flags, env={"EXPERTD_INJECT_READ_ERRORS": "0.05:3"})
    try:
        client = ExpertClient(daemon.address, name="store-faults", timeout_s=10)
        typed, served = 0, 0
        try:
            client.acquire(1, [3])
        except ExpertLoadError:
            typed += 1  # the flipped byte: a typed error, never the bytes
        rng = random.Random(5)
        for _ in range(150):  # injected I/O errors on ~5% of reads
            layer = rng.randrange(manifest.num_layers)
            experts = [e for e in rng.sample(range(manifest.num_experts), 2) if (layer, e) != (1, 3)]
            try:
                with client.acquire(layer, experts) as lease:
                    verifier.check(lease)
                    served += 1
            except ExpertLoadError:
                typed += 1
        with open(data, "r+b") as f:  # truncated underneath the running daemon
            f.truncate(manifest.entry(manifest.num_layers - 1, 0).offset)
        for expert in range(manifest.num_experts):
            try:
                with client.acquire(manifest.num_layers - 1, [expert]) as lease:
                    verifier.check(lease)
                    served += 1
            except ExpertLoadError:
                typed += 1
        # The directory replaced underneath: the daemon keeps its open file; bytes stay right.
        shutil.move(broken, workdir / "moved-away")
        shutil.copytree(store, broken)
        for layer in range(manifest.num_layers - 1):
            try:
                with client.acquire(layer, [0, 1]) as lease:
                    verifier.check(lease)
                    served += 1
            except ExpertLoadError:
                typed += 1
        results = {"typed_load_errors": typed, "served": served, "verified_experts": verifier.checked,
                   "wrong_bytes": verifier.wrong}  # fmt: skip
        client.close()
    finally:
        daemon.kill()
    return results


# --- overload ---------------------------------------------------------------------------------------


def overload(address: str, store: Path, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` at once against a device tier smaller than their combined demand."""
    from expertd.client import ExpertClient

    manifest = load_manifest(store)
    done = [0] * clients
    worst = [0.0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients)
    deadline = time.monotonic() + seconds + 5

    def run(i: int) -> None:
        rng = random.Random(i)
        try:
            client = ExpertClient(address, name=f"crowd-{i}", timeout_s=60)
            start.wait()
            stop_at = time.monotonic() + seconds
            while time.monotonic() < stop_at:
                asked = time.monotonic()
                with client.acquire(
                    rng.randrange(manifest.num_layers), rng.sample(range(manifest.num_experts), 2)
                ):
                    worst[i] = max(worst[i], time.monotonic() - asked)
                done[i] += 1
            client.close()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 60)
    return {
        "clients": clients,
        "acquires": sum(done),
        "min_acquires_per_client": min(done),
        "max_acquires_per_client": max(done),
        "worst_wait_s": max(worst),
        "errors": errors[:5],
        "hung_threads": sum(t.is_alive() for t in threads),
    }


# --- what must be left afterwards --------------------------------------------------------------------


def leftovers(daemon: DaemonProcess, settle_s: float = 3.0) -> dict[str, Any]:
    """Leases, waiting acquires, foreign shm files and threads left once clients are gone."""
    time.sleep(settle_s)
    admin = RawClient(daemon.address)
    token_file = Path(daemon.address[len("ipc://") :] + ".admin-token")
    token = token_file.read_text().strip() if token_file.exists() else None
    admin.request(1, proto.Hello(proto.PROTOCOL_VERSION, "auditor", "default", os.getpid(), token))
    stats = admin.request(2, proto.Stats())
    admin.close()
    own = {p.name for p in Path("/dev/shm").glob(f"expertd-{daemon.pid}-*")}
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return {
        "leases": stats["leases"],
        "pending": stats["pending"],
        "clients": stats["clients"],
        "shm_files": sorted(own),
        "threads": threads,
        "rss_mib": rss_kib / 1024,
        "internal_errors": stats["messages"].get("internal_errors", 0),
    }


def daemon_flags(lease_timeout_s: float = 1.0) -> list[str]:
    return ["--host-size", "24 slots", "--device", "cpu", "--device-size", "6 slots",
            "--lease-timeout-s", str(lease_timeout_s)]  # fmt: skip


__all__ = [
    "EXPERTD",
    "fuzz",
    "kill_clients",
    "kill_daemon",
    "leftovers",
    "overload",
    "random_frame",
    "store_faults",
]
