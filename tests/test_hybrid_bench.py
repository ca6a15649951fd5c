"""bench/hybrid_tokens.py (a `make gpu-check` bench) runs end to end on the CPU stand-in, tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "hybrid_tokens.py"


@pytest.mark.slow
def test_the_hybrid_bench_runs_every_row_on_the_cpu_stand_in(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--scale", "64", "--layers", "4", "--tokens", "6",
         "--warmup", "2", "--torch-threads", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["hybrid", "copy", "n-cpu-moe", "device"]
    assert result["experts"] == 32 and result["device_slots"] == 3  # 10% of 4 layers x 8 experts
    for row in rows.values():
        assert row["tokens_per_s"] > 0
        assert row["bit_equal"], f"{row['row']} differs from the all-device ceiling: {row['max_abs_diff']}"
    assert (
        rows["hybrid"]["host_compute"]["source"] == "measured" and rows["hybrid"]["host_compute"]["gbps"] > 0
    )
    assert rows["copy"]["host_computed"] == 0 and rows["copy"]["copied"] > 0
    assert rows["n-cpu-moe"]["on_device_layers"] == 0  # 3 slots hold no whole layer of 8
    assert rows["n-cpu-moe"]["host_computed"] == 6 * 4 * 2  # every expert use, top-2 on 4 layers
    assert rows["device"]["device_hit_rate"] == 1.0 and rows["device"]["copied"] == 0
