"""The vLLM plugin through a real daemon and a real vLLM (CPU build): `make test-vllm`.

Each vLLM run is a fresh `tests/vllm_run.py` process (or `vllm`'s OpenAI server), so the
plugin's switch, ``EXPERTD_VLLM``, is read at start as in production. The tiny models are
random-weight models of real MoE classes, made here, packed with `expertd pack --from-hf`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="needs vLLM (`make test-vllm` installs the CPU build)")
torch = pytest.importorskip("torch")

from daemon_util import DaemonProcess  # noqa: E402
from vllm_run import CPU_ENV, CPU_OVERRIDES, engine_args  # noqa: E402

from expertd.client import ExpertClient  # noqa: E402
from expertd.client.hf_tiny import tiny_model  # noqa: E402
from expertd.daemon.store.pack_hf import pack_hf  # noqa: E402
from expertd.traces.convert import ConvertOptions, convert  # noqa: E402
from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, read_trace  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

RUNNER = Path(__file__).with_name("vllm_run.py")
PROMPTS = [list(b"The cache holds a quarter"), list(b"abc")]
NEW_TOKENS = 8
LAYERS = 4


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="exd-vllm-", dir="/tmp"))  # short: ipc:// paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoints(workdir):
    """name -> (model dir, store dir, vLLM's own result): each made, packed and run once."""
    made: dict[str, tuple[Path, Path, list[dict]]] = {}

    def get(name: str) -> tuple[Path, Path, list[dict]]:
        if name not in made:
            base = workdir / name
            tiny_model(name, layers=LAYERS, dtype=torch.bfloat16, **CPU_OVERRIDES).save_pretrained(
                base / "model"
            )
            pack_hf(base / "model", base / "store")
            made[name] = (base / "model", base / "store", run_vllm(base / "model"))
        return made[name]

    return get


def run_vllm(
    model_dir: Path, address: str | None = None, record: Path | None = None, tp: int = 1, prompts=PROMPTS
) -> list[dict]:
    """A fresh vLLM `LLM` on ``prompts``: [{tokens, logprobs}], with expertd if ``address``;
    ``record``: a folder for vLLM's returned routing (.npy per request, and trace.etrace)."""
    env = {**os.environ, **CPU_ENV}
    env.pop("EXPERTD_VLLM", None)
    if address:
        env["EXPERTD_VLLM"] = address
    args = [sys.executable, str(RUNNER), str(model_dir), json.dumps(prompts), "--max-tokens", str(NEW_TOKENS)]
    if tp > 1:
        args += ["--tp", str(tp)]
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        args += ["--record", str(record)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM run failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def serve(store: Path, workdir: Path, device_slots: int, address: str | None = None) -> DaemonProcess:
    """A daemon whose host tier holds every expert and whose device tier (CPU stand-in) few."""
    manifest = json.loads((store / "manifest.json").read_text())
    total = manifest["num_layers"] * manifest["num_experts"]
    run = Path(tempfile.mkdtemp(prefix="d-", dir=workdir))
    flags = ["--host-size", f"{total} slots", "--device", "cpu", "--device-size", f"{device_slots} slots"]
    flags += ["--max-pinned-share", "1"]  # the engine is the daemon's one client: its passes are not capped
    return DaemonProcess(store, run, *flags, "--log-level", "warning", address=address)


def daemon_stats(address: str) -> dict:
    with ExpertClient(address) as client:
        return client.stats()


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_vllm_with_expertd_generates_vllms_own_tokens(name, checkpoints, workdir):
    """Greedy tokens and their logprobs equal vLLM's own; every pass leased each layer's experts."""
    model_dir, store, want = checkpoints(name)
    manifest = json.loads((store / "manifest.json").read_text())
    daemon = serve(store, workdir, device_slots=LAYERS * manifest["num_experts"] // 4)
    try:
        got = run_vllm(model_dir, daemon.address)
        stats = daemon_stats(daemon.address)
    finally:
        daemon.kill()
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [r["logprobs"] for r in got] == [r["logprobs"] for r in want], "same kernel, same weights: exact"
    # Every pass leased each layer once. Passes: one per token at least; more when the second
    # prompt reaches the engine a step after the first (vLLM's scheduling, not ours).
    passes, rest = divmod(stats["acquires"]["count"], LAYERS)
    assert rest == 0 and passes >= NEW_TOKENS
    assert stats["tiers"]["device"]["evictions"] > 0, "the device tier is smaller than the model"


def test_a_pass_needing_more_experts_than_the_tier_holds_is_leased_in_chunks(checkpoints, workdir):
    """6 device slots; the prefill routes each layer to more: chunked, and the same tokens."""
    model_dir, store, want = checkpoints("qwen3_moe")
    daemon = serve(store, workdir, device_slots=6)
    try:
        got = run_vllm(model_dir, daemon.address)
        stats = daemon_stats(daemon.address)
    finally:
        daemon.kill()
    assert stats["acquires"]["count"] > NEW_TOKENS * LAYERS, "the prefill should have been leased in chunks"
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for mine, theirs in zip(got, want, strict=True):  # chunk outputs are summed: close, not exact
        assert mine["logprobs"] == pytest.approx(theirs["logprobs"], abs=2e-2)


#: What vLLM 0.32's CPU build answers to enable_return_routed_experts: the routing capture runs
#: only in Model Runner V2, which needs Triton, which the CPU build lacks.
NO_ROUTING_ON_CPU = "AuxOutput Connector requires Model Runner V2"


def test_the_routing_vllm_returns_is_recorded_and_is_what_the_daemon_leased(checkpoints, workdir):
    """vLLM's own routing (``enable_return_routed_experts``): the recorder's trace and the
    converter's agree with it, and the daemon saw exactly those experts leased. One prompt, so
    the passes are known: the prefill, then one per generated token but the last."""
    model_dir, store, want = checkpoints("qwen3_moe")
    daemon = serve(store, workdir, device_slots=32)
    record = workdir / "record"
    prompt = PROMPTS[0]
    try:
        try:
            (got,) = run_vllm(model_dir, daemon.address, record=record, prompts=[prompt])
        except AssertionError as exc:
            if NO_ROUTING_ON_CPU in str(exc):
                pytest.skip(f"this vLLM cannot return routed experts: {NO_ROUTING_ON_CPU} (needs Triton)")
            raise
        stats = daemon_stats(daemon.address)
    finally:
        daemon.kill()
    assert got["tokens"] == want[0]["tokens"]
    trace = read_trace(record / "trace.etrace")
    routed = trace.experts.reshape(-1, LAYERS, trace.meta.top_k)  # [tokens, layers, k]
    assert len(routed) == len(prompt) + NEW_TOKENS - 1  # the last token is never forwarded
    phases = trace.phase[::LAYERS].tolist()
    assert phases == [PHASE_PREFILL] * len(prompt) + [PHASE_DECODE] * (NEW_TOKENS - 1)
    convert("vllm-routed-experts", record, workdir / "converted.etrace", ConvertOptions(num_experts=32))
    assert np.array_equal(read_trace(workdir / "converted.etrace").experts, trace.experts)
    # The prefill pass leases each layer's union over the prompt; a decode pass, its token's k.
    prefill = sum(len(np.unique(routed[: len(prompt), layer])) for layer in range(LAYERS))
    decode = (NEW_TOKENS - 1) * LAYERS * trace.meta.top_k
    assert stats["tiers"]["device"]["accesses"] == prefill + decode


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, body: dict, timeout_s: float = 120) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


def test_openai_server_backed_by_expertd_answers_a_completion(checkpoints, workdir):
    """`vllm serve` (its OpenAI server module) on 127.0.0.1 with the plugin on: vLLM's tokens."""
    model_dir, store, want = checkpoints("qwen3_moe")
    daemon = serve(store, workdir, device_slots=32)
    port = _free_port()
    args = engine_args(str(model_dir), "bfloat16")
    flags = [
        f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}") for key, value in args.items()
    ]
    flags = [f for f in flags if not f.startswith("--model=")]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *flags]
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, **CPU_ENV, "EXPERTD_VLLM": daemon.address}
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 480
        while True:
            assert server.poll() is None, (workdir / "server.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "the server did not come up in 480 s"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(2)
        body = {
            "model": str(model_dir),
            "prompt": PROMPTS[0],
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        }
        reply = _post(f"{base}/v1/completions", body)
        stats = daemon_stats(daemon.address)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
        daemon.kill()
    assert reply["choices"][0]["token_ids"] == want[0]["tokens"]
    assert stats["acquires"]["count"] == NEW_TOKENS * LAYERS


def test_two_tensor_parallel_ranks_each_with_its_own_daemon(checkpoints, workdir):
    """TP = 2 over vLLM's mp executor (gloo): rank r leases from daemon r and computes its half
    of each expert's FFN rows; tokens and logprobs equal vLLM's own at TP = 2."""
    model_dir, store, _ = checkpoints("qwen3_moe")
    want = run_vllm(model_dir, tp=2)
    template = f"ipc://{workdir}/rank{{rank}}.sock"
    daemons = [serve(store, workdir, 32, address=template.format(rank=r)) for r in range(2)]
    try:
        got = run_vllm(model_dir, template, tp=2)
        stats = [daemon_stats(d.address) for d in daemons]
    finally:
        for daemon in daemons:
            daemon.kill()
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [r["logprobs"] for r in got] == [r["logprobs"] for r in want]
    counts = [s["acquires"]["count"] for s in stats]
    assert counts[0] == counts[1] and counts[0] % LAYERS == 0 and counts[0] >= NEW_TOKENS * LAYERS
