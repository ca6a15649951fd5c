"""The vLLM plugin's parts that need no vLLM: the switch, the store check, chunks, renumbering.

The plugin inside a real vLLM is tests/test_vllm.py (`make test-vllm`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from daemon_util import DaemonProcess

from expertd.client import ExpertClient
from expertd.client.hf_tiny import tiny_model
from expertd.client.vllm_plugin import (
    VllmLayoutError,
    chunks_of,
    enabled_address,
    hint_scores,
    renumber,
    store_layer,
)
from expertd.daemon.store.pack_hf import pack_hf


def test_the_switch_is_off_unless_set() -> None:
    assert enabled_address({}) is None
    assert enabled_address({"EXPERTD_VLLM": ""}) is None
    assert enabled_address({"EXPERTD_VLLM": "0"}) is None
    assert enabled_address({"EXPERTD_VLLM": "1"}) == ""  # the default address
    assert enabled_address({"EXPERTD_VLLM": "ipc:///run/expertd/s"}) == "ipc:///run/expertd/s"
    with pytest.raises(ValueError, match="EXPERTD_VLLM='yes': expected 1, 0, or an ipc:// or tcp:// address"):
        enabled_address({"EXPERTD_VLLM": "yes"})


def test_with_the_switch_off_register_imports_nothing_of_vllm() -> None:
    """vLLM calls every installed plugin; off, ours must not even import vLLM."""
    code = (
        "import sys; from expertd.client.vllm_plugin import register; register(); "
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))"
    )
    env = {"PATH": "/usr/bin:/bin", "EXPERTD_VLLM": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def daemon():
    """A daemon serving a tiny Qwen3-MoE: 4 layers x 32 experts, gate_up [64, 64] float32."""
    pytest.importorskip("transformers", minversion="5.0", reason="needs expertd[hf] to make the model")
    base = Path(tempfile.mkdtemp(prefix="exd-vp-", dir="/tmp"))  # short: ipc:// paths
    tiny_model("qwen3_moe", layers=4).save_pretrained(base / "model")
    pack_hf(base / "model", base / "store")
    proc = DaemonProcess(base / "store", base / "run", "--host-size", "128 slots", "--log-level", "warning")
    yield proc
    proc.kill()
    shutil.rmtree(base, ignore_errors=True)


def test_the_store_check_names_what_does_not_match(daemon) -> None:
    good = {"gate_up": (64, 64), "dtype": torch.float32}
    with ExpertClient(daemon.address) as client:
        layer = store_layer(client, "model.layers.2.mlp.experts", good)
        assert (layer.index, layer.decoder_layer) == (2, 2)
        with pytest.raises(VllmLayoutError, match="decoder layer 9 is not in the daemon's store"):
            store_layer(client, "model.layers.9.mlp.experts", good)
        with pytest.raises(VllmLayoutError, match="no 'layers.N.' in the name"):
            store_layer(client, "experts", good)
        with pytest.raises(VllmLayoutError, match=r"vLLM's layer wants \[\d+, \d+\] torch.float32"):
            store_layer(client, "model.layers.0.mlp.experts", {"gate_up": (128, 64), "dtype": torch.float32})
        with pytest.raises(
            VllmLayoutError, match="torch.bfloat16 \\(another model, or packed in another dtype"
        ):
            store_layer(client, "model.layers.0.mlp.experts", {"gate_up": (64, 64), "dtype": torch.bfloat16})


def test_chunks_are_one_acquire_when_they_fit_and_ascending_halves_when_not() -> None:
    assert chunks_of([5, 1, 3], limit=4, chunk=2) == [[5, 1, 3]]
    assert chunks_of([5, 1, 3, 9, 0], limit=4, chunk=2) == [[0, 1], [3, 5], [9]]


def test_renumber_points_each_pair_into_the_chunk_and_zeroes_the_rest() -> None:
    ids = torch.tensor([[4, 1], [7, 4]], dtype=torch.int32)
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    local, w = renumber(ids, weights, [1, 4, 7], num_experts=8)
    assert local.tolist() == [[1, 0], [2, 1]] and local.dtype == torch.int32
    assert w is weights  # every pair here: untouched
    local, w = renumber(ids, weights, [4], num_experts=8)
    assert local.tolist() == [[0, 0], [0, 0]]
    assert torch.equal(w, torch.tensor([[0.6, 0.0], [0.0, 0.1]]))


def test_hint_scores_rank_experts_by_summed_top_k_weight() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -9.0], [0.0, 4.0, 5.0, -9.0], [0.0, 1.0, 6.0, -9.0]])
    experts, scores = hint_scores(logits, top_k=1)
    assert experts == [2, 1]  # 2 tops two tokens, 1 one; 0 and 3 top none
    assert scores[0] > scores[1] > 0
