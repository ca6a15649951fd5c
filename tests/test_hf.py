"""expertd.client.hf: transformers MoE models through a real daemon, bit for bit (no downloads)."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import tempfile
import time
import warnings
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
from expertd.client.hf_tiny import TINY, byte_prompt, installed, tiny_model  # noqa: E402
from expertd.daemon.protocol.families import FAMILIES, readme_line  # noqa: E402
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


def serve(store: Path, workdir: Path, device_slots: int, device: str = "cpu", *extra: str) -> DaemonProcess:
    """A daemon whose host tier holds every expert and whose device tier (CPU stand-in) few."""
    manifest = json.loads((store / "manifest.json").read_text())
    total = manifest["num_layers"] * manifest["num_experts"]
    run = Path(tempfile.mkdtemp(prefix="d-", dir=workdir))
    flags = ["--host-size", f"{total} slots", "--device", device, "--device-size", f"{device_slots} slots"]
    return DaemonProcess(store, run, *flags, *extra, "--log-level", "warning")


def load(model_dir: Path, dtype: torch.dtype, implementation: str | None = None):
    """The model, every weight in freshly allocated (64-byte aligned) memory.

    On the CPU a matmul's last bits depend on the weights' address: safetensors may load a
    tensor at any 8-byte boundary (Granite's and DBRX's experts, which transformers renames
    rather than converts, land at 8 or 40 mod 64), and the very same model then computes other
    logits than its own deepcopy. expertd's slots are 256-byte aligned; so are these weights.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, experts_implementation=implementation
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.data_ptr() % 64:
                param.data = param.data.clone()
    return model.eval()


def expert_tensors(model) -> list[torch.Tensor]:
    return [x.experts.get_parameter(p) for x in find_moe_layers(model) for p in x.params]


def generate(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def run_matches_the_model(
    model_dir: Path,
    store: Path,
    workdir: Path,
    dtype: torch.dtype,
    implementation,
    device_slots: int,
    *,
    hint: bool = False,
    tier: str | None = None,
    flags: tuple[str, ...] = (),
):
    """Offload a fresh copy of the model through a daemon of ``device_slots`` device slots: its
    logits and greedy tokens equal the untouched copy's. Returns the `Offload`."""
    reference, model = load(model_dir, dtype, implementation), load(model_dir, dtype, implementation)
    ids = byte_prompt(PROMPT)
    with torch.no_grad():
        want_logits, want_tokens = reference(ids).logits, generate(reference, ids)
    daemon = serve(store, workdir, device_slots, "cpu", *flags)
    try:
        with ExpertClient(daemon.address) as client:
            run = offload(model, client, hint=hint, tier=tier)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, want_logits)
                assert torch.equal(generate(model, ids), want_tokens)
            run.placed = client.stats().get("placed", {})
    finally:
        daemon.kill()
    return run


@pytest.mark.parametrize("name", installed())
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
    # a layer has 32 experts; the prompt routes to more than 12
    run = run_matches_the_model(model_dir, store, workdir, torch.bfloat16, implementation, device_slots=12)
    assert run.stats.chunked > 0, "the prefill should have needed more experts than the tier holds"


@pytest.mark.parametrize(
    ("name", "implementation"),
    [("gpt_oss", "eager"), ("gpt_oss", "grouped_mm"), ("gpt_oss", "batched_mm"), ("llama4_text", None),
     ("dbrx", None)],
)  # fmt: skip
def test_biased_transposed_dense_and_split_experts_stay_exact_in_chunks(
    name, implementation, checkpoints, workdir
):
    """GPT-OSS (biases, [in, out] weights, interleaved gate/up) in each implementation, Llama-4's
    dense experts and DBRX's w1/v1/w2, on a device tier of 3 slots: every layer in chunks."""
    model_dir, store = checkpoints(name)
    run = run_matches_the_model(model_dir, store, workdir, torch.float32, implementation, 3, hint=True)
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
    run_matches_the_model(base / "model", base / "store", workdir, torch.bfloat16, implementation, 12)


@pytest.mark.parametrize(
    ("name", "dtype", "implementation"),
    [("qwen3_moe", torch.bfloat16, "eager"), ("qwen3_moe", torch.bfloat16, "grouped_mm"),
     ("qwen3_moe", torch.bfloat16, "batched_mm"), ("gpt_oss", torch.float32, "grouped_mm"),
     ("llama4_text", torch.float32, None)],
)  # fmt: skip
def test_auto_placement_computes_host_experts_and_stays_exact(
    name, dtype, implementation, checkpoints, workdir
):
    """tier="auto": the daemon places misses on the host (host 100 GB/s against a 25 GB/s link);
    each lease's host-placed experts are their own chunk, computed from the host slab: the
    logits and tokens are still the model's, bit for bit."""
    model_dir, store = checkpoints(name, dtype)
    run = run_matches_the_model(
        model_dir, store, workdir, dtype, implementation, 12, tier="auto",
        flags=("--host-gbps", "100", "--max-pinned-share", "1"),
    )  # fmt: skip
    assert run.placed["host"] > 0 and run.placed["device"] > 0, run.placed


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


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_auto_placement_on_cuda_stays_within_bf16(implementation, checkpoints, workdir):
    """The model on the GPU, tier="auto": host-placed experts computed on the CPU from the host
    slab, their rows moved to the GPU before the sum over k. Stated tolerance: logits within 4
    bf16 ulps (2**-6) of their largest magnitude (the CPU and GPU kernels round differently)."""
    model_dir, store = checkpoints("qwen3_moe", torch.bfloat16)
    reference = load(model_dir, torch.bfloat16, implementation).cuda()
    model = load(model_dir, torch.bfloat16, implementation).cuda()
    ids = byte_prompt(PROMPT).cuda()
    with torch.no_grad():
        want = reference(ids).logits.float()
    daemon = serve(store, workdir, 12, "cuda", "--host-gbps", "1000", "--max-pinned-share", "1")
    try:
        with ExpertClient(daemon.address) as client:
            offload(model, client, tier="auto")
            with torch.no_grad():
                got = model(ids).logits.float()
            placed = client.stats()["placed"]
    finally:
        daemon.kill()
    assert placed["host"] > 0, placed
    assert (got - want).abs().max().item() <= 2**-6 * want.abs().max().item()


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
    info = subprocess.run(
        [*EXPERTD, "store", "info", str(workdir / "olmoe-cli")], capture_output=True, text=True, timeout=60
    )
    assert "layout     olmoe: gate_up_proj = gate_proj + up_proj, down_proj = down_proj;" in info.stdout


def test_the_demo_generates_through_expertd_and_reports():
    """`make demo`: a real architecture, a real daemon, the model's own tokens, one report."""
    out = subprocess.run([*EXPERTD, "demo", "--tokens", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = out.stdout
    assert "the same tokens as the model with its experts in memory: yes" in report
    for line in ("tokens/s", "device hit rate", "stall", "bytes moved", "expertd pack --from-hf"):
        assert line in report


def test_readme_lists_the_families_this_file_runs():
    """README.md's list is generated from the covered families (`python -m expertd.client.hf_tiny`)."""
    assert {f.model_types[0] for f in FAMILIES} == set(TINY), "every family in the table has a tiny model"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = readme.split("<!-- families:", 1)[1].split("-->", 1)[1].split("<!-- /families -->", 1)[0]
    assert listed.strip() == readme_line(installed()), "regenerate: python -m expertd.client.hf_tiny"


def _config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        (
            "gpt_oss",
            {"quantization_config": {"quant_method": "mxfp4"}},
            r"gpt_oss: its experts are quantized \(mxfp4\)",
        ),
        ("mixtral", {"model_type": "jetmoe"}, r"model type 'jetmoe' is not a MoE family expertd supports"),
        (
            "gpt_oss",
            {"model_type": "mixtral"},
            r"mixtral: Mixtral experts are w1, w3, w2 \(mixtral naming\); the checkpoint has gate_up_proj, "
            r"gate_up_proj_bias, down_proj, down_proj_bias \(fused naming\)",
        ),
    ],
    ids=["quantized", "unknown-family", "layout-differs"],
)
def test_pack_from_hf_refuses_an_unsupported_layout_at_once(family, changes, message, checkpoints, workdir):
    """Refused before anything is written, in well under a second, naming the family and what differs."""
    model_dir, _ = checkpoints(family)
    bad = workdir / f"unsupported-{family}-{len(changes)}-{next(iter(changes))}"
    shutil.copytree(model_dir, bad)
    _config(bad, **changes)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        pack_hf(bad, workdir / "never")
    assert time.perf_counter() - started < 1.0
    assert not (workdir / "never").exists()
    assert not list(workdir.glob(".never*")), "not even a temporary store"


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("dbrx", {"ffn_config": {"moe_num_experts": 4, "ffn_hidden_size": 32}},
         r"dbrx: expert tensor w1 is \[64, 64\] in the checkpoint; config.json \(F=32, D=64\) makes it "
         r"\[32, 64\]"),
        ("llama4_text", {"moe_layers": [1, 3]},
         r"MoE layers \[1, 3\], the checkpoint has experts in layers \[0, 1, 2, 3\]"),
        ("granitemoe", {"num_local_experts": 16}, r"16 routed experts per layer, the checkpoint has 8"),
        ("gpt_oss", {"intermediate_size": 16}, r"gate_up_proj is \[64, 64\] .* makes it \[64, 32\]"),
    ],
    ids=["dbrx-experts", "llama4-layers", "granite-count", "gpt-oss-ffn"],
)  # fmt: skip
def test_pack_from_hf_cross_checks_config_and_checkpoint_for_every_family(
    family, changes, message, checkpoints, workdir
):
    model_dir, _ = checkpoints(family)
    bad = workdir / f"mismatch-{family}"
    shutil.copytree(model_dir, bad)
    _config(bad, **changes)
    with pytest.raises(CheckpointError, match=message):
        pack_hf(bad, workdir / "never")
    assert not (workdir / "never").exists()


def test_a_router_that_cannot_give_a_hint_turns_hints_off_once_and_generation_goes_on(checkpoints, workdir):
    """MiniMax-M2's router takes e_score_correction_bias; here one router refuses any call but its
    block's: offload warns once, stops hinting, and the tokens are still the model's."""
    model_dir, store = checkpoints("minimax_m2")
    reference, model = load(model_dir, torch.float32), load(model_dir, torch.float32)
    ids = byte_prompt(PROMPT)
    with torch.no_grad():
        want_tokens = generate(reference, ids)
    router = find_moe_layers(model)[2].router
    by_block: list[int] = []
    router.register_forward_pre_hook(lambda module, args: by_block.append(1))
    real_forward = router.forward

    def forward(*args, **kwargs):
        if not by_block:
            raise RuntimeError("this router only runs inside its block")
        by_block.clear()
        return real_forward(*args, **kwargs)

    router.forward = forward
    daemon = serve(store, workdir, device_slots=8)
    try:
        with ExpertClient(daemon.address) as client:
            run = offload(model, client, hint=True)
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                assert torch.equal(generate(model, ids), want_tokens)
    finally:
        daemon.kill()
    said = [w for w in caught if "hints turned off" in str(w.message)]
    assert len(said) == 1 and "MiniMaxM2TopKRouter" in str(said[0].message)
    assert run.hint is False and run.stats.hints > 0  # layer 1's hint went out before layer 2 failed


def test_a_store_packed_before_layouts_were_recorded_still_serves(checkpoints, workdir):
    """Backward compatible: a manifest without expert_layout is read as plain SwiGLU named by its
    tensors -- right for a plain family; Llama-4's transposed experts are refused by name."""
    for family in ("qwen3_moe", "llama4_text"):
        model_dir, store = checkpoints(family)
        old = workdir / f"old-{family}"
        shutil.copytree(store, old)
        manifest = json.loads((old / "manifest.json").read_text())
        del manifest["expert_layout"]
        (old / "manifest.json").write_text(json.dumps(manifest))
        reference, model = load(model_dir, torch.float32), load(model_dir, torch.float32)
        ids = byte_prompt(PROMPT)
        daemon = serve(old, workdir, device_slots=16)
        try:
            with ExpertClient(daemon.address) as client:
                if family == "llama4_text":
                    with pytest.raises(
                        ModelLayoutError, match=r"packed before .*transposed False, the model's True"
                    ):
                        offload(model, client)
                    continue
                offload(model, client)
                with torch.no_grad():
                    assert torch.equal(model(ids).logits, reference(ids).logits)
        finally:
            daemon.kill()
