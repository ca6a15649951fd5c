"""Acquire latency on the hit path, against a raw pyzmq REQ/REP msgpack echo, in one run.

    .venv/bin/python bench/acquire_latency.py [--rounds 5] [--per-round 2000] [--clients 4]
        [--predictor NAME|none] [--device-policy NAME]

Starts a real daemon (CPU device tier) on a small synthetic store and a Python echo
server (REP: unpack, pack, reply) on ipc:// sockets. Then, in interleaved rounds
(the machine is shared and noisy), times: the echo of an acquire-sized msgpack
request (REQ), an acquire + release through `ExpertClient` served from shared memory
(the fast path, `expertd.client.fastpath`), the same through the socket
(``fast_path=False``: acquire + piggy-backed release), and the acquire on a raw DEALER
socket (no client library). Every acquire hits: the experts stay resident. It does so twice:
idle, then while ``--clients`` other processes acquire and release in a loop (fast path on,
as users run). Finally those processes run alone for aggregate throughput. The daemon runs
what `expertd serve` runs without flags (prefetching included) unless ``--predictor`` /
``--device-policy`` say otherwise. Absolute microseconds print beside every ratio; the
figures timed replay charges per acquire print under their profile names (``acquire_hit_us``:
a fast-path hit, ``acquire_socket_us``: a hit through the socket). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import msgpack
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from daemon_util import DaemonProcess  # noqa: E402

from expertd.client import ExpertClient  # noqa: E402
from expertd.daemon import protocol as proto  # noqa: E402
from expertd.daemon.store.pack import pack_synthetic  # noqa: E402

ECHO = textwrap.dedent(
    """
    import sys, msgpack, zmq
    sock = zmq.Context().socket(zmq.REP)
    sock.bind(sys.argv[1])
    while True:
        sock.send(msgpack.packb(msgpack.unpackb(sock.recv())))
    """
)

LOOP = textwrap.dedent(
    """
    import sys, time
    from expertd.client import ExpertClient
    client = ExpertClient(sys.argv[1], name="bench-loop", fast_path=sys.argv[4] == "fast")
    layer, stop, n = int(sys.argv[2]), time.monotonic() + float(sys.argv[3]), 0
    while time.monotonic() < stop:
        client.acquire(layer, [0, 1]).release()
        n += 1
    print(n)
    """
)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput phase length")
    parser.add_argument(
        "--predictor", default=None, help="the daemon's predictor (default: serve's; none: no prefetch)"
    )
    parser.add_argument("--device-policy", default=None, help="the daemon's device policy (default: serve's)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="exd-bench-", dir="/tmp"))
    store = work / "store"
    pack_synthetic(store, "mixtral-8x7b", scale=64, layers=4)
    daemon = DaemonProcess(
        store, work, "--host-size", "32 slots", "--device", "cpu", "--device-size", "16 slots",
        "--log-level", "warning", *(["--predictor", args.predictor] if args.predictor else []),
        *(["--device-policy", args.device_policy] if args.device_policy else []),
    )  # fmt: skip
    echo_address = f"ipc://{work / 'echo.sock'}"
    echo = subprocess.Popen([sys.executable, "-c", ECHO, echo_address])
    try:
        idle = measure(daemon.address, echo_address, args)
        loops = start_loops(daemon.address, args.clients, 3600.0, fast=True)
        try:
            loaded = measure(daemon.address, echo_address, args)
        finally:
            for proc in loops:
                proc.kill()
                proc.wait()
        aggregate = {
            "fast": throughput(daemon.address, args.clients, args.seconds, fast=True),
            "socket": throughput(daemon.address, args.clients, args.seconds, fast=False),
        }
    finally:
        echo.kill()
        daemon.terminate()
    load = os.getloadavg()
    results = {"idle": idle, "loaded": loaded, "aggregate_acquires_per_s": aggregate}
    print(f"load average (uptime): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    for phase, figures in (("idle", idle), (f"{args.clients} clients at once", loaded)):
        echo_p50 = figures["echo"]["p50_us"]
        print(f"-- {phase}")
        print(f"{'path':<40} {'p50 us':>8} {'p99 us':>8} {'p50 / echo':>11}")
        for name, label in (
            ("echo", "pyzmq REQ/REP msgpack echo"),
            ("fast", "acquire+release, shared memory (fast)"),
            ("socket", "acquire+release, ExpertClient socket"),
            ("raw", "acquire, raw DEALER"),
        ):
            row = figures[name]
            row["ratio"] = row["p50_us"] / echo_p50
            print(f"{label:<40} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f} {row['ratio']:>11.2f}")
        print(
            f"fast-path p50 {figures['fast']['p50_us']:.1f} us = {figures['fast']['ratio']:.2f}x the echo's "
            f"{echo_p50:.1f} us (goal <= 0.5); socket path {figures['socket']['ratio']:.2f}x"
        )
    print(
        f"{args.clients} clients alone: {aggregate['fast']:,.0f} acquires/s in all through shared memory, "
        f"{aggregate['socket']:,.0f} through the socket"
    )
    profile = {"acquire_hit_us": idle["fast"]["p50_us"], "acquire_socket_us": idle["socket"]["p50_us"]}
    print(
        f"timed replay profile: acquire_hit_us = {profile['acquire_hit_us']:.1f}, "
        f"acquire_socket_us = {profile['acquire_socket_us']:.1f}"
    )
    results.update(
        bench="acquire_latency", goal_fast_ratio=0.5, profile=profile, loadavg=list(load),
        cpus=os.cpu_count(),
        fast_ratio_idle=idle["fast"]["ratio"], fast_ratio_loaded=loaded["fast"]["ratio"],
        socket_ratio_idle=idle["socket"]["ratio"], socket_ratio_loaded=loaded["socket"]["ratio"],
        predictor=args.predictor or "default", device_policy=args.device_policy or "default",
        clients=args.clients,
    )  # fmt: skip
    print(json.dumps(results))
    return 0


def measure(address: str, echo_address: str, args: argparse.Namespace) -> dict:
    context = zmq.Context.instance()
    req = context.socket(zmq.REQ)
    req.connect(echo_address)
    raw = context.socket(zmq.DEALER)
    raw.connect(address)
    raw.send(proto.encode_request(1, proto.Hello(version=proto.PROTOCOL_VERSION, client="bench-raw")))
    _, hello = proto.decode_reply(raw.recv())
    assert isinstance(hello, dict), hello
    client = ExpertClient(address, name="bench-client", fast_path=False)
    fast = ExpertClient(address, name="bench-fast")
    samples: dict[str, list[float]] = {"echo": [], "raw": [], "socket": [], "fast": []}
    message = proto.encode_request(7, proto.Acquire(2, [0, 1], "device", [123]))
    lease, request_id = None, 10
    client.acquire(1, [0, 1]).release()  # warm: both layers' experts resident
    assert fast._fast is not None, "the daemon offers no shared-memory hits"
    for _ in range(args.rounds):
        for _ in range(args.per_round):
            started = time.perf_counter()
            req.send(message)
            msgpack.unpackb(req.recv())
            samples["echo"].append(time.perf_counter() - started)
        for _ in range(args.per_round):
            request_id += 1
            started = time.perf_counter()
            raw.send(
                proto.encode_request(request_id, proto.Acquire(2, [0, 1], "device", [lease] if lease else []))
            )
            _, reply = proto.decode_reply(raw.recv())
            samples["raw"].append(time.perf_counter() - started)
            if isinstance(reply, proto.SessionError):  # idle past the lease timeout while others ran
                raw.send(
                    proto.encode_request(1, proto.Hello(version=proto.PROTOCOL_VERSION, client="bench-raw"))
                )
                proto.decode_reply(raw.recv())
                lease = None
                continue
            lease = reply["lease"]
        for _ in range(args.per_round):
            started = time.perf_counter()
            client.acquire(1, [0, 1]).release()
            samples["socket"].append(time.perf_counter() - started)
        hits = fast._fast.hits
        for _ in range(args.per_round):
            started = time.perf_counter()
            fast.acquire(1, [0, 1]).release()
            samples["fast"].append(time.perf_counter() - started)
        assert fast._fast.hits - hits == args.per_round, "a fast-path acquire took the socket"
    fast.close()
    client.close()
    raw.close()
    req.close()
    return {name: percentiles(s) for name, s in samples.items()}


def start_loops(address: str, clients: int, seconds: float, fast: bool) -> list[subprocess.Popen]:
    mode = "fast" if fast else "socket"
    return [
        subprocess.Popen(
            [sys.executable, "-c", LOOP, address, str(i % 4), str(seconds), mode], stdout=subprocess.PIPE
        )
        for i in range(clients)
    ]


def throughput(address: str, clients: int, seconds: float, fast: bool) -> float:
    procs = start_loops(address, clients, seconds, fast)
    counts = [int(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    return sum(counts) / seconds


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
