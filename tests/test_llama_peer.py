"""bench/llama_peer.py: the GGUF's router replays the trace, at the store's expert shapes (needs `gguf`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertd.daemon.cli.replay_cli import load_for_replay
from expertd.daemon.store.manifest import load_manifest
from expertd.daemon.store.pack import pack_synthetic
from expertd.traces.replay import forward_ids

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[1]
TOKENS = 6


def load_peer():
    spec = importlib.util.spec_from_file_location("llama_peer", REPO / "bench" / "llama_peer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-peer")
    store = root / "granite"
    pack_synthetic(store, "granite-3.0-1b-a400m", scale=16)
    return store, load_peer().ensure_gguf(store, "granite", TOKENS)


def test_gguf_router_picks_exactly_the_traced_experts(model):
    store, path = model
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    trace = load_for_replay("granite", "all", TOKENS)
    embed = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32)  # [V, D]
    forwards = forward_ids(trace)
    for f, layer, chosen in zip(forwards.tolist(), trace.layer.tolist(), trace.experts.tolist(), strict=True):
        gates = np.asarray(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data, dtype=np.float32)  # [E, D]
        logits = gates @ embed[3 + f]  # the normalised input is the token's spike alone
        top = np.argsort(-logits, kind="stable")[: trace.meta.top_k]
        assert sorted(top.tolist()) == sorted(chosen), (f, layer)
    manifest = load_manifest(store)
    ffn, hidden = manifest.tensors[0].shape
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert [int(n) for n in gate.shape] == [hidden, ffn, trace.meta.num_experts]  # ggml order
    assert gate.n_bytes // trace.meta.num_experts == ffn * hidden * 2  # f16: the store's bytes per matrix


def test_llama_cpp_runs_the_bench_protocol_where_it_builds(model):
    if load_peer().available():
        pytest.skip(f"llama.cpp is not available here: {load_peer().available()}")
    _, path = model
    command = [
        sys.executable,
        str(REPO / "bench" / "llama_peer.py"),
        "run",
        str(path),
        "granite",
        str(TOKENS),
    ]
    proc = subprocess.run(
        [*command, "2", "0", "1"], input="go\n", capture_output=True, text=True, timeout=240, check=True
    )
    ready, line = proc.stdout.strip().splitlines()[-2:]
    result = json.loads(line)
    assert ready == "ready" and result["tokens"] == TOKENS and result["steady_tokens_per_s"] > 0
