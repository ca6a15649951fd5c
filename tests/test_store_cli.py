"""`expertd pack`, `expertd store info` and `expertd store verify` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import store_checkpoints as ckpt

from expertd.daemon.cli.main import main
from expertd.daemon.cli.store_cli import PRESET_NAMES
from expertd.daemon.store.manifest import load_manifest
from expertd.daemon.store.pack import SYNTHETIC_PRESETS

SMALL = ["--synthetic", "olmoe-1b-7b", "--scale", "32", "--layers", "2", "--quiet"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_pack_info_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s")
    code, out, _ = run(["pack", *SMALL, "--codec", "lz4-planes", store], capsys)
    assert code == 0 and "2 layers x 64 experts" in out
    code, out, _ = run(["store", "info", store], capsys)
    assert code == 0
    assert "2 MoE layers x 64 experts" in out and "lz4-planes x128" in out and "ratio 1.1" in out
    assert "gate_proj" in out and "down_proj" in out
    code, out, _ = run(["store", "verify", "--quiet", store], capsys)
    assert code == 0 and out.startswith("ok: 128 experts verified")


def test_help_lists_every_synthetic_preset() -> None:
    assert set(PRESET_NAMES) == set(SYNTHETIC_PRESETS)


def test_pack_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, out, err = run(["pack", *SMALL[:-1], str(tmp_path / "s")], capsys)
    assert code == 0 and "experts 128/128" in err and "128/128" not in out


def test_verify_names_each_corrupt_expert_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s"
    run(["pack", *SMALL, str(store)], capsys)
    m = load_manifest(store)
    with open(store / "experts.bin", "r+b") as f:
        for layer, expert in [(0, 9), (1, 40)]:
            f.seek(m.entry(layer, expert).offset + 100)
            f.write(b"\xff\x00\xff")
    code, out, _ = run(["store", "verify", "--quiet", str(store)], capsys)
    assert code == 1
    lines = out.splitlines()
    assert "expert (layer 0, expert 9) is corrupt" in lines[0]
    assert "expert (layer 1, expert 40) is corrupt" in lines[1]
    assert lines[-1].startswith("FAILED: 2 of 128 experts corrupt")


def test_verify_reports_experts_past_the_end_of_a_truncated_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s"
    run(["pack", *SMALL, str(store)], capsys)
    m = load_manifest(store)
    with open(store / "experts.bin", "r+b") as f:
        f.truncate(m.entry(1, 62).offset + 10)
    code, out, _ = run(["store", "verify", "--quiet", str(store)], capsys)
    assert code == 1
    assert "layer 1, expert 62" in out and "layer 1, expert 63" in out and "2 of 128" in out


@pytest.mark.parametrize("extra_bytes", [-4096, 4096])
def test_info_fails_on_a_data_file_of_the_wrong_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra_bytes: int
) -> None:
    store = tmp_path / "s"
    run(["pack", *SMALL, str(store)], capsys)
    code, out, _ = run(["store", "info", str(store)], capsys)
    assert code == 0 and "FAILED" not in out
    data_bytes = load_manifest(store).data_bytes
    with open(store / "experts.bin", "r+b") as f:
        f.truncate(data_bytes + extra_bytes)
    code, out, _ = run(["store", "info", str(store)], capsys)
    assert code == 1
    size = data_bytes + extra_bytes
    if extra_bytes < 0:
        said = f"is truncated: {size} of the manifest's {data_bytes} bytes"
    else:
        said = f"has {size} bytes, the manifest says {data_bytes}: not the file it was packed with"
    assert out.splitlines()[-1] == f"FAILED: {store / 'experts.bin'} {said}"


def test_pack_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s")
    run(["pack", *SMALL, store], capsys)
    before = load_manifest(store)
    code, _, err = run(["pack", *SMALL, "--seed", "3", store], capsys)
    assert code == 2 and "already exists (use --force" in err and err.count("\n") == 1
    assert load_manifest(store) == before
    code, _, _ = run(["pack", *SMALL, "--seed", "3", "--force", store], capsys)
    assert code == 0 and load_manifest(store) != before


def test_pack_from_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt.deepseek(tmp_path / "ckpt")
    code, out, _ = run(
        ["pack", "--quiet", "--from-safetensors", str(tmp_path / "ckpt"), str(tmp_path / "s")],
        capsys,
    )
    assert code == 0 and "2 layers x 4 experts" in out
    code, out, _ = run(["store", "info", str(tmp_path / "s")], capsys)
    assert "checkpoint layers 1..2" in out and "deepseek_v2" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pack", "--synthetic", "gpt-5", "OUT"], "unknown preset 'gpt-5' (known: mixtral-8x7b"),
        (["pack", "--from-safetensors", "CKPT", "--scale", "2", "OUT"], "--scale only apply"),
        (["pack", "--from-safetensors", "CKPT", "OUT"], "no *.safetensors files"),
        (["pack", "--synthetic", "olmoe-1b-7b", "--layers", "99", "OUT"], "1..16"),
        (["pack", "--synthetic", "olmoe-1b-7b", "--lz4-level", "13", "OUT"], "lz4 level"),
        (["store", "info", "OUT"], "not a store"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "CKPT").mkdir()
    args = [str(tmp_path / a) if a in ("OUT", "CKPT") else a for a in args]
    code, _, err = run(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "OUT").exists()


def test_info_refuses_a_manifest_of_an_unknown_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s"
    run(["pack", *SMALL, str(store)], capsys)
    obj = json.loads((store / "manifest.json").read_text())
    obj["version"] = 2
    (store / "manifest.json").write_text(json.dumps(obj))
    for command in (["store", "info"], ["store", "verify"]):
        code, _, err = run([*command, str(store)], capsys)
        assert code == 2 and "unsupported store format version 2" in err
