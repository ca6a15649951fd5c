"""Acquire latency on the hit path, against a raw pyzmq REQ/REP msgpack echo, in one run.

    .venv/bin/python bench/acquire_latency.py [--rounds 5] [--per-round 2000] [--clients 4]
        [--predictor NAME|none] [--device-policy NAME]

Starts a real daemon (CPU device tier) on a small synthetic store and a Python echo
server (REP: unpack, pack, reply) on ipc:// sockets. Then, in interleaved rounds
(the machine is shared and noisy), times: the echo of an acquire-sized msgpack
request (REQ), an acquire + piggy-backed release through `ExpertClient` (the API
users call), and the same acquire on a raw DEALER socket (no client library).
Every acquire hits: the experts stay resident. Finally, ``--clients`` processes
acquire in a loop at once for aggregate throughput. The daemon runs what `expertd serve`
runs without flags (prefetching included: a hit's prediction work runs after its reply)
unless ``--predictor`` / ``--device-policy`` say otherwise. Last line: one JSON object.
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
    client = ExpertClient(sys.argv[1], name="bench-loop")
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
        results = measure(daemon.address, echo_address, args)
        results["aggregate_acquires_per_s"] = throughput(daemon.address, args.clients, args.seconds)
    finally:
        echo.kill()
        daemon.terminate()
    ratio = results["client"]["p50_us"] / results["echo"]["p50_us"]
    raw_ratio = results["raw"]["p50_us"] / results["echo"]["p50_us"]
    print(f"{'path':<36} {'p50 us':>8} {'p99 us':>8}")
    for name, label in (
        ("echo", "pyzmq REQ/REP msgpack echo"),
        ("raw", "acquire, raw DEALER"),
        ("client", "acquire+release, ExpertClient"),
    ):
        print(f"{label:<36} {results[name]['p50_us']:>8.1f} {results[name]['p99_us']:>8.1f}")
    print(f"p50 ratio, ExpertClient / echo: {ratio:.2f} (goal <= 1.3); raw DEALER / echo: {raw_ratio:.2f}")
    print(f"{args.clients} clients at once: {results['aggregate_acquires_per_s']:,.0f} acquires/s in all")
    results.update(bench="acquire_latency", p50_ratio=ratio, raw_p50_ratio=raw_ratio, goal_ratio=1.3)
    results.update(predictor=args.predictor or "default", device_policy=args.device_policy or "default")
    print(json.dumps(results))
    return 0


def measure(address: str, echo_address: str, args: argparse.Namespace) -> dict:
    context = zmq.Context.instance()
    req = context.socket(zmq.REQ)
    req.connect(echo_address)
    raw = context.socket(zmq.DEALER)
    raw.connect(address)
    raw.send(proto.encode_request(1, proto.Hello(version=proto.PROTOCOL_VERSION, client="bench-raw")))
    proto.decode_reply(raw.recv())
    client = ExpertClient(address, name="bench-client")
    samples: dict[str, list[float]] = {"echo": [], "raw": [], "client": []}
    message = proto.encode_request(7, proto.Acquire(2, [0, 1], "device", [123]))
    lease, request_id = None, 10
    client.acquire(1, [0, 1]).release()  # warm: both layers' experts resident
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
            lease = reply["lease"]
        for _ in range(args.per_round):
            started = time.perf_counter()
            client.acquire(1, [0, 1]).release()
            samples["client"].append(time.perf_counter() - started)
    client.close()
    raw.close()
    req.close()
    return {name: percentiles(s) for name, s in samples.items()}


def throughput(address: str, clients: int, seconds: float) -> float:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOOP, address, str(i % 4), str(seconds)], stdout=subprocess.PIPE
        )
        for i in range(clients)
    ]
    counts = [int(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    return sum(counts) / seconds


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
