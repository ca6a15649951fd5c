"""Cold-cache read speed of the expert store against `dd iflag=direct`, plus the lz4 codec.

    .venv/bin/python bench/store_read.py [--dir out/bench-store] [--threads 4] [--cleanup]

Builds (or reuses) a synthetic store of >= 4 GiB on the real disk, drops its data file from
the page cache (posix_fadvise DONTNEED, checked with mincore), reads every expert with
`StoreReader` from a small thread pool into preallocated aligned buffers, and runs
`dd if=DATA of=/dev/null iflag=direct bs=4M` on the same file, alternating, in the same
run. Then measures the lz4-planes codec on a sample of the same experts (ratio, decode
speed) and whether each heavy step of a read releases the GIL. Prints a table; the last
line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from expertd.daemon.store.codec import (
    LZ4_BACKEND,
    EncodedBlob,
    PlaneDecoder,
    PlaneEncoder,
    lz4_decompress_into,
)
from expertd.daemon.store.manifest import StoreError, StoreManifest, load_manifest
from expertd.daemon.store.pack import SYNTHETIC_PRESETS, pack_synthetic
from expertd.daemon.store.reader import StoreReader, alloc_aligned

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MIN_STORE_BYTES = 4 * GIB
TMPFS_TYPES = {"tmpfs", "ramfs"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (longest mount-point prefix)."""
    best, kind = "", "?"
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype, *_ = line.split()
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


# --- page cache -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(path: Path) -> float:
    """Fraction of the file's pages in the page cache (mincore; maps without reading)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        region = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(region)
        pages = -(-size // mmap.PAGESIZE)
        vec = np.zeros(pages, dtype=np.uint8)
        if _libc.mincore(ctypes.addressof(anchor), size, vec.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        del anchor
        return float((vec & 1).sum()) / pages
    finally:
        region.close()


def drop_cache(path: Path) -> float:
    """Evict the file from the page cache; returns the resident fraction afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED skips dirty pages
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


# --- the two readers --------------------------------------------------------------------------


def read_all(reader: StoreReader, buffers: list[np.ndarray]) -> tuple[float, int]:
    """Read every expert in file order with one thread per buffer; (seconds, stored bytes)."""
    entries = sorted(reader.manifest.experts, key=lambda e: e.offset)
    next_index = iter(range(len(entries)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(buf: np.ndarray) -> None:
        reader.prepare_thread()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                reader.read_expert(entries[i].layer, entries[i].expert, buf)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(b,)) for b in buffers]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed, sum(e.stored_bytes for e in entries)


def run_dd(path: Path) -> tuple[float, int]:
    """`dd iflag=direct bs=4M` over the file; (seconds, bytes) as dd reports them."""
    cmd = ["dd", f"if={path}", "of=/dev/null", "iflag=direct", "bs=4M"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    m = re.search(r"^(\d+) bytes .*copied, ([\d.]+) s", done.stderr, re.MULTILINE)
    if not m:
        return wall, path.stat().st_size
    return float(m.group(2)), int(m.group(1))


# --- the codec on the same data ---------------------------------------------------------------


def codec_numbers(reader: StoreReader, sample_bytes: int, threads: int) -> dict[str, float | int | str]:
    m = reader.manifest
    count = max(1, min(len(m.experts), sample_bytes // m.raw_bytes))
    raws = []
    for e in m.experts[:count]:
        buf = np.empty(m.slot_bytes, dtype=np.uint8)
        reader.read_expert(e.layer, e.expert, buf)
        raws.append(buf[: m.raw_bytes])
    raw_total = count * m.raw_bytes
    out: dict[str, float | int | str] = {"lz4_sample_experts": count, "lz4_backend": LZ4_BACKEND}

    encoder = PlaneEncoder(m.raw_bytes)
    start = time.perf_counter()
    blobs = [encoder.encode(r, "lz4-planes") for r in raws]
    out["lz4_encode_gbps"] = raw_total / (time.perf_counter() - start) / 1e9
    stored = [np.frombuffer(b"".join(bytes(p) for p in b.pieces), dtype=np.uint8) for b in blobs]
    out["lz4_ratio"] = raw_total / sum(len(s) for s in stored)
    out["lz4_high_plane_ratio"] = (m.raw_bytes // 2 * count) / sum(b.planes[1] for b in blobs)
    out["lz4_experts_compressed"] = sum(b.codec == "lz4-planes" for b in blobs)
    compressed = [(s, b) for s, b in zip(stored, blobs, strict=True) if b.codec == "lz4-planes"]
    if not compressed:
        return out
    comp_raw = len(compressed) * m.raw_bytes

    def decode_loop(verify: bool, nthreads: int) -> float:
        def work(part: list[tuple[np.ndarray, EncodedBlob]]) -> None:
            decoder = PlaneDecoder()
            target = alloc_aligned(m.slot_bytes)
            for s, b in part:
                if verify:
                    xxhash.xxh64_intdigest(s.data)
                decoder.decode(s, b.planes, target[: m.raw_bytes])
                if verify:
                    xxhash.xxh64_intdigest(target[: m.raw_bytes].data)

        parts = [compressed[i::nthreads] for i in range(nthreads)]
        work(compressed[:1])  # warm up
        workers = [threading.Thread(target=work, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return comp_raw / (time.perf_counter() - start) / 1e9

    out["lz4_decode_gbps"] = decode_loop(False, 1)
    out["lz4_decode_verify_gbps"] = decode_loop(True, 1)
    out[f"lz4_decode_verify_gbps_{threads}t"] = decode_loop(True, threads)
    # level-9 HC is slow to pack (~6 MB/s here): measure it on a few experts only
    hc = PlaneEncoder(m.raw_bytes, level=9)
    few = raws[: max(1, (32 << 20) // m.raw_bytes)]
    out["lz4hc9_ratio"] = len(few) * m.raw_bytes / sum(hc.encode(r, "lz4-planes").stored_bytes for r in few)
    return out


# --- GIL --------------------------------------------------------------------------------------


def gil_wait(step: Callable[[], object], seconds: float = 0.4) -> tuple[float, float]:
    """(ms per call of ``step``, p90 ms a waking thread waits for the GIL while it loops).

    A step that holds the GIL makes the waker wait about one call; one that releases it,
    only the few Python bytecodes between calls.
    """
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            step()

    busy = threading.Thread(target=loop)
    busy.start()
    waits = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        time.sleep(0.0005)
        waits.append(time.perf_counter() - start - 0.0005)
    stop.set()
    busy.join()
    return statistics.median(times) * 1e3, float(np.percentile(waits, 90)) * 1e3


def gil_numbers(reader: StoreReader) -> dict[str, tuple[float, float]]:
    m = reader.manifest
    raw = alloc_aligned(m.slot_bytes)
    reader.read_expert(0, 0, raw)
    blob = PlaneEncoder(m.raw_bytes).encode(raw[: m.raw_bytes], "lz4-planes")
    high = np.frombuffer(bytes(blob.pieces[1]), dtype=np.uint8)
    plane_out = np.empty(m.raw_bytes // 2, dtype=np.uint8)
    stored = np.frombuffer(b"".join(bytes(p) for p in blob.pieces), dtype=np.uint8)
    decoder = PlaneDecoder()
    target = alloc_aligned(m.slot_bytes)
    fd = os.open(reader.data_path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        return {
            "preadv": gil_wait(lambda: os.preadv(fd, [target.data], 0)),
            "lz4_ctypes": gil_wait(lambda: lz4_decompress_into(high, plane_out)),
            "planes_decode": gil_wait(lambda: decoder.decode(stored, blob.planes, target[: m.raw_bytes])),
            "xxhash": gil_wait(lambda: xxhash.xxh64_intdigest(raw[: m.raw_bytes].data)),
            "control_holds_gil": gil_wait(lambda: pow(7, 200_000)),  # big-int math: no release
        }
    finally:
        os.close(fd)


# --- main -------------------------------------------------------------------------------------


def ensure_store(args: argparse.Namespace) -> StoreManifest:
    wanted = {"preset": args.preset, "scale": args.scale, "seed": 0}
    try:
        m = load_manifest(args.dir)
        same = all(m.source.get(k) == v for k, v in wanted.items()) and m.num_layers == args.layers
        codec_ok = all(e.codec == "none" for e in m.experts) == (args.codec == "none")
        if same and codec_ok:
            log(f"reusing {args.dir}")
            return m
    except StoreError:
        pass
    log(f"packing {args.preset} x {args.layers} layers into {args.dir}")
    return pack_synthetic(
        args.dir,
        args.preset,
        scale=args.scale,
        layers=args.layers,
        codec=args.codec,
        force=True,
        progress=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", type=Path, default=REPO / "out" / "bench-store")
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(SYNTHETIC_PRESETS))
    p.add_argument("--layers", type=int, default=4, help="MoE layers (default 4: 4.5 GiB)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--codec", default="none", choices=["none", "lz4-planes"])
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="dd/reader pairs, alternating")
    p.add_argument("--lz4-sample-mib", type=int, default=512)
    p.add_argument("--cleanup", action="store_true", help="delete the store afterwards")
    args = p.parse_args()

    kind = fs_type(args.dir.parent if not args.dir.exists() else args.dir)
    if kind in TMPFS_TYPES:
        log(f"warning: {args.dir} is on {kind}: cold reads measure memory, not a disk")
    manifest = ensure_store(args)
    data = args.dir / manifest.data_file
    size = data.stat().st_size
    raw_total = manifest.raw_bytes * len(manifest.experts)
    if raw_total < MIN_STORE_BYTES:
        log(f"warning: the store holds {raw_total / GIB:.2f} GiB, under the 4 GiB this bench is meant for")

    reader = StoreReader(args.dir)
    buffers = [alloc_aligned(manifest.slot_bytes) for _ in range(args.threads)]
    runs: list[dict[str, float | str]] = []
    for _ in range(args.repeats):
        left = drop_cache(data)
        seconds, nbytes = run_dd(data)
        runs.append({"what": "dd", "gbps": nbytes / seconds / 1e9, "resident": left, "s": seconds})
        left = drop_cache(data)
        seconds, nbytes = read_all(reader, buffers)
        raw_gbps = manifest.raw_bytes * len(manifest.experts) / seconds / 1e9
        runs.append(
            {"what": "reader", "gbps": nbytes / seconds / 1e9, "raw_gbps": raw_gbps,
             "resident": left, "s": seconds}
        )  # fmt: skip
    dd_runs = [float(r["gbps"]) for r in runs if r["what"] == "dd"]
    rd_runs = [float(r["gbps"]) for r in runs if r["what"] == "reader"]
    dd = statistics.median(dd_runs)
    rd = statistics.median(rd_runs)
    rd_raw = statistics.median(float(r["raw_gbps"]) for r in runs if r["what"] == "reader")
    # the disk's speed drifts (a shared host): compare each reader run with the dd run before it
    pair_ratios = [b / a for a, b in zip(dd_runs, rd_runs, strict=True)]
    ratio = statistics.median(pair_ratios)
    log("measuring the codec and the GIL")
    codec = codec_numbers(reader, args.lz4_sample_mib << 20, args.threads)
    gil = gil_numbers(reader)
    direct = reader.direct
    reader.close()

    print(f"store      {args.dir} ({kind}), {size / GIB:.2f} GiB, {len(manifest.experts)} experts "
          f"of {manifest.raw_bytes / (1 << 20):.1f} MiB, codec {args.codec}")  # fmt: skip
    print(f"reader     {args.threads} threads, O_DIRECT {direct}, lz4 via {LZ4_BACKEND}")
    print(f"{'run':<8} {'GB/s':>7} {'seconds':>8} {'cached before':>14}")
    for r in runs:
        print(f"{r['what']:<8} {r['gbps']:>7.3f} {r['s']:>8.2f} {r['resident']:>13.1%}")
    print(f"median   reader {rd:.3f} GB/s (raw {rd_raw:.3f}), dd {dd:.3f} GB/s")
    spread = f"{min(pair_ratios):.3f}..{max(pair_ratios):.3f}"
    print(f"ratio    reader / dd per pair: median {ratio:.3f}, range {spread}")
    for key, value in codec.items():
        print(
            f"codec    {key:<28} {value:.3f}" if isinstance(value, float) else f"codec    {key:<28} {value}"
        )
    for key, (call_ms, wait_ms) in gil.items():
        print(f"GIL      {key:<18} {call_ms:6.2f} ms per call; a waking thread waits {wait_ms:5.2f} ms")
    result = {
        "read_gbps": round(rd, 3),
        "read_raw_gbps": round(rd_raw, 3),
        "dd_gbps": round(dd, 3),
        "ratio": round(ratio, 3),
        "ratio_range": [round(min(pair_ratios), 3), round(max(pair_ratios), 3)],
        "threads": args.threads,
        "o_direct": direct,
        "store_bytes": size,
        "experts": len(manifest.experts),
        "expert_bytes": manifest.raw_bytes,
        "codec": args.codec,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in codec.items()},
        "gil_ms_call_and_wait": {k: [round(c, 2), round(w, 2)] for k, (c, w) in gil.items()},
    }
    if args.cleanup:
        shutil.rmtree(args.dir)
        log(f"deleted {args.dir}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
