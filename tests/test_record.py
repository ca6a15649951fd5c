"""expertd.traces.record: a model's routing into an .etrace, and replay predicting the live daemon."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="5.0", reason="needs expertd[hf] (transformers>=5)"
)

from daemon_util import DaemonProcess  # noqa: E402

from expertd.client import ExpertClient  # noqa: E402
from expertd.client.hf import offload  # noqa: E402
from expertd.client.hf_tiny import byte_prompt, tiny_model  # noqa: E402
from expertd.daemon.store.pack_hf import pack_hf  # noqa: E402
from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, read_trace  # noqa: E402
from expertd.traces.record import record  # noqa: E402
from expertd.traces.replay import replay_timed  # noqa: E402
from expertd.traces.timing import TimingModel  # noqa: E402


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="exd-rec-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_forward_pass_is_recorded_as_the_routers_chose(workdir):
    model = tiny_model("qwen3_moe")
    ids = byte_prompt("routing, token by token")
    with torch.no_grad(), record(model, workdir / "one.etrace") as recorder:
        out = model(ids, output_router_logits=True)
    trace = read_trace(recorder.path)
    tokens, layers, top_k = ids.shape[1], 4, model.config.num_experts_per_tok
    assert len(trace) == tokens * layers and trace.meta.top_k == top_k and trace.meta.num_layers == layers
    assert trace.meta.extra["checkpoint_layers"] == [0, 1, 2, 3]
    for layer, logits in enumerate(out.router_logits):  # [T, E] each
        probs, chosen = torch.softmax(logits.float(), -1).topk(top_k, dim=-1)  # highest first
        rows = trace.layer == layer
        assert np.array_equal(trace.experts[rows], chosen.numpy())
        assert np.allclose(trace.scores[rows], probs.numpy())
    assert np.array_equal(trace.token, np.repeat(np.arange(tokens), layers))
    assert (trace.phase == PHASE_PREFILL).all()


def test_generations_are_requests_with_prefill_then_decode_and_no_padding(workdir):
    model = tiny_model("olmoe")
    batch = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad(), record(model, workdir / "gen.etrace") as recorder:
        recorder.name_next("short", "long")
        model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        model.generate(byte_prompt("hi"), max_new_tokens=3, do_sample=False)
    trace = read_trace(recorder.path)
    assert trace.meta.requests == ["short", "long", "request-2"]
    layers = trace.meta.num_layers
    for request, (prompt, generated) in enumerate([(3, 3), (5, 3), (2, 2)]):  # the last new token is not run
        rows = trace.request == request
        assert np.array_equal(np.unique(trace.token[rows]), np.arange(prompt + generated))
        assert np.bincount(trace.phase[rows], minlength=2).tolist() == [prompt * layers, generated * layers]
        assert (trace.phase[rows][trace.token[rows] >= prompt] == PHASE_DECODE).all()


@pytest.mark.parametrize("policy", ["lru", "layer-distance"])
def test_replaying_a_recorded_generation_predicts_the_daemons_hits(policy, workdir):
    """Offloaded and recorded at once; the simulator, given the trace, counts the daemon's hits.

    A one-token prompt: every pass is then one token, the unit replay counts by (a prefill
    pass acquires each layer's experts once for all its tokens).
    """
    model_dir, store = workdir / f"model-{policy}", workdir / f"store-{policy}"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    manifest = pack_hf(model_dir, store)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, slots = manifest.num_layers * manifest.num_experts, 24
    run_dir = Path(tempfile.mkdtemp(prefix="d-", dir=workdir))
    # One store read at a time, as the timing model's link: with parallel reads, the order in
    # which one acquire's misses land in the device tier (so LRU's order) varies run to run.
    daemon = DaemonProcess(
        store, run_dir, "--host-size", f"{total} slots", "--device", "cpu", "--device-size", f"{slots} slots",
        "--device-policy", policy, "--load-threads", "1", "--log-level", "warning",
        "--predictor", "none",  # demand loads only, as the replay below
    )  # fmt: skip
    try:
        with ExpertClient(daemon.address) as client:
            offload(model, client)
            with torch.no_grad(), record(model, workdir / f"live-{policy}.etrace") as recorder:
                for text in ("a", "b"):
                    model.generate(byte_prompt(text), max_new_tokens=30, do_sample=False)
            live = client.stats()["tiers"]["device"]
    finally:
        daemon.kill()
    trace = read_trace(recorder.path)
    assert trace.meta.extra["expert_bytes"] == manifest.raw_bytes
    assert trace.num_tokens() == 2 * 30 and live["accesses"] == len(trace) * trace.meta.top_k
    timing = TimingModel(
        expert_bytes=json.loads((store / "manifest.json").read_text())["raw_bytes"],
        h2d_gbps=10.0, nvme_gbps=1.0, layer_s=0.0, host_slots=total,
    )  # fmt: skip
    predicted = replay_timed(trace, policy, slots, timing)
    assert 0 < live["hits"] < live["accesses"]
    assert (predicted.hits, predicted.accesses) == (live["hits"], live["accesses"])
