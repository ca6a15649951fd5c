"""The expert store's on-disk format: a versioned JSON manifest and one data file of blobs.

A store directory holds ``manifest.json`` and ``experts.bin``. Each routed expert is one
blob: its tensors laid out back to back (the layout is the same for every expert,
`TensorSpec` offsets inside the raw blob), stored at a `BLOB_ALIGN_BYTES`-aligned offset
of the data file, raw or compressed (`expertd.daemon.store.codec`), with xxhash64 checksums of
both the raw and the stored bytes. Layers are MoE layer indices ``0..L-1``;
``checkpoint_layers`` maps them back to the checkpoint's layer ids.

Everything read from disk is untrusted: `load_manifest` checks types, bounds and
consistency and raises `StoreFormatError` naming the offending field. This module is
pure (no torch, no I/O beyond reading the manifest) so the daemon core can import it.

``expert_layout`` (optional, `expertd.daemon.protocol.families.ExpertLayout`) says how the expert's
tensors make the model's expert parameters and compute; stores packed before it existed have
none and are read as plain SwiGLU experts named by their tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertd.daemon.protocol.families import ExpertLayout
from expertd.daemon.protocol.tensors import DTYPE_BYTES, TensorSpec

STORE_FORMAT = "expertd-store"
STORE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_NAME = "experts.bin"

BLOB_ALIGN_BYTES = 4096  # blob offsets and on-disk lengths: O_DIRECT needs this
TENSOR_ALIGN_BYTES = 256  # tensor offsets inside a blob (cudaMalloc's alignment)
MAX_MANIFEST_BYTES = 256 << 20  # refuse to parse anything larger

CODEC_NONE = "none"
CODEC_LZ4_PLANES = "lz4-planes"
CODECS = (CODEC_NONE, CODEC_LZ4_PLANES)
PLANE_COUNT = 2  # lz4-planes splits 16-bit words into low and high byte planes


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreFormatError(StoreError):
    """A manifest or data file that this expertd cannot trust or read."""


class StoreTruncatedError(StoreFormatError):
    """The data file is shorter than the manifest says."""


class CheckpointError(StoreError):
    """A checkpoint that cannot be packed: missing, misshaped or unrecognised tensors."""


class CorruptExpertError(StoreError):
    """One expert's bytes failed verification; nothing was returned as data."""

    def __init__(self, layer: int, expert: int, reason: str) -> None:
        super().__init__(f"expert (layer {layer}, expert {expert}) is corrupt: {reason}")
        self.layer = layer
        self.expert = expert
        self.reason = reason


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class ExpertEntry:
    """Where one expert's blob lies in the data file, how it is stored, and its checksums."""

    layer: int
    expert: int
    offset: int  # in the data file; a multiple of BLOB_ALIGN_BYTES
    stored_bytes: int  # on disk, before padding to BLOB_ALIGN_BYTES
    raw_bytes: int  # after decoding: the blob the layout describes
    codec: str
    xxh64: int  # of the raw bytes
    stored_xxh64: int  # of the stored bytes (equal to xxh64 for codec none)
    planes: tuple[int, ...] = ()  # lz4-planes: stored bytes of each plane, low byte first

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "layer": self.layer,
            "expert": self.expert,
            "offset": self.offset,
            "stored_bytes": self.stored_bytes,
            "raw_bytes": self.raw_bytes,
            "codec": self.codec,
            "xxh64": f"{self.xxh64:016x}",
            "stored_xxh64": f"{self.stored_xxh64:016x}",
        }
        if self.planes:
            obj["planes"] = list(self.planes)
        return obj


@dataclass(frozen=True)
class ModelExperts:
    """A model's routed experts as a store lays them out: declared once, for the store's manifest
    and for the checkpoint scan that packs it (`checkpoint.CheckpointPlan`)."""

    model: str
    architecture: str
    naming: str  # how expert tensors were named in the source: mixtral, experts, fused, synthetic
    num_experts: int  # routed experts per layer
    checkpoint_layers: tuple[int, ...]  # store layer i is checkpoint layer checkpoint_layers[i]
    tensors: tuple[TensorSpec, ...]
    raw_bytes: int  # one expert's raw blob

    def described(self) -> dict[str, Any]:
        """The descriptive fields a manifest copies from its source (the rest the writer knows)."""
        names = ("model", "architecture", "naming", "checkpoint_layers")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class StoreManifest(ModelExperts):
    """Everything about a store except the weights themselves."""

    dtype: str  # the dtype of most of the blob's bytes
    num_layers: int  # MoE layers in the store
    data_bytes: int  # the data file's length, a multiple of BLOB_ALIGN_BYTES
    experts: tuple[ExpertEntry, ...]  # layer-major: index = layer * num_experts + expert
    source: dict[str, Any] = field(default_factory=dict)
    data_file: str = DATA_NAME
    version: int = STORE_FORMAT_VERSION
    expert_layout: ExpertLayout | None = None  # None: a store packed before layouts were recorded

    @property
    def slot_bytes(self) -> int:
        """The buffer size `StoreReader.read_expert` needs: the raw blob rounded up to 4 KiB."""
        return round_up(self.raw_bytes, BLOB_ALIGN_BYTES)

    @property
    def stored_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.experts)

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes * len(self.experts) / max(1, self.stored_bytes)

    def entry(self, layer: int, expert: int) -> ExpertEntry:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise KeyError(
                f"no expert (layer {layer}, expert {expert}) in this store "
                f"({self.num_layers} layers x {self.num_experts} experts)"
            )
        return self.experts[layer * self.num_experts + expert]

    def tensor(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(f"no tensor {name!r} in the expert layout ({[t.name for t in self.tensors]})")

    def to_json(self) -> dict[str, Any]:
        layout = {} if self.expert_layout is None else {"expert_layout": self.expert_layout.to_json()}
        return {
            "format": STORE_FORMAT,
            "version": self.version,
            "model": self.model,
            "architecture": self.architecture,
            "naming": self.naming,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "checkpoint_layers": list(self.checkpoint_layers),
            "raw_bytes": self.raw_bytes,
            "slot_bytes": self.slot_bytes,
            "tensors": [t.to_json() for t in self.tensors],
            **layout,
            "data_file": self.data_file,
            "data_bytes": self.data_bytes,
            "source": self.source,
            "experts": [e.to_json() for e in self.experts],
        }

    @classmethod
    def from_json(cls, obj: Any) -> StoreManifest:
        """Parse and validate a manifest; raises `StoreFormatError` naming the bad field."""
        return _parse_manifest(obj)


def layout_tensors(
    specs: list[tuple[str, str, tuple[int, ...]]],
) -> tuple[tuple[TensorSpec, ...], int]:
    """Lay tensors (name, dtype, shape) out back to back; returns the specs and the raw size."""
    out: list[TensorSpec] = []
    offset = 0
    for name, dtype, shape in specs:
        spec = TensorSpec(name, dtype, tuple(shape), offset)
        out.append(spec)
        offset = round_up(offset + spec.nbytes, TENSOR_ALIGN_BYTES)
    return tuple(out), offset


def load_manifest(store_dir: str | os.PathLike[str]) -> StoreManifest:
    path = Path(store_dir) / MANIFEST_NAME
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise StoreFormatError(f"{store_dir}: not a store (no {MANIFEST_NAME})") from None
    except OSError as exc:
        raise StoreFormatError(f"{path}: cannot read: {exc.strerror}") from None
    if len(text) > MAX_MANIFEST_BYTES:
        raise StoreFormatError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreFormatError(f"{path}: not valid JSON: {exc}") from None
    try:
        return _parse_manifest(obj)
    except StoreFormatError as exc:
        raise StoreFormatError(f"{path}: {exc}") from None


def save_manifest(manifest: StoreManifest, store_dir: str | os.PathLike[str]) -> None:
    """Write the manifest durably (fsync), validating it first as a reader would."""
    obj = manifest.to_json()
    _parse_manifest(obj)
    path = Path(store_dir) / MANIFEST_NAME
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# --- validation ---------------------------------------------------------------------------


def _get(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise StoreFormatError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; a manifest never means True when it says 1
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StoreFormatError(
            f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__} {value!r:.40}"
        )
    return value


def _nonneg(obj: dict[str, Any], key: str, where: str, *, positive: bool = False) -> int:
    value: int = _get(obj, key, int, where)
    if value < (1 if positive else 0):
        raise StoreFormatError(f"{where}.{key}: must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _hex64(obj: dict[str, Any], key: str, where: str) -> int:
    text: str = _get(obj, key, str, where)
    if len(text) != 16:
        raise StoreFormatError(f"{where}.{key}: expected 16 hex digits, got {text!r:.40}")
    try:
        return int(text, 16)
    except ValueError:
        raise StoreFormatError(f"{where}.{key}: expected 16 hex digits, got {text!r:.40}") from None


def _parse_tensor(obj: Any, where: str) -> TensorSpec:
    if not isinstance(obj, dict):
        raise StoreFormatError(f"{where}: expected an object")
    name: str = _get(obj, "name", str, where)
    dtype: str = _get(obj, "dtype", str, where)
    if dtype not in DTYPE_BYTES:
        raise StoreFormatError(f"{where}.dtype: unknown dtype {dtype!r}")
    shape = _get(obj, "shape", list, where)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise StoreFormatError(f"{where}.shape: expected a list of positive ints, got {shape!r:.60}")
    offset = _nonneg(obj, "offset", where)
    if offset % TENSOR_ALIGN_BYTES:
        raise StoreFormatError(f"{where}.offset: {offset} is not a multiple of {TENSOR_ALIGN_BYTES}")
    return TensorSpec(name, dtype, tuple(shape), offset)


def _parse_entry(obj: Any, where: str, raw_bytes: int, data_bytes: int) -> ExpertEntry:
    if not isinstance(obj, dict):
        raise StoreFormatError(f"{where}: expected an object")
    layer = _nonneg(obj, "layer", where)
    expert = _nonneg(obj, "expert", where)
    offset = _nonneg(obj, "offset", where)
    stored = _nonneg(obj, "stored_bytes", where, positive=True)
    raw = _nonneg(obj, "raw_bytes", where, positive=True)
    codec: str = _get(obj, "codec", str, where)
    if codec not in CODECS:
        raise StoreFormatError(f"{where}.codec: unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if raw != raw_bytes:
        raise StoreFormatError(f"{where}.raw_bytes: {raw} differs from the layout's {raw_bytes}")
    if offset % BLOB_ALIGN_BYTES:
        raise StoreFormatError(f"{where}.offset: {offset} is not a multiple of {BLOB_ALIGN_BYTES}")
    if stored > round_up(raw, BLOB_ALIGN_BYTES):
        raise StoreFormatError(f"{where}.stored_bytes: {stored} exceeds the slot ({raw} raw)")
    if offset + round_up(stored, BLOB_ALIGN_BYTES) > data_bytes:
        raise StoreFormatError(
            f"{where}: blob [{offset}, {offset + stored}) lies outside the data file ({data_bytes} bytes)"
        )
    planes: tuple[int, ...] = ()
    if codec == CODEC_NONE and stored != raw:
        raise StoreFormatError(f"{where}: codec none but stored_bytes {stored} != raw_bytes {raw}")
    if codec == CODEC_LZ4_PLANES:
        plane_list = _get(obj, "planes", list, where)
        plane_bytes = raw // PLANE_COUNT
        if (
            raw % PLANE_COUNT
            or len(plane_list) != PLANE_COUNT
            or not all(isinstance(p, int) and 0 < p <= plane_bytes for p in plane_list)
            or sum(plane_list) != stored
        ):
            raise StoreFormatError(
                f"{where}.planes: {plane_list!r:.60} is not {PLANE_COUNT} sizes in "
                f"(0, {plane_bytes}] summing to stored_bytes {stored}"
            )
        planes = tuple(plane_list)
    return ExpertEntry(
        layer=layer,
        expert=expert,
        offset=offset,
        stored_bytes=stored,
        raw_bytes=raw,
        codec=codec,
        xxh64=_hex64(obj, "xxh64", where),
        stored_xxh64=_hex64(obj, "stored_xxh64", where),
        planes=planes,
    )


def _parse_manifest(obj: Any) -> StoreManifest:
    if not isinstance(obj, dict):
        raise StoreFormatError("manifest: expected a JSON object")
    if obj.get("format") != STORE_FORMAT:
        raise StoreFormatError(f"manifest: format is {obj.get('format')!r}, expected {STORE_FORMAT!r}")
    version = _get(obj, "version", int, "manifest")
    if version != STORE_FORMAT_VERSION:
        raise StoreFormatError(
            f"manifest: unsupported store format version {version} "
            f"(this expertd reads version {STORE_FORMAT_VERSION}; repack the store)"
        )
    w = "manifest"
    num_layers = _nonneg(obj, "num_layers", w, positive=True)
    num_experts = _nonneg(obj, "num_experts", w, positive=True)
    raw_bytes = _nonneg(obj, "raw_bytes", w, positive=True)
    data_bytes = _nonneg(obj, "data_bytes", w)
    if data_bytes % BLOB_ALIGN_BYTES:
        raise StoreFormatError(f"{w}.data_bytes: {data_bytes} is not a multiple of {BLOB_ALIGN_BYTES}")
    slot_bytes = obj.get("slot_bytes", round_up(raw_bytes, BLOB_ALIGN_BYTES))
    if slot_bytes != round_up(raw_bytes, BLOB_ALIGN_BYTES):
        raise StoreFormatError(f"{w}.slot_bytes: {slot_bytes!r} does not match raw_bytes {raw_bytes}")
    dtype: str = _get(obj, "dtype", str, w)
    if dtype not in DTYPE_BYTES:
        raise StoreFormatError(f"{w}.dtype: unknown dtype {dtype!r}")
    data_file: str = _get(obj, "data_file", str, w)
    if data_file != os.path.basename(data_file) or data_file in ("", ".", ".."):
        raise StoreFormatError(f"{w}.data_file: {data_file!r} must be a plain file name")

    layers = _get(obj, "checkpoint_layers", list, w)
    if len(layers) != num_layers or not all(isinstance(x, int) and x >= 0 for x in layers):
        raise StoreFormatError(f"{w}.checkpoint_layers: expected {num_layers} non-negative ints")

    tensor_list = _get(obj, "tensors", list, w)
    if not tensor_list:
        raise StoreFormatError(f"{w}.tensors: empty layout")
    tensors = tuple(_parse_tensor(t, f"{w}.tensors[{i}]") for i, t in enumerate(tensor_list))
    if len({t.name for t in tensors}) != len(tensors):
        raise StoreFormatError(f"{w}.tensors: duplicate tensor names")
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end or t.offset + t.nbytes > raw_bytes:
            raise StoreFormatError(
                f"{w}.tensors: {t.name!r} [{t.offset}, {t.offset + t.nbytes}) overlaps another "
                f"tensor or exceeds raw_bytes {raw_bytes}"
            )
        end = t.offset + t.nbytes

    entry_list = _get(obj, "experts", list, w)
    if len(entry_list) != num_layers * num_experts:
        raise StoreFormatError(
            f"{w}.experts: {len(entry_list)} entries for {num_layers} layers x {num_experts} experts"
        )
    experts = tuple(
        _parse_entry(e, f"{w}.experts[{i}]", raw_bytes, data_bytes) for i, e in enumerate(entry_list)
    )
    for i, e in enumerate(experts):
        if (e.layer, e.expert) != divmod(i, num_experts):
            raise StoreFormatError(
                f"{w}.experts[{i}]: is (layer {e.layer}, expert {e.expert}), expected "
                f"(layer {i // num_experts}, expert {i % num_experts})"
            )
    end = 0
    for e in sorted(experts, key=lambda e: e.offset):
        if e.offset < end:
            raise StoreFormatError(
                f"{w}.experts: blob of (layer {e.layer}, expert {e.expert}) overlaps another"
            )
        end = e.offset + e.stored_bytes

    source = obj.get("source", {})
    if not isinstance(source, dict):
        raise StoreFormatError(f"{w}.source: expected an object")
    layout = None
    if "expert_layout" in obj:
        try:
            layout = ExpertLayout.from_json(obj["expert_layout"], f"{w}.expert_layout")
        except ValueError as exc:
            raise StoreFormatError(str(exc)) from None
        names = {t.name for t in tensors}
        missing = sorted({n for parts in layout.weights.values() for n in parts} - names)
        if missing:
            raise StoreFormatError(f"{w}.expert_layout.weights: names {missing}, not in the tensors")
    return StoreManifest(
        model=_get(obj, "model", str, w),
        architecture=_get(obj, "architecture", str, w),
        naming=_get(obj, "naming", str, w),
        dtype=dtype,
        num_layers=num_layers,
        num_experts=num_experts,
        checkpoint_layers=tuple(layers),
        tensors=tensors,
        raw_bytes=raw_bytes,
        data_bytes=data_bytes,
        experts=experts,
        source=source,
        data_file=data_file,
        version=version,
        expert_layout=layout,
    )
