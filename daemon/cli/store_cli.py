"""`expertd pack` and `expertd store info|verify`."""

from __future__ import annotations

import argparse
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from expertd.daemon.cli.main import EXIT_FAILED, EXIT_OK, CliError

CODEC_CHOICES = ("none", "lz4-planes")
# expertd.daemon.store.pack.SYNTHETIC_PRESETS, named here so that `--help` imports nothing heavy
PRESET_NAMES = (
    "mixtral-8x7b",
    "deepseek-v2-lite",
    "qwen3-30b-a3b",
    "olmoe-1b-7b",
    "granite-3.0-1b-a400m",
    "llama-4-maverick",
)


def register(subparsers: Any) -> None:
    """Add this module's subcommands."""
    pack = subparsers.add_parser(
        "pack",
        help="build an expert store from a checkpoint or a synthetic preset",
        description="Pack routed experts into a store directory (manifest + one data file).",
    )
    source = pack.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-safetensors", metavar="DIR", help="a Hugging Face checkpoint directory")
    source.add_argument(
        "--from-hf",
        metavar="MODEL_DIR",
        help="a transformers model directory (save_pretrained): as --from-safetensors, and its "
        "config.json's MoE layers and expert count must match the checkpoint",
    )
    source.add_argument(
        "--synthetic",
        metavar="PRESET",
        help=f"a preset with a real model's expert shapes: {', '.join(PRESET_NAMES)}",
    )
    pack.add_argument("out", metavar="OUT", help="the store directory to create")
    pack.add_argument(
        "--scale", type=float, default=None, metavar="F", help="synthetic: divide hidden and ffn sizes by F"
    )
    pack.add_argument(
        "--layers", type=int, default=None, metavar="N", help="synthetic: only the first N MoE layers"
    )
    pack.add_argument(
        "--seed", type=int, default=None, metavar="S", help="synthetic: random seed (default 0)"
    )
    pack.add_argument("--codec", choices=CODEC_CHOICES, default="none", help="blob codec (default none)")
    pack.add_argument(
        "--lz4-level", type=int, default=0, metavar="L", help="0: fast lz4 (default); 1-12: lz4-HC"
    )
    pack.add_argument("--force", action="store_true", help="replace OUT if it exists")
    pack.add_argument(
        "--group",
        metavar="GROUP",
        help="readable by this group only (directories 0750, files 0640); default: by everyone (0755, 0644)",
    )
    pack.add_argument("--quiet", action="store_true", help="no progress bar")
    pack.set_defaults(func=cmd_pack)

    store = subparsers.add_parser("store", help="inspect or verify an expert store")
    store_sub = store.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    store_sub.required = True
    info = store_sub.add_parser("info", help="summarise a store")
    info.add_argument("dir", metavar="DIR")
    info.set_defaults(func=cmd_info)
    verify = store_sub.add_parser("verify", help="check every expert's checksums")
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument("--threads", type=int, default=2, metavar="N", help="reader threads (default 2)")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(func=cmd_verify)


def cmd_pack(args: argparse.Namespace) -> int:
    from expertd.daemon.store.partials import PackInterrupted, signals_unwind

    try:
        with signals_unwind():  # SIGTERM/SIGINT: unwind, so the partial store is removed
            return _pack(args)
    except PackInterrupted as exc:
        print(f"expertd pack: {exc}", file=sys.stderr)
        return 128 + exc.signum


def _pack(args: argparse.Namespace) -> int:
    from expertd.daemon.store.manifest import StoreError
    from expertd.daemon.store.pack import (
        SYNTHETIC_PRESETS,
        pack_safetensors,
        pack_synthetic,
        store_modes,
        unreachable_ancestors,
    )

    try:
        if args.from_safetensors is not None or args.from_hf is not None:
            given = [f"--{n}" for n in ("scale", "layers", "seed") if getattr(args, n) is not None]
            if given:
                raise CliError(f"{', '.join(given)} only apply to --synthetic")
            if args.from_hf is not None:
                from expertd.daemon.store.pack_hf import pack_hf as pack_checkpoint
            else:
                pack_checkpoint = pack_safetensors
            manifest = pack_checkpoint(
                args.from_hf or args.from_safetensors,
                args.out,
                codec=args.codec,
                lz4_level=args.lz4_level,
                force=args.force,
                progress=not args.quiet,
                group=args.group,
            )
        else:
            if args.synthetic not in SYNTHETIC_PRESETS:
                raise CliError(f"unknown preset {args.synthetic!r} (known: {', '.join(SYNTHETIC_PRESETS)})")
            manifest = pack_synthetic(
                args.out,
                args.synthetic,
                scale=1.0 if args.scale is None else args.scale,
                layers=args.layers,
                seed=0 if args.seed is None else args.seed,
                codec=args.codec,
                lz4_level=args.lz4_level,
                force=args.force,
                progress=not args.quiet,
                group=args.group,
            )
    except (StoreError, ValueError) as exc:
        raise CliError(str(exc)) from None
    modes = store_modes(args.group)
    blocked = unreachable_ancestors(Path(args.out), modes)
    if blocked:  # a service user could not read the store it was packed for
        who = "other users" if modes.gid is None else f"group {modes.gid}"
        print(f"expertd pack: warning: {who} cannot enter {', '.join(blocked)}", file=sys.stderr)
    print(
        f"packed {manifest.num_layers} layers x {manifest.num_experts} experts "
        f"({_size(manifest.raw_bytes * len(manifest.experts))} raw, "
        f"{_size(manifest.data_bytes)} on disk) into {args.out}"
    )
    return EXIT_OK


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _open_manifest(path: str) -> Any:
    from expertd.daemon.store.manifest import StoreError, load_manifest

    try:
        return load_manifest(path)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def cmd_info(args: argparse.Namespace) -> int:
    m = _open_manifest(args.dir)
    layers = m.checkpoint_layers
    contiguous = list(layers) == list(range(layers[0], layers[0] + len(layers)))
    mapping = f"{layers[0]}..{layers[-1]}" if contiguous else ", ".join(map(str, layers))
    codecs = Counter(e.codec for e in m.experts)
    raw_total = m.raw_bytes * len(m.experts)
    rows = [
        ("store", str(args.dir)),
        ("model", f"{m.model} ({m.architecture}, naming {m.naming})"),
        ("format", f"expertd-store v{m.version}"),
        (
            "layers",
            f"{m.num_layers} MoE layers x {m.num_experts} experts (checkpoint layers {mapping})",
        ),
        (
            "expert",
            f"{_size(m.raw_bytes)} raw ({m.raw_bytes} B), slot {m.slot_bytes} B, dtype {m.dtype}",
        ),
        *[("tensor", f"{t.name:<16} {t.dtype:<9} {list(t.shape)!s:<16} @ {t.offset}") for t in m.tensors],
        ("codec", ", ".join(f"{c} x{n}" for c, n in sorted(codecs.items()))),
        (
            "stored",
            f"{_size(m.stored_bytes)} of {_size(raw_total)} raw (ratio {m.compression_ratio:.3f})",
        ),
        ("data file", f"{m.data_file}, {_size(m.data_bytes)} ({m.data_bytes} B)"),
        ("source", ", ".join(f"{k}={v}" for k, v in m.source.items())),
    ]
    for key, value in rows:
        print(f"{key:<10} {value}")
    problem = _data_file_problem(Path(args.dir) / m.data_file, m.data_bytes)
    if problem:
        print(f"FAILED: {problem}")
        return EXIT_FAILED
    return EXIT_OK


def _data_file_problem(path: Path, expected_bytes: int) -> str | None:
    """Why the data file cannot hold what the manifest says, or None."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{path}: cannot stat: {exc.strerror}"
    if size < expected_bytes:
        return f"{path} is truncated: {size} of the manifest's {expected_bytes} bytes"
    if size > expected_bytes:
        return f"{path} has {size} bytes, the manifest says {expected_bytes}: not the file it was packed with"
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from expertd.daemon.store.manifest import CorruptExpertError, StoreError
    from expertd.daemon.store.reader import StoreReader, alloc_aligned

    if args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    try:
        reader = StoreReader(args.dir, allow_truncated=True)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    m = reader.manifest
    local = threading.local()

    def check(layer: int, expert: int) -> str | None:
        if not hasattr(local, "buf"):
            local.buf = alloc_aligned(m.slot_bytes)
        try:
            reader.read_expert(layer, expert, local.buf)
        except CorruptExpertError as exc:
            return str(exc)
        return None

    corrupt: list[tuple[int, int, str]] = []
    with (
        reader,
        ThreadPoolExecutor(max_workers=args.threads) as pool,
        tqdm(
            total=m.stored_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="verify",
            file=sys.stderr,
            disable=args.quiet,
        ) as bar,
    ):
        futures = {pool.submit(check, e.layer, e.expert): e for e in m.experts}
        for future in as_completed(futures):
            entry = futures[future]
            problem = future.result()
            if problem is not None:
                corrupt.append((entry.layer, entry.expert, problem))
            bar.update(entry.stored_bytes)
    for _, _, problem in sorted(corrupt):
        print(problem)
    if corrupt:
        print(f"FAILED: {len(corrupt)} of {len(m.experts)} experts corrupt in {args.dir}")
        return EXIT_FAILED
    print(f"ok: {len(m.experts)} experts verified ({_size(m.stored_bytes)} stored) in {args.dir}")
    return EXIT_OK
