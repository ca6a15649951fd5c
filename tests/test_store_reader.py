"""`StoreReader`: verified reads from several threads; corruption always raises, never returns."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from expertd.daemon.store.manifest import (
    BLOB_ALIGN_BYTES,
    MANIFEST_NAME,
    CorruptExpertError,
    StoreError,
    StoreFormatError,
    StoreTruncatedError,
)
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader, alloc_aligned

PRESET = dict(preset="olmoe-1b-7b", scale=32, layers=2)  # 64 experts of 24 KiB per layer


@pytest.fixture(scope="module", params=["none", "lz4-planes"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / request.param
    m = pack_synthetic(path, codec=request.param, **PRESET)
    if request.param == "lz4-planes":
        assert all(e.codec == "lz4-planes" for e in m.experts)
    return path


def reference(store: Path) -> dict[tuple[int, int], bytes]:
    """Each expert's raw bytes, as a fresh reader returns them."""
    with StoreReader(store, direct=False) as reader:
        buf = alloc_aligned(reader.manifest.slot_bytes)
        out = {}
        for e in reader.manifest.experts:
            n = reader.read_expert(e.layer, e.expert, buf)
            out[(e.layer, e.expert)] = bytes(buf[:n])
    return out


def copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))


def test_direct_and_buffered_reads_return_the_same_bytes(store: Path) -> None:
    ref = reference(store)
    with StoreReader(store) as reader:
        if not reader.direct:
            pytest.skip("the test directory's filesystem refuses O_DIRECT")
        buf = alloc_aligned(reader.manifest.slot_bytes)
        for (layer, expert), raw in ref.items():
            assert reader.read_expert(layer, expert, buf) == len(raw)
            assert bytes(buf[: len(raw)]) == raw


def test_reads_from_several_threads_at_once_are_correct(store: Path) -> None:
    ref = reference(store)
    errors: list[BaseException] = []
    with StoreReader(store) as reader:

        def worker(seed: int) -> None:
            buf = alloc_aligned(reader.manifest.slot_bytes)
            keys = list(ref) * 2
            random.Random(seed).shuffle(keys)
            try:
                for layer, expert in keys:
                    n = reader.read_expert(layer, expert, buf)
                    assert bytes(buf[:n]) == ref[(layer, expert)], (layer, expert)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_unaligned_target_is_read_through_the_page_cache(store: Path) -> None:
    ref = reference(store)
    with StoreReader(store) as reader:
        backing = bytearray(reader.manifest.slot_bytes + 1)
        target = memoryview(backing)[1:]
        n = reader.read_expert(1, 5, target)
        assert bytes(target[:n]) == ref[(1, 5)]


def test_small_target_is_refused(store: Path) -> None:
    with StoreReader(store) as reader:
        buf = alloc_aligned(reader.manifest.slot_bytes - BLOB_ALIGN_BYTES)
        with pytest.raises(ValueError, match="slot_bytes"):
            reader.read_expert(0, 0, buf)
        with pytest.raises(KeyError, match="layer 2, expert 0"):
            reader.read_expert(2, 0, alloc_aligned(reader.manifest.slot_bytes))


def test_filesystem_refusing_o_direct_falls_back_to_buffered_reads(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = reference(store)
    real_open = os.open

    def refusing_open(path, flags, *args):  # what tmpfs before Linux 6.6 answers
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    with StoreReader(store) as reader:
        assert not reader.direct
        buf = alloc_aligned(reader.manifest.slot_bytes)
        n = reader.read_expert(0, 3, buf)
        assert bytes(buf[:n]) == ref[(0, 3)]
    with pytest.raises(StoreError, match="O_DIRECT"):
        StoreReader(store, direct=True)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_store_on_tmpfs_reads_correctly(store: Path) -> None:
    ref = reference(store)
    shm = Path("/dev/shm") / f"expertd-test-{os.getpid()}"
    try:
        copy_store(store, shm)
        with StoreReader(shm) as reader:  # O_DIRECT or not: tmpfs allows it since Linux 6.6
            buf = alloc_aligned(reader.manifest.slot_bytes)
            for key in [(0, 3), (1, 63)]:
                n = reader.read_expert(*key, buf)
                assert bytes(buf[:n]) == ref[key]
    finally:
        for f in shm.glob("*"):
            f.unlink()
        shm.rmdir()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_a_blob_raises_naming_the_expert(store: Path, tmp_path: Path, where: str) -> None:
    bad = copy_store(store, tmp_path / "bad")
    ref = reference(store)
    with StoreReader(bad) as reader:
        entry = reader.manifest.entry(1, 7)
        pos = {"first": 0, "middle": entry.stored_bytes // 2, "last": entry.stored_bytes - 1}[where]
        flip_byte(reader.data_path, entry.offset + pos)
        buf = alloc_aligned(reader.manifest.slot_bytes)
        with pytest.raises(CorruptExpertError, match=r"layer 1, expert 7.*checksum") as info:
            reader.read_expert(1, 7, buf)
        assert (info.value.layer, info.value.expert) == (1, 7)
        for neighbour in [(1, 6), (1, 8)]:  # the others still read correctly
            n = reader.read_expert(*neighbour, buf)
            assert bytes(buf[:n]) == ref[neighbour]


@pytest.mark.parametrize("codec", ["none", "lz4-planes"])
def test_flipped_byte_in_blob_padding_is_harmless(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "s"
    pack_synthetic(path, "olmoe-1b-7b", scale=48, layers=1, codec=codec)  # 6 KiB blobs
    ref = reference(path)
    with StoreReader(path) as reader:
        entry = reader.manifest.entry(0, 1)
        assert entry.stored_bytes % BLOB_ALIGN_BYTES
        flip_byte(reader.data_path, entry.offset + entry.stored_bytes)
        buf = alloc_aligned(reader.manifest.slot_bytes)
        n = reader.read_expert(0, 1, buf)
        assert bytes(buf[:n]) == ref[(0, 1)]


def test_wrong_checksum_in_manifest_raises(store: Path, tmp_path: Path) -> None:
    bad = copy_store(store, tmp_path / "bad")
    obj = json.loads((bad / MANIFEST_NAME).read_text())
    obj["experts"][5]["xxh64"] = "0123456789abcdef"
    (bad / MANIFEST_NAME).write_text(json.dumps(obj))
    with StoreReader(bad) as reader, pytest.raises(CorruptExpertError, match="layer 0, expert 5"):
        reader.read_expert(0, 5, alloc_aligned(reader.manifest.slot_bytes))


def test_truncated_data_file_is_refused_at_open_naming_file_and_expert(store: Path, tmp_path: Path) -> None:
    bad = copy_store(store, tmp_path / "bad")
    with StoreReader(bad) as reader:
        last = reader.manifest.entry(1, 63)
    os.truncate(bad / "experts.bin", last.offset + last.stored_bytes // 2)
    with pytest.raises(StoreTruncatedError, match=r"experts\.bin is truncated.*layer 1, expert 63"):
        StoreReader(bad)
    with StoreReader(bad, allow_truncated=True) as reader:
        buf = alloc_aligned(reader.manifest.slot_bytes)
        with pytest.raises(CorruptExpertError, match="layer 1, expert 63.*truncated"):
            reader.read_expert(1, 63, buf)
        reader.read_expert(1, 62, buf)


def _manifest_with(store: Path, tmp_path: Path, edit) -> Path:
    bad = copy_store(store, tmp_path / "bad")
    obj = json.loads((bad / MANIFEST_NAME).read_text())
    edit(obj)
    (bad / MANIFEST_NAME).write_text(json.dumps(obj))
    return bad


def _set(path: tuple, value: object):
    def edit(obj: dict) -> None:
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(("version",), 99), "unsupported store format version 99"),
        (_set(("format",), "safetensors"), "format is 'safetensors'"),
        (_set(("experts", 3, "offset"), 1 << 40), r"experts\[3\].*outside the data file"),
        (_set(("experts", 3, "offset"), 100), r"experts\[3\]\.offset: 100 is not a multiple"),
        (_set(("experts", 3, "offset"), "0"), r"experts\[3\]\.offset: expected int, got str"),
        (_set(("experts", 3, "stored_bytes"), 1 << 30), r"experts\[3\]\.stored_bytes"),
        (_set(("experts", 3, "codec"), "zstd"), "unknown codec 'zstd'"),
        (_set(("experts", 3, "xxh64"), "xyz"), r"experts\[3\]\.xxh64"),
        (_set(("experts", 4), {"layer": 0}), r"experts\[4\]: missing field"),
        (_set(("tensors", 0, "dtype"), "float128"), "unknown dtype 'float128'"),
        (_set(("tensors", 1, "offset"), 0), "overlaps"),
        (_set(("num_experts",), 65), "entries for 2 layers x 65 experts"),
        (_set(("data_file",), "../elsewhere.bin"), "plain file name"),
        (_set(("raw_bytes",), True), "raw_bytes: expected int, got bool"),
    ],
)
def test_bad_manifest_is_refused_naming_the_field(store: Path, tmp_path: Path, edit, message: str) -> None:
    bad = _manifest_with(store, tmp_path, edit)
    with pytest.raises(StoreFormatError, match=message):
        StoreReader(bad)


def test_manifest_that_is_not_json_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath(MANIFEST_NAME).write_bytes(b"\x00not json")
    with pytest.raises(StoreFormatError, match="not valid JSON"):
        StoreReader(tmp_path)
    with pytest.raises(StoreFormatError, match="not a store"):
        StoreReader(tmp_path / "missing")


def test_corrupt_compressed_plane_sizes_never_return_data(tmp_path: Path) -> None:
    path = tmp_path / "s"
    pack_synthetic(path, codec="lz4-planes", **PRESET)

    def shift_planes(obj: dict) -> None:  # still sums to stored_bytes, so it parses
        entry = obj["experts"][2]
        entry["planes"] = [entry["planes"][0] - 16, entry["planes"][1] + 16]

    bad = _manifest_with(path, tmp_path, shift_planes)
    with StoreReader(bad) as reader, pytest.raises(CorruptExpertError, match="layer 0, expert 2"):
        reader.read_expert(0, 2, alloc_aligned(reader.manifest.slot_bytes))


def test_read_expert_tensors_views_the_layout(store: Path) -> None:
    with StoreReader(store) as reader:
        tensors = reader.read_expert_tensors(0, 0)
        raw = np.frombuffer(reference(store)[(0, 0)], dtype=np.uint8)
        for spec in reader.manifest.tensors:
            t = tensors[spec.name]
            assert tuple(t.shape) == spec.shape and str(t.dtype) == f"torch.{spec.dtype}"
            got = t.contiguous().view(-1).view(torch.uint8).numpy()
            assert np.array_equal(got, raw[spec.offset : spec.offset + spec.nbytes])
