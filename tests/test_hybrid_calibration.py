"""Host compute calibration at start: configured, measured or off; shown by status, metrics and the hello."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from daemon_util import DaemonProcess

from expertd.client import ExpertClient
from expertd.daemon.protocol import TensorSpec
from expertd.daemon.service.calibration import calibrate, compute_threads, expert_shape
from expertd.daemon.service.config import ServeConfig
from expertd.daemon.store.pack import pack_synthetic


def config(**placement) -> ServeConfig:
    return ServeConfig.from_mapping({"server": {"store": "/s"}, "placement": placement})


def manifest(*shapes: tuple[int, int], dtype: str = "bfloat16") -> SimpleNamespace:
    tensors = tuple(TensorSpec(f"t{i}", dtype, shape, 0) for i, shape in enumerate(shapes))
    return SimpleNamespace(tensors=tensors, dtype=dtype)


def test_expert_shape_is_read_from_any_swiglu_layout() -> None:
    assert expert_shape(manifest((14336, 4096), (14336, 4096), (4096, 14336)).tensors) == (4096, 14336)
    assert expert_shape(manifest((1408, 2048), (1408, 2048), (2048, 1408)).tensors) == (2048, 1408)
    assert expert_shape(manifest((2048, 1536), (768, 2048)).tensors) == (2048, 768)  # fused gate_up [D, 2F]
    with pytest.raises(ValueError, match="no 2-D tensor"):
        expert_shape(manifest().tensors)


def test_threads_leave_the_readers_their_cores(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert compute_threads(config()) == 16 - 4 - 1  # load_threads 4, one for the device
    assert compute_threads(config(threads=3)) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert compute_threads(config()) == 1


def test_the_figure_is_configured_measured_or_off() -> None:
    shape = manifest((224, 64), (224, 64), (64, 224))
    asked = []

    def measure(hidden, ffn, **kw):
        asked.append((hidden, ffn, kw["dtype"], kw["passes"], kw["working_set_bytes"]))
        return SimpleNamespace(gbps=12.5)

    assert calibrate(config(host_gbps=7.5), shape, device="cuda", measure=measure).source == "config"
    off = calibrate(config(), shape, device="cpu", measure=measure)  # auto: only with cuda
    assert (off.gbps, off.source) == (0.0, "off") and not asked
    measured = calibrate(config(calibrate="on", calibrate_passes=3), shape, device="cpu", measure=measure)
    assert (measured.gbps, measured.source) == (12.5, "measured")
    assert asked == [(64, 224, "bfloat16", 3, 64 << 20)]
    assert calibrate(config(), shape, device="cuda", measure=measure).source == "measured"


@pytest.mark.parametrize(
    "bad", [RuntimeError("no torch"), SimpleNamespace(gbps=float("nan")), SimpleNamespace(gbps=0)]
)
def test_a_failed_calibration_serves_without_host_placement(bad) -> None:
    def measure(*args, **kw):
        if isinstance(bad, Exception):
            raise bad
        return bad

    result = calibrate(config(calibrate="on"), manifest((8, 4), (4, 8)), device="cpu", measure=measure)
    assert (result.gbps, result.source) == (0.0, "failed")


@pytest.mark.slow
def test_a_daemon_measures_at_start_and_says_so(tmp_path: Path, short_dir: Path) -> None:
    store = tmp_path / "store"
    pack_synthetic(store, "mixtral-8x7b", scale=64, layers=2)
    conf = tmp_path / "expertd.toml"
    conf.write_text('[placement]\ncalibrate = "on"\ncalibrate_passes = 3\ncalibrate_mib = 8\nthreads = 1\n')
    daemon = DaemonProcess(
        store, short_dir, "--config", str(conf), "--device", "cpu", "--device-size", "4 slots"
    )
    try:
        with ExpertClient(daemon.address) as client:
            host = client.hello.host_compute
            assert host["source"] == "measured" and host["gbps"] > 0 and host["threads"] == 1
            stats = client.stats()
        assert stats["host_compute"]["gbps"] == host["gbps"] and stats["host_compute"]["seconds"] > 0
        status = subprocess.run(
            [sys.executable, "-m", "expertd.daemon", "status", "--address", daemon.address],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert f"host compute {host['gbps']:.1f} GB/s (measured in " in status
        assert "host compute:" in daemon.log() and "1 thread(s)" in daemon.log()
    finally:
        daemon.kill()


def test_metrics_export_the_host_figure_and_placements() -> None:
    from expertd.daemon.service.metrics import families

    stats = {"host_compute": {"gbps": 9.5, "threads": 3}, "placed": {"device": 4, "host": 7, "background": 1}}
    found = {f.name: f for f in families(stats)}
    assert found["expertd_host_compute_gbps"].samples[0].value == 9.5
    assert found["expertd_host_compute_threads"].samples[0].value == 3
    placed = {s.labels["placement"]: s.value for s in found["expertd_auto_placed"].samples}
    assert placed == {"device": 4, "host": 7, "background": 1}


def test_with_host_placement_the_default_prefetch_share_takes_the_whole_link() -> None:
    from expertd.daemon.core.defaults import HYBRID_PREFETCH, PREFETCH
    from expertd.daemon.service.startup import prefetch_settings

    base = ServeConfig.from_mapping({"server": {"store": "/s"}})
    assert prefetch_settings(base).share == PREFETCH["share"]
    assert prefetch_settings(base, hybrid=True).share == HYBRID_PREFETCH["share"] == 1.0
    chosen = ServeConfig.from_mapping({"server": {"store": "/s"}, "prefetch": {"share": 0.5}})
    assert prefetch_settings(chosen, hybrid=True).share == 0.5  # a share someone chose stands
