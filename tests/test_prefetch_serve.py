"""`expertd serve` with the prefetch keys: the default configuration, warm-start state, bad values."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from daemon_util import EXPERTD, DaemonProcess, RawClient

from expertd.daemon.core.prefetch_state import learn_state, write_state
from expertd.daemon.store.manifest import load_manifest
from expertd.daemon.store.pack import pack_synthetic
from expertd.policies.base import Geometry


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=4)  # 4 layers x 8 experts
    return path


def state_file(store: Path, where: Path, model: str | None = None) -> Path:
    """Statistics the combined predictor learned from a few tokens, for the store's model."""
    where.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(store)
    geometry = Geometry(manifest.num_layers, manifest.num_experts)
    rows = [("r", layer, [layer % 8, (layer + 3) % 8]) for _ in range(10) for layer in range(4)]
    path = where / "combined.state"
    write_state(path, learn_state("combined", geometry, rows), model or manifest.model)
    return path


def test_a_daemon_starts_from_saved_predictor_statistics(store, short_dir):
    config = short_dir / "expertd.toml"
    config.write_text(f"[prefetch]\nstate = '{state_file(store, short_dir)}'\n")
    daemon = DaemonProcess(store, short_dir / "d", "--config", str(config), "--device", "cpu")
    try:
        client = RawClient(daemon.address)
        assert client.hello()["model"]
        client.close()
        assert "predictor statistics loaded" in daemon.log()
    finally:
        daemon.terminate()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[prefetch]\nstate = '{missing}'\n", "cannot read predictor state"),
        ("[prefetch]\nstate = '{other}'\n", "the statistics are for model 'someone-else'"),
        ("[prefetch]\npredictor = 'none'\nstate = '{good}'\n", "needs a predictor"),
        ("[prefetch]\nshare = 1.5\n", "prefetch share must be in [0, 1]"),
    ],
)
def test_bad_prefetch_configuration_is_a_one_line_error(store, short_dir, config, message):
    paths = {
        "missing": short_dir / "missing.state",
        "other": state_file(store, short_dir / "other", "someone-else"),
        "good": state_file(store, short_dir),
    }
    (short_dir / "expertd.toml").write_text(config.format(**paths))
    out = subprocess.run(
        [*EXPERTD, "serve", "--store", str(store), "--address", f"ipc://{short_dir / 'x.sock'}",
         "--config", str(short_dir / "expertd.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode in (1, 2) and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_an_admin_loads_statistics_into_a_running_daemon(store, short_dir):
    from expertd.daemon import protocol as proto

    state = state_file(store, short_dir)
    other = state_file(store, short_dir / "other", model="someone-else")
    config = short_dir / "expertd.toml"
    config.write_text('[auth]\nipc_admin = "token"\n')
    daemon = DaemonProcess(store, short_dir / "d", "--config", str(config), "--device", "cpu")
    token_file = Path(daemon.address[len("ipc://") :] + ".admin-token")
    load = [*EXPERTD, "load-state", "--address", daemon.address]
    try:
        stranger = RawClient(daemon.address)
        stranger.hello()
        refused = stranger.request(2, proto.LoadState(str(state)))
        assert isinstance(refused, proto.PermissionDenied), refused
        assert isinstance(stranger.request(3, proto.LoadState("combined.state")), proto.ProtocolError)
        admin = RawClient(daemon.address)
        hello = proto.Hello(proto.PROTOCOL_VERSION, "ops", "default", 0, token_file.read_text().strip())
        assert isinstance(admin.request(1, hello), dict)

        def planned_after_acquire(request_id: int, generation: int) -> int:
            reply = stranger.request(request_id, proto.Acquire(0, [0, 3], "device", generation=generation))
            assert isinstance(reply, dict), reply
            stranger.request(request_id + 1, proto.Release([reply["lease"]]))
            stats = admin.request(request_id + 2, proto.Stats())
            assert isinstance(stats, dict)
            return stats["prefetch"]["planned"]

        cold = planned_after_acquire(10, generation=1)
        wrong = subprocess.run([*load, str(other)], capture_output=True, text=True)
        assert wrong.returncode != 0 and "the statistics are for model 'someone-else'" in wrong.stderr
        loaded = subprocess.run([*load, str(state)], capture_output=True, text=True)
        assert loaded.returncode == 0, loaded.stderr
        # The statistics say layer 0's experts 0 and 3 are followed by 1 and 4: prefetched now.
        assert planned_after_acquire(20, generation=2) > cold
        assert "predictor statistics loaded" in daemon.log()
        stranger.close()
        admin.close()
    finally:
        daemon.terminate()


def test_a_prediction_aware_policy_without_a_predictor_is_warned_about(store, short_dir):
    daemon = DaemonProcess(store, short_dir / "d", "--device", "cpu", "--predictor", "none")
    try:
        assert "learns with a predictor of its own inside every acquire" in daemon.log()
    finally:
        daemon.terminate()
    lru = ("--device-policy", "lru")
    quiet = DaemonProcess(store, short_dir / "q", "--device", "cpu", "--predictor", "none", *lru)
    try:
        assert "inside every acquire" not in quiet.log()
    finally:
        quiet.terminate()
