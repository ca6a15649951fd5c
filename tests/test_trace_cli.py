"""`expertd trace convert|stats|formats`: exit codes and one-line errors for bad trace files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from expertd.daemon.cli.main import main
from expertd.traces import shipped
from expertd.traces.format import MAGIC

EXPERTD = Path(sys.executable).with_name("expertd")


def granite_json(path: Path) -> Path:
    prompt = {"prompt_len": 1, "prefill": [[[0, 1], [2, 3]]], "decode": [[[1, 2], [3, 0]]]}
    doc = {"model": "g", "num_layers": 2, "num_experts": 4, "top_k": 2, "prompts": {"p": prompt}}
    path.write_text(json.dumps(doc))
    return path


def patched(path: Path, old: bytes, new: bytes) -> Path:
    """The shipped trace with one same-length header field rewritten, at `path`."""
    data = shipped().read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path


def bad_files(tmp_path: Path) -> dict[str, Path]:
    data = shipped().read_bytes()
    (tmp_path / "truncated.etrace").write_bytes(data[: len(data) // 2])
    header = msgpack.packb({"version": 1}, use_bin_type=True)
    empty = MAGIC + len(header).to_bytes(4, "little") + header
    (tmp_path / "empty.etrace").write_bytes(empty)
    return {
        "truncated in chunk 0": tmp_path / "truncated.etrace",
        "format version 7 is not supported (this expertd reads 1)": patched(
            tmp_path / "version.etrace", b"\xa7version\x01", b"\xa7version\x07"
        ),
        "out of range [0, 16) at row": patched(
            tmp_path / "ids.etrace", b"\xabnum_experts\x20", b"\xabnum_experts\x10"
        ),
        "bad header: missing field": tmp_path / "empty.etrace",
    }


def test_convert_then_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = granite_json(tmp_path / "g.json")
    out = tmp_path / "g.etrace"
    assert main(["trace", "convert", "--format", "granite-json", str(src), "-o", str(out),
                 "--model", "granite-test", "--license", "MIT"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith(f"wrote {out}: 4 rows, 2 tokens, 1 requests")
    assert main(["trace", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["model"], stats["license"], stats["tokens"]) == ("granite-test", "MIT", 2)
    assert main(["trace", "stats", str(out)]) == 0
    assert "temporal reuse" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["granite", "granite-3.0-1b-a400m"])
def test_stats_takes_the_trace_names_replay_takes(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "stats", str(shipped()), "--json"]) == 0
    by_path = json.loads(capsys.readouterr().out)
    assert main(["trace", "stats", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_path
    assert by_path["model"].startswith("ibm-granite/granite-3.0-1b-a400m")


def test_formats_lists_every_converter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "formats"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [
        "granite-json", "mixtral-jsonl", "moe-beyond-csv", "sglang-json", "sglang-routed-experts",
        "vllm-routed-experts",
    ]  # fmt: skip


def test_bad_trace_files_give_one_line_errors_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for problem, path in bad_files(tmp_path).items():
        assert main(["trace", "stats", str(path)]) == 2, problem
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err, err
        assert err.startswith(f"expertd trace: error: {path}: ")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (
            ["trace", "stats", "missing.etrace"],
            "missing.etrace: no such file, and no shipped trace of that name",
        ),
        (["trace", "convert", "-f", "nope", ".", "-o", "x.etrace"], "unknown trace format 'nope'"),
        (["trace", "convert", "-f", "granite-json", "missing", "-o", "x"], "missing: no such file"),
    ],
)
def test_user_errors_exit_2(argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert problem in capsys.readouterr().err


def test_bad_source_leaves_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "g.json").write_text('{"prompts": {}, "num_layers": 2}')
    out = tmp_path / "x.etrace"
    assert main(["trace", "convert", "-f", "granite-json", str(tmp_path / "g.json"),
                 "-o", str(out)]) == 2  # fmt: skip
    assert "'num_experts' must be an integer" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]


def test_console_script_exit_code_and_stderr(tmp_path: Path) -> None:
    data = shipped().read_bytes()
    (tmp_path / "t.etrace").write_bytes(data[:1000])
    done = subprocess.run(
        [str(EXPERTD), "trace", "stats", str(tmp_path / "t.etrace")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == f"expertd trace: error: {tmp_path / 't.etrace'}: truncated in chunk 0\n"
    assert done.stdout == ""
