"""`expertd demo`: the main job end to end on this machine, with nothing to download.

A small model of a real transformers MoE architecture is built here, packed into a store,
served by a real daemon whose device tier is smaller than the model, and generates text
through expertd with its own router. ``--trace NAME`` instead drives the daemon with a
shipped real routing trace (the synthetic-store demo).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from expertd.daemon.cli.main import EXIT_FAILED, CliError
from expertd.daemon.core import defaults


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a small real-architecture MoE model through expertd (no downloads)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument(
        "--model",
        default="qwen3_moe",
        help="architecture of the built model: qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v2, "
        "deepseek_v3 (default: %(default)s)",
    )
    parser.add_argument("--tokens", type=int, default=48, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--prompt", default="expertd serves experts to", help="the prompt (bytes are tokens)")
    parser.add_argument("--no-hint", action="store_true", help="do not send next-layer gate hints")
    parser.add_argument("--trace", default=None, help="instead drive the daemon with this shipped trace")
    parser.add_argument("--capacity", type=float, default=0.25, help="device tier, fraction of experts")
    parser.add_argument(
        "--policy", default=None, help="device eviction policy (default: serve's; --trace: layer-distance)"
    )
    parser.add_argument("--scale", type=float, default=4.0, help="--trace: divide the expert dims by this")
    parser.add_argument("--max-tokens", type=int, default=None, help="--trace: stop after this many tokens")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, store and logs here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.capacity < 1:
        raise CliError(f"--capacity must be a fraction in (0, 1), got {args.capacity}")
    if args.trace is not None:
        from expertd.daemon.cli import demo_trace

        args.policy = args.policy or "layer-distance"
        return demo_trace.run(args)
    args.policy = args.policy or defaults.DEVICE_POLICY  # what serve runs without flags
    from expertd.daemon.cli import demo_hf

    return demo_hf.run(args)


@contextlib.contextmanager
def demo_session(daemon: Any) -> Iterator[Any]:
    """A client of the demo's private ``daemon`` (a `traces.live.PrivateDaemon`); after the body the
    daemon is shut down through it and must exit cleanly (a `CliError` otherwise, as for a
    failure to start or connect)."""
    try:
        with daemon.connect(name="expertd-demo") as client:
            yield client
            client.shutdown()
        code = daemon.proc.wait(30)
    except RuntimeError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    finally:
        daemon.stop()
    if code != 0:
        raise CliError(f"the daemon exited with {code}; see {daemon.log_path}", EXIT_FAILED)
