"""expertd.client.hf: transformers MoE models through a real daemon, bit for bit (no downloads)."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="5.0", reason="needs expertd[hf] (transformers>=5)"
)

from daemon_util import EXPERTD, DaemonProcess  # noqa: E402

from expertd.client import ExpertClient  # noqa: E402
from expertd.client.hf import ModelLayoutError, offload  # noqa: E402
from expertd.client.hf_layers import find_moe_layers  # noqa: E402
from expertd.client.hf_tiny import TINY, byte_prompt, tiny_model  # noqa: E402
from expertd.daemon.store.manifest import CheckpointError  # noqa: E402
from expertd.daemon.store.pack_hf import pack_hf  # noqa: E402

PROMPT = "The cache holds a quarter"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="exd-hf-", dir="/tmp"))  # short: ipc:// paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoints(workdir):
    """(name, dtype) -> (model dir, store dir): each tiny model saved and packed once."""
    made: dict[tuple[str, torch.dtype], tuple[Path, Path]] = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
        if (name, dtype) not in made:
            base = workdir / f"{name}-{str(dtype)[6:]}"
            tiny_model(name, dtype=dtype).save_pretrained(base / "model")
            pack_hf(base / "model", base / "store")
            made[name, dtype] = (base / "model", base / "store")
        return made[name, dtype]

    return get


def serve(store: Path, workdir: Path, device_slots: int, device: str = "cpu") -> DaemonProcess:
    """A daemon whose host tier holds every expert and whose device tier (CPU stand-in) few."""
    manifest = json.loads((store / "manifest.json").read_text())
    total = manifest["num_layers"] * manifest["num_experts"]
    run = Path(tempfile.mkdtemp(prefix="d-", dir=workdir))
    flags = ["--host-size", f"{total} slots", "--device", device, "--device-size", f"{device_slots} slots"]
    return DaemonProcess(store, run, *flags, "--log-level", "warning")


def load(model_dir: Path, dtype: torch.dtype, implementation: str | None = None):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, experts_implementation=implementation
    )
    return model.eval()


def expert_tensors(model) -> list[torch.Tensor]:
    return [t for x in find_moe_layers(model) for t in (x.experts.gate_up_proj, x.experts.down_proj)]


def generate(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.mark.parametrize("name", list(TINY))
def test_offloaded_model_equals_the_model_bit_for_bit(name, checkpoints, workdir):
    """The model's own router, the daemon's weights: logits and greedy tokens are the model's."""
    model_dir, store = checkpoints(name)
    reference, model = load(model_dir, torch.float32), load(model_dir, torch.float32)
    ids = byte_prompt(PROMPT)
    padded = torch.tensor([[0, 0, 0, *ids[0, :6].tolist()], ids[0, :9].tolist()])
    mask = (torch.arange(9) >= torch.tensor([[3], [0]])).long()
    with torch.no_grad():
        want_logits = reference(ids).logits
        want_tokens = generate(reference, ids)
        want_batch = generate(reference, padded, attention_mask=mask)
    experts = expert_tensors(model)
    total = sum(1 for x in find_moe_layers(model)) * find_moe_layers(model)[0].num_experts
    gone = [weakref.ref(t) for t in experts]
    params_before = sum(p.numel() for p in model.parameters())
    expert_params = sum(t.numel() for t in experts)
    del experts
    daemon = serve(store, workdir, device_slots=total // 4)
    try:
        with ExpertClient(daemon.address) as client:
            run = offload(model, client, hint=True)
            gc.collect()
            assert all(ref() is None for ref in gone), "the model still holds its expert weights"
            assert sum(p.numel() for p in model.parameters()) == params_before - expert_params
            with torch.no_grad():
                assert torch.equal(model(ids).logits, want_logits)
                assert torch.equal(generate(model, ids), want_tokens)
                assert torch.equal(generate(model, padded, attention_mask=mask), want_batch)
            device = client.stats()["tiers"]["device"]
            run.close()
    finally:
        daemon.kill()
    assert device["evictions"] > 0 and device["slots"] == total // 4  # the cache is smaller than the model
    assert run.stats.hints > 0 and run.stats.generations == 3


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_bf16_and_chunks_smaller_than_a_layer_stay_exact(implementation, checkpoints, workdir):
    """bf16, each experts implementation, and a device tier smaller than one layer's experts."""
    model_dir, store = checkpoints("qwen3_moe", torch.bfloat16)
    reference = load(model_dir, torch.bfloat16, implementation)
    model = load(model_dir, torch.bfloat16, implementation)
    ids = byte_prompt(PROMPT)
    with torch.no_grad():
        want_logits, want_tokens = reference(ids).logits, generate(reference, ids)
    daemon = serve(store, workdir, device_slots=12)  # a layer has 32 experts; the prompt routes to more
    try:
        with ExpertClient(daemon.address) as client:
            run = offload(model, client)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, want_logits)
                assert torch.equal(generate(model, ids), want_tokens)
    finally:
        daemon.kill()
    assert run.stats.chunked > 0, "the prefill should have needed more experts than the tier holds"


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_a_store_whose_gate_and_up_are_apart_still_computes_exactly(implementation, workdir):
    """F x D x 2 bytes not a multiple of 256: gate and up are padded apart in the slot, so there
    is no fused zero-copy view; each lease's experts are fused in a copy instead."""
    base = workdir / f"apart-{implementation}"
    tiny_model("qwen3_moe", dtype=torch.bfloat16, hidden_size=40, moe_intermediate_size=24).save_pretrained(
        base / "model"
    )  # 24 x 40 x 2 bytes: not a multiple of 256
    manifest = pack_hf(base / "model", base / "store")
    gate, up = manifest.tensors[0], manifest.tensors[1]
    assert up.offset > gate.offset + gate.nbytes, "the test needs padding between gate and up"
    reference = load(base / "model", torch.bfloat16, implementation)
    model = load(base / "model", torch.bfloat16, implementation)
    ids = byte_prompt(PROMPT)
    with torch.no_grad():
        want_logits, want_tokens = reference(ids).logits, generate(reference, ids)
    daemon = serve(base / "store", workdir, device_slots=12)
    try:
        with ExpertClient(daemon.address) as client:
            offload(model, client)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, want_logits)
                assert torch.equal(generate(model, ids), want_tokens)
    finally:
        daemon.kill()


@pytest.mark.gpu
def test_on_cuda_with_a_cuda_device_tier_too(checkpoints, workdir):
    """The model on the GPU, the experts in the daemon's CUDA slab (IPC views): the same tokens."""
    model_dir, store = checkpoints("qwen3_moe", torch.bfloat16)
    reference = load(model_dir, torch.bfloat16).cuda()
    model = load(model_dir, torch.bfloat16).cuda()
    ids = byte_prompt(PROMPT).cuda()
    with torch.no_grad():
        want_logits, want_tokens = reference(ids).logits, generate(reference, ids)
    daemon = serve(store, workdir, device_slots=12, device="cuda")
    try:
        with ExpertClient(daemon.address) as client:
            offload(model, client, hint=True)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, want_logits)
                assert torch.equal(generate(model, ids), want_tokens)
    finally:
        daemon.kill()


def test_offload_refuses_a_store_of_another_model(checkpoints, workdir):
    _, mixtral_store = checkpoints("mixtral")
    qwen_dir, _ = checkpoints("qwen3_moe")
    model = load(qwen_dir, torch.float32)
    daemon = serve(mixtral_store, workdir, device_slots=8)
    try:
        with ExpertClient(daemon.address) as client, pytest.raises(ModelLayoutError, match="32 experts"):
            offload(model, client)
    finally:
        daemon.kill()
    assert expert_tensors(model), "a refused offload leaves the model whole"


def test_offload_checks_store_layers_against_the_models_moe_layers(checkpoints, workdir):
    """DeepSeek's first layer is dense: store layer 0 is decoder layer 1, and the client knows it."""
    model_dir, store = checkpoints("deepseek_v3")
    model = load(model_dir, torch.float32)
    assert [x.decoder_layer for x in find_moe_layers(model)] == [1, 2, 3]
    daemon = serve(store, workdir, device_slots=8)
    try:
        with ExpertClient(daemon.address) as client:
            assert client.info["checkpoint_layers"] == [1, 2, 3]
            client.info["checkpoint_layers"] = [0, 1, 2]  # as a store of another layout would say
            with pytest.raises(ModelLayoutError, match=r"checkpoint layers \[0, 1, 2\]"):
                offload(model, client)
    finally:
        daemon.kill()


def test_per_expert_modules_are_refused_by_name():
    """The layout of transformers < 5 (a ModuleList of expert MLPs) is named, not guessed at."""
    model = tiny_model("olmoe", layers=1)
    mlp = model.model.layers[0].mlp
    mlp.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    with pytest.raises(
        ModelLayoutError, match=r"per-expert modules .*ModuleList of 3 Linear.*transformers < 5"
    ):
        find_moe_layers(model)


def test_pack_from_hf_checks_the_config_against_the_checkpoint(checkpoints, workdir):
    model_dir, _ = checkpoints("qwen2_moe")
    bad = workdir / "qwen2-bad-config"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["mlp_only_layers"] = [1]  # says layer 1 is dense, but the checkpoint has experts there
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"MoE layers \[0, 2, 3\].*experts in layers \[0, 1, 2, 3\]"):
        pack_hf(bad, workdir / "never")
    assert not (workdir / "never").exists()


def test_pack_from_hf_on_the_command_line(checkpoints, workdir):
    model_dir, _ = checkpoints("olmoe")
    out = subprocess.run(
        [*EXPERTD, "pack", "--from-hf", str(model_dir), str(workdir / "olmoe-cli"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "packed 4 layers x 16 experts" in out.stdout
    manifest = json.loads((workdir / "olmoe-cli" / "manifest.json").read_text())
    assert manifest["checkpoint_layers"] == [0, 1, 2, 3]


def test_the_demo_generates_through_expertd_and_reports():
    """`make demo`: a real architecture, a real daemon, the model's own tokens, one report."""
    out = subprocess.run([*EXPERTD, "demo", "--tokens", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = out.stdout
    assert "the same tokens as the model with its experts in memory: yes" in report
    for line in ("tokens/s", "device hit rate", "stall", "bytes moved", "expertd pack --from-hf"):
        assert line in report
