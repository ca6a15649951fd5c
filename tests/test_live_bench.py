"""bench/live_vs_mmap.py --quick end to end: every baseline runs, its JSON last, nothing left changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_live_bench_runs_each_system_and_changes_nothing(tmp_path):
    knob = Path("/sys/block/vda/queue/read_ahead_kb")
    before = knob.read_text() if knob.exists() else None
    bench = str(REPO / "bench" / "live_vs_mmap.py")
    systems = "expertd,advised,mmap,pread,llama.cpp"
    command = [
        sys.executable,
        bench,
        "--quick",
        "--no-reference",
        "--systems",
        systems,
        "--dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=280)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["bench"] == "live_vs_mmap"
    assert summary["bounded_by_cgroup"] is False and summary["readahead_changed"] is False
    systems = {row["system"]: row for row in summary["table"]}
    assert {"expertd", "advised", "mmap", "pread"} <= set(systems)
    if "llama.cpp" not in summary["systems"]:
        assert "llama.cpp skipped" in stderr  # an absent peer is said, not silently dropped
    for name, row in systems.items():
        assert row["steady"]["median"] > 0 and row["steady"]["n"] == 1, name
    assert "vs_advised" in summary["goals"][0]
    if before is not None:
        assert knob.read_text() == before
    assert not list(Path("/sys/fs/cgroup/memory").glob(f"expertd-bench-{proc.pid}-*"))  # its own groups
