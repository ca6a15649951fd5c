"""`expertd serve`, `expertd status`, `expertd shutdown` and `expertd load-state`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from expertd.daemon.cli.main import EXIT_FAILED, CliError

DAEMON_USER_HELP = (
    "the user that runs the daemon, if not root, you or `expertd` (default: $EXPERTD_DAEMON_USER): "
    "a socket in a directory anyone else owns or may write is refused before anything is sent"
)


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the daemon",
        description="Run the expertd daemon in the foreground (systemd: Type=notify). "
        "Settings come from --config (TOML; see docs/config.md) and flags, which win.",
    )
    serve.add_argument("--config", type=Path, help="expertd.toml")
    serve.add_argument("--store", help="store directory ([server] store)")
    serve.add_argument("--address", help="ipc://PATH or tcp://HOST:PORT ([server] address)")
    serve.add_argument("--host-size", help="host tier budget, e.g. 8GiB or '120 slots' ([tiers] host_size)")
    serve.add_argument("--device", choices=("off", "cpu", "cuda"), help="device tier ([tiers] device)")
    serve.add_argument("--device-size", help="device tier budget ([tiers] device_size)")
    serve.add_argument("--host-policy", help="host eviction policy ([policy] host)")
    serve.add_argument("--device-policy", help="device eviction policy ([policy] device)")
    serve.add_argument("--predictor", help="prefetch predictor, or none ([prefetch] predictor)")
    serve.add_argument("--load-threads", type=int, help="store reads in flight ([transfers] load_threads)")
    serve.add_argument(
        "--host-gbps",
        type=float,
        help="host compute GB/s for tier=auto, instead of measuring ([placement] host_gbps)",
    )
    serve.add_argument(
        "--calibrate",
        choices=("auto", "on", "off"),
        help="measure host compute at start ([placement] calibrate)",
    )
    serve.add_argument("--lease-timeout-s", type=float, help="([clients] lease_timeout_s)")
    serve.add_argument("--max-pinned-share", type=float, help="([clients] max_pinned_share)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics on this port ([metrics] port)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--print-config-doc", action="store_true", help="print the config reference and exit")
    serve.set_defaults(func=run_serve)

    status = subparsers.add_parser("status", help="show a running daemon's tiers, hit rates and clients")
    status.add_argument("--address", help="daemon address (default: the default ipc path)")
    status.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS", help="refresh")
    status.add_argument("--daemon-user", help=DAEMON_USER_HELP)
    status.add_argument("--timeout-s", type=float, default=5.0)
    status.set_defaults(func=run_status)

    shutdown = subparsers.add_parser("shutdown", help="stop a running daemon")
    shutdown.add_argument("--address", help="daemon address")
    shutdown.add_argument("--daemon-user", help=DAEMON_USER_HELP)
    shutdown.add_argument("--timeout-s", type=float, default=5.0)
    shutdown.set_defaults(func=run_shutdown)

    load = subparsers.add_parser(
        "load-state",
        help="start every tenant's predictor from saved statistics (admin)",
        description="Load predictor statistics (written by `expertd replay --save-state`) into a "
        "running daemon, as [prefetch] state does at start. The file is read by the daemon: "
        "give a path on its machine.",
    )
    load.add_argument("file", type=Path, help="statistics file")
    load.add_argument("--address", help="daemon address")
    load.add_argument("--daemon-user", help=DAEMON_USER_HELP)
    load.add_argument("--timeout-s", type=float, default=30.0)
    load.set_defaults(func=run_load_state)


def load_config(args: argparse.Namespace):
    from expertd.daemon.service.config import ConfigError, ServeConfig

    try:
        config = ServeConfig.load(args.config) if args.config else ServeConfig.from_mapping({}, "flags")
        overrides = {
            "store": args.store,
            "address": args.address,
            "tiers.host_size": args.host_size,
            "tiers.device": args.device,
            "tiers.device_size": args.device_size,
            "policy.host": args.host_policy,
            "policy.device": args.device_policy,
            "prefetch.predictor": args.predictor,
            "transfers.load_threads": args.load_threads,
            "placement.host_gbps": args.host_gbps,
            "placement.calibrate": args.calibrate,
            "clients.lease_timeout_s": args.lease_timeout_s,
            "clients.max_pinned_share": args.max_pinned_share,
            "log_level": args.log_level,
            "metrics.port": args.metrics_port,
        }
        return config.with_overrides(overrides).checked()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def run_serve(args: argparse.Namespace) -> int:
    if args.print_config_doc:
        from expertd.daemon.service.config import config_doc

        print(config_doc(), end="")
        return 0
    config = load_config(args)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from expertd.daemon.service.listener import StartupError
    from expertd.daemon.service.server import Server
    from expertd.policies.base import PolicyError

    try:
        server = Server(config)
        server.start()
    except (StartupError, PolicyError) as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    try:
        server.run()
    finally:
        server.close()
    return 0


def admin_request(
    address: str | None, request, timeout_s: float, daemon_user: str | None = None
) -> dict[str, Any]:
    """hello, one request, bye: for the command-line tools."""
    import zmq

    from expertd.daemon import protocol as proto
    from expertd.daemon.protocol.local import default_address
    from expertd.daemon.protocol.socket_trust import check_before_connect

    address = address or default_address()
    try:
        check_before_connect(address, daemon_user)  # before the token is even read
    except proto.DaemonUnavailable as exc:
        raise CliError(f"no expertd answered at {address} ({exc})", EXIT_FAILED) from None
    except proto.ExpertdError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 200)
    token = None
    if address.startswith("ipc://"):  # the admin token beside the socket, if this user may read it
        from expertd.daemon.service.auth import read_admin_token

        token = read_admin_token(Path(address[len("ipc://") :] + ".admin-token"))
    else:
        from expertd.daemon.protocol.local import use_curve

        try:
            use_curve(sock, None, None)
        except proto.DaemonUnavailable as exc:
            raise CliError(str(exc)) from None
    try:
        sock.connect(address)
        hello = proto.Hello(proto.PROTOCOL_VERSION, "expertd-cli", "default", os.getpid(), token)
        for request_id, message in ((1, hello), (2, request)):
            sock.send(proto.encode_request(request_id, message))
            if not sock.poll(int(timeout_s * 1000)):
                raise CliError(f"no expertd answered at {address} within {timeout_s:g} s", EXIT_FAILED)
            _, reply = proto.decode_reply(sock.recv())
            if isinstance(reply, proto.ExpertdError):
                raise CliError(f"{address}: {reply}", EXIT_FAILED)
        sock.send(proto.encode_request(3, proto.Bye()))
        return reply
    finally:
        sock.close()


def run_status(args: argparse.Namespace) -> int:
    from expertd.daemon import protocol as proto

    def fetch() -> dict[str, Any]:
        return admin_request(args.address, proto.Stats(), args.timeout_s, args.daemon_user)

    if args.watch and not args.json:
        from expertd.daemon.cli.status_view import watch
        from expertd.daemon.protocol.local import default_address

        return watch(fetch, format_status, args.watch, args.address or default_address())
    while True:
        stats = fetch()
        print(json.dumps(stats, indent=1) if args.json else format_status(stats), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def run_shutdown(args: argparse.Namespace) -> int:
    from expertd.daemon import protocol as proto

    admin_request(args.address, proto.Shutdown(), args.timeout_s, args.daemon_user)
    print("expertd is stopping")
    return 0


def run_load_state(args: argparse.Namespace) -> int:
    from expertd.daemon import protocol as proto

    path = str(args.file.resolve())
    admin_request(args.address, proto.LoadState(path), args.timeout_s, args.daemon_user)
    print(f"expertd loaded predictor statistics from {path}")
    return 0


LAYERS_PER_LINE = 24


def format_host_compute(host: dict[str, Any], placed: dict[str, Any]) -> str:
    """One line: the host compute figure tier="auto" placement weighs, and where it placed experts."""
    if host["gbps"] > 0:
        figure = f"{host['gbps']:.1f} GB/s ({host['source']}"
        figure += f" in {host['seconds']:.2f} s)" if host["source"] == "measured" else ")"
    else:
        figure = (
            f"off ({host['source']}: auto acquires go to the device; [placement] host_gbps or calibrate = on)"
        )
    line = f"host compute {figure}, {host['threads']} client thread(s), "
    line += f"{host['reader_threads']} reader thread(s)"
    if placed:
        line += (
            f"; auto placed {placed.get('device', 0)} on the device, {placed.get('host', 0)} on the host "
            f"({placed.get('background', 0)} also copied)"
        )
    return line


def format_status(stats: dict[str, Any]) -> str:
    if "daemon" not in stats:  # not admin: only this tenant's own counters
        lines = [
            f"tenant {stats['tenant']} (not admin: other tenants and shared tiers are not shown)",
            f"acquires {stats['acquires']}, experts {stats['accesses']}, hit rate {stats['hit_rate']:.1%}, "
            f"{stats['waited']} waited, stall {stats['stall_s']:.3f} s",
        ]
        lines += [f"client {s['name']} pid {s['pid']}: {s['leases']} leases" for s in stats["sessions"]]
        return "\n".join(lines)
    d = stats["daemon"]
    lines = [
        f"expertd {d['version']} pid {d['pid']} at {d['address']}, up {d['uptime_s']:.0f} s",
        f"model {d['model']}: {d['num_layers']} layers x {d['num_experts']} experts, "
        f"{d['expert_bytes'] / 2**20:.1f} MiB each; store {d['store']} (O_DIRECT: {d['direct_io']})",
        "",
        f"{'tier':<7} {'slots':>11} {'filling':>7} {'pinned':>6} {'hit rate':>8} {'accesses':>9} "
        f"{'evicted':>8} {'prefetch used/wasted':>21}",
    ]
    for name, t in stats["tiers"].items():
        lines.append(
            f"{name:<7} {t['used']:>5}/{t['slots']:<5} {t['filling']:>7} {t['pinned']:>6} "
            f"{t['hit_rate']:>8.1%} {t['accesses']:>9} {t['evictions']:>8} "
            f"{t['prefetch_used']:>10}/{t['prefetch_wasted']:<10}"
        )
    for name, t in stats["tiers"].items():
        rates = [
            h / a if a else float("nan") for h, a in zip(t["layer_hits"], t["layer_accesses"], strict=True)
        ]
        cells = ["  -" if r != r else f"{round(r * 100):>3}" for r in rates]
        for start in range(0, len(cells), LAYERS_PER_LINE):  # deep models wrap, with the first layer
            label = f"{name} hit % by layer" if start == 0 else f"{'':>{len(name)}}   layers {start}+"
            lines.append(f"{label:<{len(name) + 15}}: {' '.join(cells[start : start + LAYERS_PER_LINE])}")
    prefetch = stats.get("prefetch", {})
    if "predictor" in prefetch:
        lines.append(
            f"prefetch {prefetch['predictor']}: precision {prefetch.get('precision', 0):.1%}, "
            f"recall {prefetch.get('recall', 0):.1%}, {prefetch.get('cancelled', 0)} cancelled"
        )
    host = stats.get("host_compute")
    if host is not None:
        lines.append(format_host_compute(host, stats.get("placed", {})))
    lines.append("")
    for link, info in stats["links"].items():
        lines.append(
            f"link {link:<4} {info['bytes'] / 1e9:>9.2f} GB moved in {info['started']} transfers, "
            f"{info['failed']} failed, {info['running']} running, {info['queued']} queued"
        )
    a = stats["acquires"]
    mean = a["stall_s"] / a["waited"] * 1e3 if a["waited"] else 0.0
    lines.append(
        f"acquires {a['count']}: {a['waited']} waited, stall {a['stall_s']:.3f} s in all "
        f"(mean {mean:.2f} ms, max {a['max_stall_s'] * 1e3:.2f} ms), {a['errors']} errors"
    )
    lines.append(f"leases {stats['leases']}, waiting acquires {stats['pending']}")
    lines.append("")
    lines.append(f"{'client':<24} {'tenant':<12} {'pid':>7} {'leases':>6} {'waiting':>7} {'requests':>9}")
    for s in stats["sessions"]:
        lines.append(
            f"{s['name'][:24]:<24} {s['tenant'][:12]:<12} {s['pid']:>7} {s['leases']:>6} {s['pending']:>7} "
            f"{s['requests']:>9}"
        )
    return "\n".join(lines)
