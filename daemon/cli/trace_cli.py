"""`expertd trace convert|stats|formats`: routing dumps to `.etrace`, and what a trace holds."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from expertd.daemon.cli.main import EXIT_OK, CliError


def register(subparsers: Any) -> None:
    """Add this module's subcommands."""
    trace = subparsers.add_parser(
        "trace",
        help="routing traces: convert public dumps, print stats",
        description="Routing traces in the .etrace format (see traces/README.md).",
    )
    commands = trace.add_subparsers(dest="trace_command", metavar="SUBCOMMAND")
    commands.required = True
    convert = commands.add_parser(
        "convert",
        help="convert a public routing dump to .etrace",
        description="Convert SRC (a file, or a directory of the format's files) to OUT.",
        epilog="`expertd trace formats` lists the formats.",
    )
    convert.add_argument("--format", "-f", required=True, metavar="F", help="the source format")
    convert.add_argument("src", metavar="SRC", help="a file or a directory")
    convert.add_argument("-o", "--output", required=True, metavar="OUT", help="the .etrace file")
    convert.add_argument("--model", help="model name (default: from the source or the format)")
    convert.add_argument("--license", help="license of the data (default: not stated)")
    convert.add_argument("--source", help="provenance text (default: format and file names)")
    convert.add_argument("--experts", type=int, help="experts per layer, where the source omits it")
    convert.add_argument("--layers", type=int, help="MoE layers, where the source has no shape (SGLang)")
    convert.add_argument("--top-k", type=int, help="experts per token, where the source has none (SGLang)")
    convert.set_defaults(func=cmd_convert)

    stats = commands.add_parser("stats", help="tokens, layers, skew and temporal reuse of a trace")
    stats.add_argument(
        "file",
        metavar="TRACE",
        help="an .etrace file, or a trace's name as `expertd replay` takes it (granite)",
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=cmd_stats)

    formats = commands.add_parser("formats", help="list the formats `trace convert` reads")
    formats.set_defaults(func=cmd_formats)


def _os_error(exc: OSError) -> CliError:
    return CliError(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))


def cmd_convert(args: argparse.Namespace) -> int:
    from expertd.traces.convert import ConvertOptions, convert
    from expertd.traces.format import read_trace

    options = ConvertOptions(args.model, args.license, args.source, args.experts, args.layers, args.top_k)
    started = time.perf_counter()
    try:
        convert(args.format, args.src, args.output, options)
        trace = read_trace(args.output)
    except ValueError as exc:  # TraceFormatError included
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise _os_error(exc) from None
    seconds = time.perf_counter() - started
    print(
        f"wrote {args.output}: {len(trace)} rows, {trace.num_tokens()} tokens, "
        f"{len(trace.meta.requests)} requests, {os.path.getsize(args.output)} bytes "
        f"in {seconds:.1f} s"
    )
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from expertd.daemon.cli.replay_cli import resolve_trace
    from expertd.traces.format import read_trace
    from expertd.traces.stats import format_stats, trace_stats

    try:
        stats = trace_stats(read_trace(resolve_trace(args.file)))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise _os_error(exc) from None
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return EXIT_OK


def cmd_formats(args: argparse.Namespace) -> int:
    from expertd.traces.convert import formats

    for converter in formats():
        print(f"{converter.name:<22} {converter.summary}")
    return EXIT_OK
