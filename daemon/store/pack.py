"""Build stores: `StoreWriter` (temp dir, then rename), `pack_safetensors`, `pack_synthetic`.

A pack writes into a temporary directory next to the destination and renames it into
place only after the data file and the manifest are fsynced, so an interrupted or failed
pack never leaves a half store at the destination. The store is readable by everyone
(directories 0755, files 0644), or only by its owner and one group (``group``: 0750, 0640),
whatever the packer's umask: the service that reads it usually runs as another user.
Partial directories are owned and cleaned up as `expertd.daemon.store.partials` describes.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from expertd.daemon.protocol.families import ExpertLayout
from expertd.daemon.store.checkpoint import CheckpointPlan, scan_checkpoint
from expertd.daemon.store.codec import LZ4_HC_MAX_LEVEL, PlaneEncoder
from expertd.daemon.store.manifest import (
    BLOB_ALIGN_BYTES,
    CODEC_NONE,
    CODECS,
    DATA_NAME,
    DTYPE_BYTES,
    MANIFEST_NAME,
    ExpertEntry,
    StoreError,
    StoreManifest,
    TensorSpec,
    layout_tensors,
    round_up,
    save_manifest,
)
from expertd.daemon.store.partials import (
    OLD_INFIX,
    OWNER_NAME,
    PARTIAL_INFIX,
    release,
    remove_stale_partials,
    signals_deferred,
    write_owner,
)

SYNTHETIC_STD = 0.02  # weights drawn N(0, 0.02^2), the usual init scale of trained MoE FFNs
GEN_CHUNK = 1 << 20  # float32 values per generation step (4 MiB of scratch per worker)
GEN_WORKERS = 2  # synthetic experts generated in parallel (numpy releases the GIL)


@dataclass(frozen=True)
class SyntheticPreset:
    """A real model's expert geometry (from its config.json)."""

    model: str
    architecture: str
    hidden: int  # hidden_size
    ffn: int  # the routed experts' intermediate size
    num_experts: int
    num_layers: int  # MoE layers
    first_moe_layer: int  # checkpoint id of the first MoE layer (DeepSeek's first is dense)
    naming: str  # mixtral (w1/w2/w3) or experts (gate/up/down_proj)
    top_k: int  # experts per token (num_experts_per_tok)
    moe_every: int = 1  # checkpoint layers per MoE layer (Llama-4 Maverick: every second one)


_P = SyntheticPreset
SYNTHETIC_PRESETS = {
    # name: model, model_type, hidden, ffn, experts, MoE layers, first MoE layer, naming, top-k
    "mixtral-8x7b": _P("mistralai/Mixtral-8x7B-v0.1", "mixtral", 4096, 14336, 8, 32, 0, "mixtral", 2),
    "deepseek-v2-lite": _P("deepseek-ai/DeepSeek-V2-Lite", "deepseek_v2", 2048, 1408, 64, 26, 1,
                           "experts", 6),
    "qwen3-30b-a3b": _P("Qwen/Qwen3-30B-A3B", "qwen3_moe", 2048, 768, 128, 48, 0, "experts", 8),
    "olmoe-1b-7b": _P("allenai/OLMoE-1B-7B-0924", "olmoe", 2048, 1024, 64, 16, 0, "experts", 8),
    # The shipped Granite trace's model (its checkpoint fuses experts; the synthetic store names them).
    "granite-3.0-1b-a400m": _P("ibm-granite/granite-3.0-1b-a400m-instruct", "granitemoe", 1024, 512, 32, 24,
                               0, "experts", 8),
    "llama-4-maverick": _P("meta-llama/Llama-4-Maverick-17B-128E-Instruct", "llama4", 5120, 8192, 128, 24, 1,
                           "experts", 1, moe_every=2),
}  # fmt: skip


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _report_stderr(message: str) -> None:
    print(f"expertd pack: {message}", file=sys.stderr)


@dataclass(frozen=True)
class StoreModes:
    """Who may read a store: everyone, or its owner and the group ``gid``."""

    gid: int | None = None

    @property
    def dir_mode(self) -> int:
        return 0o755 if self.gid is None else 0o750

    @property
    def file_mode(self) -> int:
        return 0o644 if self.gid is None else 0o640

    def apply(self, path: Path | int) -> None:
        """Set the mode (and group) of a path, or of an open file descriptor."""
        is_dir = not isinstance(path, int) and path.is_dir()
        mode = self.dir_mode if is_dir else self.file_mode
        try:
            if self.gid is not None:
                os.chown(path, -1, self.gid)
            os.chmod(path, mode)
        except PermissionError:
            raise StoreError(
                f"{path}: cannot give it to group {self.gid} (the packer must be root or a member)"
            ) from None


def store_modes(group: str | int | None) -> StoreModes:
    """The modes for ``group`` (a name or a gid; None: world-readable); unknown groups are refused."""
    if group is None:
        return StoreModes()
    try:
        gid = grp.getgrnam(group).gr_gid if isinstance(group, str) and not group.isdigit() else int(group)
        grp.getgrgid(gid)
    except (KeyError, ValueError):
        raise StoreError(f"--group {group}: no such group") from None
    return StoreModes(gid)


def check_options(
    out_dir: str | os.PathLike[str], codec: str, lz4_level: int, force: bool, group: str | int | None = None
) -> None:
    """Refuse bad options before any work is done."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if not 0 <= lz4_level <= LZ4_HC_MAX_LEVEL:
        raise ValueError(f"lz4 level must be 0 (fast) or 1..{LZ4_HC_MAX_LEVEL}, got {lz4_level}")
    check_destination(out_dir, force=force)
    store_modes(group)


def _make_parents(parent: Path, modes: StoreModes) -> None:
    """Create ``parent`` and its missing ancestors with the store's directory mode."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        modes.apply(path)


def unreachable_ancestors(path: Path, modes: StoreModes) -> list[str]:
    """The ancestors of ``path`` that the store's readers cannot enter, with their modes."""
    blocked = []
    for ancestor in reversed(path.resolve().parents):
        st = ancestor.stat()
        if st.st_mode & 0o001 or (modes.gid is not None and st.st_gid == modes.gid and st.st_mode & 0o010):
            continue
        blocked.append(f"{ancestor} (mode {stat.S_IMODE(st.st_mode):04o})")
    return blocked


def check_destination(out_dir: str | os.PathLike[str], *, force: bool) -> Path:
    """Refuse an existing destination unless ``force``; returns the resolved path."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise StoreError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a directory")
    return out


class StoreWriter:
    """Writes experts in layer-major order into a temporary store; `commit` puts it in place."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        tensors: tuple[TensorSpec, ...],
        raw_bytes: int,
        *,
        codec: str = CODEC_NONE,
        lz4_level: int = 0,
        force: bool = False,
        group: str | int | None = None,
        report: Callable[[str], None] = _report_stderr,
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
        self.out = check_destination(out_dir, force=force)
        self.force = force
        self.tensors = tensors
        self.raw_bytes = raw_bytes
        self.codec = codec
        self.modes = store_modes(group)
        _make_parents(self.out.parent, self.modes)
        remove_stale_partials(self.out.parent, report)
        self._fd = -1
        with signals_deferred():  # a signal here would leak a partial nobody owns yet
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{PARTIAL_INFIX}", dir=self.out.parent))
            try:
                write_owner(self.tmp)
                self.modes.apply(self.tmp)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                self._fd = os.open(self.tmp / DATA_NAME, flags, self.modes.file_mode)
                self.modes.apply(self._fd)  # the umask may have taken bits away
            except BaseException:
                self.abort()
                raise
        self._encoder = PlaneEncoder(raw_bytes, level=lz4_level) if codec != CODEC_NONE else None
        self._pad = memoryview(bytes(BLOB_ALIGN_BYTES))
        self._offset = 0
        self.entries: list[ExpertEntry] = []

    def write_expert(self, layer: int, expert: int, raw: np.ndarray) -> ExpertEntry:
        """Encode, checksum and append one expert's raw blob (uint8, exactly ``raw_bytes``)."""
        if len(raw) != self.raw_bytes:
            raise ValueError(f"raw blob of {len(raw)} bytes, layout says {self.raw_bytes}")
        blob = self._encoder.encode(raw, self.codec) if self._encoder else None
        raw_hash = xxhash.xxh64_intdigest(raw.data)
        if blob is None or blob.codec == CODEC_NONE:
            pieces: tuple[memoryview, ...] = (raw.data,)
            codec, planes, stored_hash = CODEC_NONE, (), raw_hash
        else:
            pieces, codec, planes = blob.pieces, blob.codec, blob.planes
            hasher = xxhash.xxh64()
            for piece in pieces:
                hasher.update(piece)
            stored_hash = hasher.intdigest()
        stored = sum(len(p) for p in pieces)
        for piece in pieces:
            _write_all(self._fd, piece)
        _write_all(self._fd, self._pad[: round_up(stored, BLOB_ALIGN_BYTES) - stored])
        entry = ExpertEntry(
            layer, expert, self._offset, stored, len(raw), codec, raw_hash, stored_hash, planes
        )
        self._offset += round_up(stored, BLOB_ALIGN_BYTES)
        self.entries.append(entry)
        return entry

    def commit(self, **meta: Any) -> StoreManifest:
        """Finish the data file, write the manifest (``meta``: its descriptive fields), rename."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        dtype_bytes: dict[str, int] = {}
        for t in self.tensors:
            dtype_bytes[t.dtype] = dtype_bytes.get(t.dtype, 0) + t.nbytes
        manifest = StoreManifest(
            tensors=self.tensors,
            raw_bytes=self.raw_bytes,
            data_bytes=self._offset,
            experts=tuple(self.entries),
            dtype=max(dtype_bytes, key=lambda d: dtype_bytes[d]),
            **meta,
        )
        save_manifest(manifest, self.tmp)
        self.modes.apply(self.tmp / MANIFEST_NAME)
        (self.tmp / OWNER_NAME).unlink()
        _fsync_dir(self.tmp)
        old: Path | None = None
        with signals_deferred():  # between the two renames the old store is only in `old`
            if self.out.exists():
                check_destination(self.out, force=self.force)  # it may have appeared meanwhile
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{OLD_INFIX}", dir=self.out.parent))
                os.replace(self.out, old / "store")
            os.replace(self.tmp, self.out)
            release(self.tmp)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        shutil.rmtree(self.tmp, ignore_errors=True)
        release(self.tmp)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.tmp.exists():  # not committed: an exception, or a caller that forgot
            self.abort()


def _progress(total_bytes: int, total_experts: int, enabled: bool) -> Any:
    from tqdm import tqdm

    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="pack",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
    )
    bar.set_postfix_str(f"experts 0/{total_experts}")
    return bar


def _pack(
    out_dir: str | os.PathLike[str],
    tensors: tuple[TensorSpec, ...],
    raw_bytes: int,
    num_layers: int,
    num_experts: int,
    fill: Callable[[int, int, np.ndarray], None],
    meta: dict[str, Any],
    *,
    codec: str,
    lz4_level: int,
    force: bool,
    progress: bool,
    group: str | int | None = None,
    workers: int = 1,
) -> StoreManifest:
    """Fill and write every expert in order; ``workers`` > 1 fills ahead on a thread pool."""
    total = num_layers * num_experts
    ring = [np.zeros(raw_bytes, dtype=np.uint8) for _ in range(workers + 1 if workers > 1 else 1)]
    with (
        StoreWriter(
            out_dir, tensors, raw_bytes, codec=codec, lz4_level=lz4_level, force=force, group=group
        ) as writer,
        _progress(raw_bytes * total, total, progress) as bar,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        pending: deque[Future[None]] = deque()

        def submit(i: int) -> None:
            layer, expert = divmod(i, num_experts)
            buf = ring[i % len(ring)]
            if workers > 1:
                pending.append(pool.submit(fill, layer, expert, buf))
            else:
                fill(layer, expert, buf)

        for i in range(min(len(ring) - 1, total) if workers > 1 else 0):
            submit(i)
        for i in range(total):
            if workers > 1:
                if i + len(ring) - 1 < total:
                    submit(i + len(ring) - 1)
                pending.popleft().result()
            else:
                submit(i)
            layer, expert = divmod(i, num_experts)
            writer.write_expert(layer, expert, ring[i % len(ring)])
            bar.update(raw_bytes)
            bar.set_postfix_str(f"experts {i + 1}/{total}", refresh=False)
        manifest = writer.commit(num_layers=num_layers, num_experts=num_experts, **meta)
    return manifest


def pack_safetensors(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    codec: str = CODEC_NONE,
    lz4_level: int = 0,
    force: bool = False,
    progress: bool = False,
    group: str | int | None = None,
    expert_layout: ExpertLayout | None = None,
    check: Callable[[CheckpointPlan], None] | None = None,
) -> StoreManifest:
    """Pack a Hugging Face checkpoint's routed experts; raises `CheckpointError` on bad input.

    ``check``: called with the scanned checkpoint before anything is written (raise to refuse).
    ``expert_layout``: recorded in the manifest (`expertd pack --from-hf` knows it).
    """
    check_options(out_dir, codec, lz4_level, force, group)
    with scan_checkpoint(checkpoint_dir) as plan:
        if check is not None:
            check(plan)
        meta = {
            "expert_layout": expert_layout,
            **plan.described(),
            "source": {
                "kind": "safetensors",
                **({"top_k": plan.top_k} if plan.top_k else {}),
                "path": str(Path(checkpoint_dir).resolve()),
                "skipped_layers": list(plan.skipped_layers),
            },
        }
        return _pack(
            out_dir,
            plan.tensors,
            plan.raw_bytes,
            len(plan.checkpoint_layers),
            plan.num_experts,
            plan.fill_expert,
            meta,
            codec=codec,
            lz4_level=lz4_level,
            force=force,
            progress=progress,
            group=group,
        )


def synthetic_layout(preset: SyntheticPreset, scale: float = 1.0) -> tuple[tuple[TensorSpec, ...], int]:
    """The expert blob layout of ``preset`` with hidden and ffn sizes divided by ``scale``."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    hidden = max(1, round(preset.hidden / scale))
    ffn = max(1, round(preset.ffn / scale))
    if preset.naming == "mixtral":
        names = (("w1", (ffn, hidden)), ("w3", (ffn, hidden)), ("w2", (hidden, ffn)))
    else:
        names = (
            ("gate_proj", (ffn, hidden)),
            ("up_proj", (ffn, hidden)),
            ("down_proj", (hidden, ffn)),
        )
    return layout_tensors([(name, "bfloat16", shape) for name, shape in names])


class SyntheticFiller:
    """Deterministic bf16 N(0, std^2) experts: expert (l, e) depends only on (seed, l, e).

    Thread-safe; each thread keeps two float32-chunk scratch buffers, so nothing is
    allocated per expert.
    """

    def __init__(self, tensors: tuple[TensorSpec, ...], seed: int, std: float = SYNTHETIC_STD) -> None:
        assert all(t.dtype == "bfloat16" for t in tensors)
        self.tensors = tensors
        self.seed = seed
        self.std = std
        self._scratch = threading.local()

    def __call__(self, layer: int, expert: int, raw: np.ndarray) -> None:
        if not hasattr(self._scratch, "f32"):
            self._scratch.f32 = np.empty(GEN_CHUNK, dtype=np.float32)
            self._scratch.carry = np.empty(GEN_CHUNK, dtype=np.uint32)
        rng = np.random.Generator(np.random.SFC64([self.seed, layer, expert]))
        for spec in self.tensors:
            n = spec.nbytes // DTYPE_BYTES[spec.dtype]
            dst = raw[spec.offset : spec.offset + spec.nbytes].view(np.uint16)
            for a in range(0, n, GEN_CHUNK):
                k = min(GEN_CHUNK, n - a)
                f32 = self._scratch.f32[:k]
                bits = f32.view(np.uint32)
                carry = self._scratch.carry[:k]
                rng.standard_normal(out=f32, dtype=np.float32)
                np.multiply(f32, self.std, out=f32)
                # float32 -> bfloat16, round to nearest even: add 0x7fff + the kept lsb
                np.right_shift(bits, 16, out=carry)
                np.bitwise_and(carry, 1, out=carry)
                np.add(carry, 0x7FFF, out=carry)
                np.add(bits, carry, out=bits)
                np.copyto(dst[a : a + k], bits.view(np.uint16)[1::2])  # little-endian high half


def pack_synthetic(
    out_dir: str | os.PathLike[str],
    preset: str,
    *,
    scale: float = 1.0,
    layers: int | None = None,
    seed: int = 0,
    codec: str = CODEC_NONE,
    lz4_level: int = 0,
    force: bool = False,
    progress: bool = False,
    group: str | int | None = None,
) -> StoreManifest:
    """Pack a deterministic synthetic store with ``preset``'s expert shapes."""
    if preset not in SYNTHETIC_PRESETS:
        raise StoreError(f"unknown preset {preset!r} (known: {', '.join(SYNTHETIC_PRESETS)})")
    spec = SYNTHETIC_PRESETS[preset]
    num_layers = spec.num_layers if layers is None else layers
    if not 1 <= num_layers <= spec.num_layers:
        raise StoreError(f"--layers must be in 1..{spec.num_layers} for {preset}, got {num_layers}")
    check_options(out_dir, codec, lz4_level, force, group)
    tensors, raw_bytes = synthetic_layout(spec, scale)
    meta = {
        "model": f"synthetic {preset}" + (f" / {scale:g}" if scale != 1 else ""),
        "architecture": spec.architecture,
        "naming": "synthetic",
        "checkpoint_layers": tuple(
            range(spec.first_moe_layer, spec.first_moe_layer + num_layers * spec.moe_every, spec.moe_every)
        ),
        "source": {
            "kind": "synthetic",
            "top_k": spec.top_k,
            "preset": preset,
            "like": spec.model,
            "scale": scale,
            "seed": seed,
            "std": SYNTHETIC_STD,
        },
    }
    return _pack(
        out_dir,
        tensors,
        raw_bytes,
        num_layers,
        spec.num_experts,
        SyntheticFiller(tensors, seed),
        meta,
        codec=codec,
        lz4_level=lz4_level,
        force=force,
        progress=progress,
        group=group,
        workers=GEN_WORKERS,
    )
