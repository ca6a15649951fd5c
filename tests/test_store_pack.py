"""`expertd pack`: every supported checkpoint naming round-trips bit for bit; packs are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import store_checkpoints as ckpt
import torch
from safetensors.torch import save_file

from expertd.daemon.store import pack as pack_module
from expertd.daemon.store.manifest import CheckpointError, StoreError, load_manifest
from expertd.daemon.store.pack import SYNTHETIC_PRESETS, pack_safetensors, pack_synthetic
from expertd.daemon.store.reader import StoreReader


def assert_store_matches(store: Path, expected: ckpt.Experts) -> None:
    with StoreReader(store) as reader:
        m = reader.manifest
        assert {(e.layer, e.expert) for e in m.experts} == set(expected)
        for (layer, expert), tensors in expected.items():
            got = reader.read_expert_tensors(layer, expert)
            assert set(got) == set(tensors)
            for name, want in tensors.items():
                assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
                assert torch.equal(got[name].view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.parametrize("codec", ["none", "lz4-planes"])
@pytest.mark.parametrize("naming", sorted(ckpt.BUILDERS))
def test_checkpoint_round_trips_bit_for_bit(tmp_path: Path, naming: str, codec: str) -> None:
    expected = ckpt.BUILDERS[naming](tmp_path / "ckpt")
    manifest = pack_safetensors(tmp_path / "ckpt", tmp_path / "store", codec=codec)
    if codec == "lz4-planes":  # normal bf16 weights: the high-byte plane compresses
        assert any(e.codec == "lz4-planes" for e in manifest.experts)
    assert_store_matches(tmp_path / "store", expected)


@pytest.mark.parametrize(
    ("naming", "detected", "layers", "experts"),
    [
        ("mixtral", "mixtral", (0, 1), 4),
        ("qwen-moe", "experts", (0, 1), 6),
        ("deepseek", "experts", (1, 2), 4),
        ("llama4-fused", "fused", (0, 1), 4),
        ("gpt-oss-fused", "fused", (0, 1), 4),
    ],
)
def test_naming_and_layer_mapping_are_recorded(
    tmp_path: Path, naming: str, detected: str, layers: tuple[int, ...], experts: int
) -> None:
    ckpt.BUILDERS[naming](tmp_path / "ckpt")
    m = pack_safetensors(tmp_path / "ckpt", tmp_path / "store")
    assert m.naming == detected
    assert m.checkpoint_layers == layers
    assert m.num_experts == experts


def test_deepseek_dense_layer_shared_experts_and_mtp_layer_are_not_packed(tmp_path: Path) -> None:
    ckpt.deepseek(tmp_path / "ckpt")
    m = pack_safetensors(tmp_path / "ckpt", tmp_path / "store")
    assert [t.name for t in m.tensors] == ["gate_proj", "up_proj", "down_proj"]
    assert m.num_layers == 2  # checkpoint layers 1 and 2; layer 0 is dense, 3 is MTP
    assert m.source["skipped_layers"] == [3]
    assert m.architecture == "deepseek_v2"


def _single_file(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    return directory


def _mixtral_tensors(experts: int = 2, ffn: int = 8) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.zeros(
            (ffn, 4) if w != "w2" else (4, ffn), dtype=torch.bfloat16
        )
        for e in range(experts)
        for w in ("w1", "w2", "w3")
    }


def test_missing_expert_tensor_is_named(tmp_path: Path) -> None:
    tensors = _mixtral_tensors()
    del tensors["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    src = _single_file(tmp_path / "ckpt", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.block_sparse_moe\.experts\.1\.w3"):
        pack_safetensors(src, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_misshaped_expert_tensor_is_named_with_its_file(tmp_path: Path) -> None:
    tensors = _mixtral_tensors()
    tensors["model.layers.0.block_sparse_moe.experts.1.w1.weight"] = torch.zeros(7, 4, dtype=torch.bfloat16)
    src = _single_file(tmp_path / "ckpt", tensors)
    with pytest.raises(CheckpointError, match=r"experts\.1\.w1\.weight in model\.safetensors.*\[7, 4\]"):
        pack_safetensors(src, tmp_path / "store")


def test_fused_tensor_with_wrong_expert_dimension_is_named(tmp_path: Path) -> None:
    src = _single_file(
        tmp_path / "ckpt",
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 8, 6, dtype=torch.bfloat16),
            "model.layers.0.mlp.experts.down_proj": torch.zeros(3, 3, 8, dtype=torch.bfloat16),
        },
    )
    with pytest.raises(CheckpointError, match=r"experts\.down_proj in model\.safetensors"):
        pack_safetensors(src, tmp_path / "store")


def test_shard_missing_from_index_is_named(tmp_path: Path) -> None:
    ckpt.mixtral(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        pack_safetensors(tmp_path / "ckpt", tmp_path / "store")


def test_checkpoint_without_experts_lists_what_it_found(tmp_path: Path) -> None:
    src = _single_file(
        tmp_path / "ckpt",
        {
            "model.layers.0.moe.expert_0.fc1.weight": torch.zeros(2, 2),
            "model.embed_tokens.weight": torch.zeros(2, 2),
        },
    )
    with pytest.raises(CheckpointError, match=r"no routed expert tensors.*moe\.expert_0\.fc1"):
        pack_safetensors(src, tmp_path / "store")


def test_synthetic_store_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    a = pack_synthetic(tmp_path / "a", "olmoe-1b-7b", scale=32, layers=2, seed=7)
    b = pack_synthetic(tmp_path / "b", "olmoe-1b-7b", scale=32, layers=2, seed=7)
    c = pack_synthetic(tmp_path / "c", "olmoe-1b-7b", scale=32, layers=2, seed=8)
    assert [e.xxh64 for e in a.experts] == [e.xxh64 for e in b.experts]
    assert len({e.xxh64 for e in a.experts}) == len(a.experts)  # every expert differs
    assert not {e.xxh64 for e in a.experts} & {e.xxh64 for e in c.experts}
    with StoreReader(tmp_path / "a") as reader:
        w = reader.read_expert_tensors(1, 3)["gate_proj"].float()
    assert w.shape == (32, 64) and 0.015 < float(w.std()) < 0.025 and abs(float(w.mean())) < 0.003


@pytest.mark.parametrize("preset", sorted(SYNTHETIC_PRESETS))
def test_synthetic_presets_have_the_real_expert_shapes(tmp_path: Path, preset: str) -> None:
    spec = SYNTHETIC_PRESETS[preset]
    m = pack_synthetic(tmp_path / preset, preset, scale=64, layers=1)
    shapes = {t.name: t.shape for t in m.tensors}
    hidden, ffn = round(spec.hidden / 64), round(spec.ffn / 64)
    down = "w2" if spec.naming == "mixtral" else "down_proj"
    assert shapes[down] == (hidden, ffn)
    assert m.num_experts == spec.num_experts
    assert m.checkpoint_layers == (spec.first_moe_layer,)


def test_synthetic_layers_beyond_the_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="1..16"):
        pack_synthetic(tmp_path / "s", "olmoe-1b-7b", scale=64, layers=17)


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_pack_leaves_no_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    calls = 0
    real_fill = pack_module.SyntheticFiller.__call__

    def failing_fill(self: pack_module.SyntheticFiller, layer: int, expert: int, raw) -> None:
        nonlocal calls
        calls += 1
        if calls == 20:
            raise exc
        real_fill(self, layer, expert, raw)

    monkeypatch.setattr(pack_module.SyntheticFiller, "__call__", failing_fill)
    with pytest.raises(type(exc)):
        pack_synthetic(tmp_path / "store", "olmoe-1b-7b", scale=64, layers=2)
    assert calls >= 20
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary directory


def test_failed_forced_repack_keeps_the_old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = pack_synthetic(tmp_path / "store", "olmoe-1b-7b", scale=64, layers=1)
    monkeypatch.setattr(pack_module.StoreWriter, "commit", _raise)
    with pytest.raises(RuntimeError):
        pack_synthetic(tmp_path / "store", "olmoe-1b-7b", scale=64, layers=1, seed=5, force=True)
    assert load_manifest(tmp_path / "store") == old
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def _raise(*args: object, **kwargs: object) -> None:
    raise RuntimeError("interrupted at commit")


def test_existing_destination_is_refused_without_force(tmp_path: Path) -> None:
    first = pack_synthetic(tmp_path / "store", "olmoe-1b-7b", scale=64, layers=1)
    with pytest.raises(StoreError, match="already exists.*--force"):
        pack_synthetic(tmp_path / "store", "olmoe-1b-7b", scale=64, layers=1, seed=1)
    assert load_manifest(tmp_path / "store") == first
    second = pack_synthetic(tmp_path / "store", "olmoe-1b-7b", scale=64, layers=1, seed=1, force=True)
    assert load_manifest(tmp_path / "store") == second != first
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_manifest_is_human_readable_json(tmp_path: Path) -> None:
    pack_synthetic(tmp_path / "s", "mixtral-8x7b", scale=256, layers=1)
    obj = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert obj["format"] == "expertd-store" and obj["version"] == 1
    assert [t["name"] for t in obj["tensors"]] == ["w1", "w3", "w2"]
    assert obj["experts"][0]["offset"] == 0 and obj["experts"][1]["offset"] % 4096 == 0
    assert np.all([len(e["xxh64"]) == 16 for e in obj["experts"]])
