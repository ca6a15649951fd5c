"""Live replay: drive real expert weights through a trace's routing and time it.

Every row of the trace (one token's layer) takes its experts from an `ExpertSource`
(a lease from a running expertd, or views of an mmap of the store for the page-cache
baseline), runs their SwiGLU FFNs on a one-token hidden state, and lets them go.
What is measured is wall time: real transfers, real stalls, real compute.
`PrivateDaemon` starts an expertd of its own for the demo, `replay --live` and benches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from expertd.daemon.core.defaults import DEFAULT_NAME
from expertd.traces.replay import forward_ids
from expertd.traces.trace import Trace

Weights = Mapping[str, torch.Tensor]  # one expert's tensors by checkpoint name

# A lowercase substring of a trace's model name -> the synthetic preset with its expert shapes.
PRESET_OF_MODEL = {
    "granite-3.0-1b-a400m": "granite-3.0-1b-a400m",
    "mixtral-8x7b": "mixtral-8x7b",
    "llama-4-maverick": "llama-4-maverick",
}


def preset_for(meta: Any) -> str:
    """The synthetic preset with the shapes of ``meta``'s model; ValueError if there is none."""
    from expertd.daemon.store.pack import SYNTHETIC_PRESETS

    preset = next((p for m, p in PRESET_OF_MODEL.items() if m in meta.model.lower()), None)
    if preset is None:
        raise ValueError(f"no synthetic preset has the expert shapes of {meta.model}")
    shape = SYNTHETIC_PRESETS[preset]
    if (shape.num_layers, shape.num_experts) != (meta.num_layers, meta.num_experts):
        raise ValueError(f"preset {preset} is not the trace's {meta.num_layers} x {meta.num_experts} experts")
    return preset


class ExpertSource(Protocol):
    """Where a live replay gets weights: ``experts(layer, ids)`` gives ``[(id, weights)]`` while held."""

    tensor_names: tuple[str, ...]

    def experts(self, layer: int, experts: list[int]) -> contextlib.AbstractContextManager[Any]: ...


@dataclasses.dataclass
class LiveResult:
    tokens: int
    rows: int
    seconds: float
    wait_s: float  # time spent getting weights (acquire round trips and stalls, or page faults)
    cold_tokens: int = 0  # the first tokens, timed apart (`drive`'s ``steady_from``)
    cold_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("inf")

    @property
    def steady_tokens_per_s(self) -> float:
        """Tokens/s after the first ``cold_tokens`` (all of them when none were set apart)."""
        seconds = self.seconds - self.cold_seconds
        return (self.tokens - self.cold_tokens) / seconds if seconds > 0 else float("inf")

    @property
    def cold_tokens_per_s(self) -> float:
        return self.cold_tokens / self.cold_seconds if self.cold_seconds else float("nan")

    def as_dict(self) -> dict[str, float]:
        return dict(
            dataclasses.asdict(self),
            tokens_per_s=self.tokens_per_s,
            steady_tokens_per_s=self.steady_tokens_per_s,
            cold_tokens_per_s=self.cold_tokens_per_s,
        )


def drive(
    trace: Trace, source: ExpertSource, *, progress: bool = False, seed: int = 0, steady_from: int = 0
) -> LiveResult:
    """Run every row of ``trace`` through ``source``'s weights; the wall time it took.

    ``steady_from``: the tokens (forward passes) before it are also timed apart, as the cold start.
    """
    from expertd.client.moe import expert_ffn, swiglu_names

    gate, up, down = swiglu_names(source.tensor_names)
    layers, rows, requests = trace.layer.tolist(), trace.experts.tolist(), trace.request.tolist()
    forwards = forward_ids(trace)
    split_row = int(np.searchsorted(forwards, steady_from)) if steady_from > 0 else 0
    cold_seconds = 0.0
    begin_generation = getattr(source, "begin_generation", None)
    # A bank of random hidden states, one per row in turn. (Feeding each layer's output to
    # the next, normalised, is a power iteration: the state decays into denormals, which
    # the CPU computes a hundred times slower, and the replay would time that instead.)
    bank: torch.Tensor | None = None
    waited = 0.0
    iterator: Any = zip(layers, rows, strict=True)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(layers), unit="layer", leave=False, file=sys.stderr)
    started = time.perf_counter()
    for row, (layer, experts) in enumerate(iterator):
        if row == split_row and split_row:
            cold_seconds = time.perf_counter() - started
        if begin_generation is not None and (row == 0 or requests[row] != requests[row - 1]):
            begin_generation()  # a new generation: the daemon's predictors start its history afresh
        asked = time.perf_counter()
        with source.experts(layer, experts) as held:
            waited += time.perf_counter() - asked
            for _, w in held:
                if bank is None:  # the hidden size and dtype come from the first weights
                    gen = torch.Generator().manual_seed(seed)
                    bank = torch.randn(64, w[gate].shape[1], generator=gen)  # [64, D]
                    bank = bank.to(device=w[gate].device, dtype=w[gate].dtype)
                x = bank[row % 64 : row % 64 + 1]  # [1, D]
                expert_ffn(x, w[gate], w[up], w[down])  # [1, D]
    if bank is not None and bank.is_cuda:
        torch.cuda.synchronize(bank.device)  # the last layer's kernels are part of the time
    seconds = time.perf_counter() - started
    tokens = int(forwards[-1]) + 1 if len(trace) else 0
    cold_tokens = min(steady_from, tokens) if cold_seconds else 0
    return LiveResult(tokens, len(layers), seconds, waited, cold_tokens, cold_seconds)


class ClientSource:
    """Weights leased from expertd through an `ExpertClient` (zero-copy views)."""

    def __init__(self, client: Any, tier: str | None = None) -> None:
        self.client = client
        self.tier = tier
        self.tensor_names = tuple(client.tensor_names)

    def begin_generation(self) -> None:
        self.client.begin_generation()

    @contextlib.contextmanager
    def experts(self, layer: int, experts: list[int]) -> Iterator[list[tuple[int, Weights]]]:
        with self.client.acquire(layer, experts, self.tier) as lease:
            yield list(lease.items())


class MmapSource:
    """The page-cache baseline (llama.cpp's way): views of an mmap of the store's data file."""

    def __init__(self, store_dir: Path) -> None:
        from expertd.daemon.store.manifest import CODEC_NONE, load_manifest

        self.manifest = manifest = load_manifest(store_dir)
        if any(e.codec != CODEC_NONE for e in manifest.experts):
            raise ValueError(f"{store_dir}: the mmap baseline needs an uncompressed store (codec none)")
        self.data = np.memmap(Path(store_dir) / manifest.data_file, dtype=np.uint8, mode="r")
        self.tensor_names = tuple(t.name for t in manifest.tensors)
        self._dtypes = {t.name: getattr(torch, t.dtype) for t in manifest.tensors}

    @contextlib.contextmanager
    def experts(self, layer: int, experts: list[int]) -> Iterator[list[tuple[int, Weights]]]:
        import warnings

        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mapping: views are immutable
            for expert in experts:
                entry = self.manifest.entry(layer, expert)
                weights = {}
                for spec in self.manifest.tensors:
                    start = entry.offset + spec.offset
                    flat = torch.from_numpy(self.data[start : start + spec.nbytes])
                    weights[spec.name] = flat.view(self._dtypes[spec.name]).view(spec.shape)
                out.append((expert, weights))
        yield out

    def drop_page_cache(self) -> None:
        """Start cold: drop the data file's pages from the page cache."""
        fd = os.open(self.data.filename, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class PrivateDaemon:
    """An `expertd serve` subprocess on a socket of its own; a context manager."""

    def __init__(
        self,
        store: Path,
        workdir: Path,
        flags: Sequence[str] = (),
        timeout_s: float = 60.0,
        launcher: Sequence[str] | None = None,
    ):
        """``launcher``: a command prefix that execs the daemon (e.g. into a cgroup)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.address = f"ipc://{workdir / 'expertd.sock'}"
        self.log_path = workdir / "daemon.log"
        command = [*(launcher or ()), sys.executable, "-m", "expertd.daemon", "serve", "--store", str(store)]
        command += ["--address", self.address, *flags]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.timeout_s = timeout_s

    def connect(self, **client_args: Any):
        """An `ExpertClient`, once the daemon answers."""
        from expertd.client import DaemonUnavailable, ExpertClient

        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return ExpertClient(self.address, connect_timeout_s=1.0, **client_args)
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the daemon did not answer at {self.address}:\n{self.log()}"
                    ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not stop. Returns its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> PrivateDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def live_sweep(
    trace: Trace,
    policies: Sequence[str],
    capacities: Sequence[int],
    *,
    scale: float = 4.0,
    config: str = "",
    progress: bool = True,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Each policy at each device capacity (slots) through a real daemon: measured, not modelled.

    The store is synthetic with the trace model's expert shapes divided by ``scale``; the host
    tier holds every expert; the device tier is ``device``: ``cpu`` (the stand-in: a second
    shared-memory slab) or ``cuda`` (the GPU, real host->device copies, the experts' FFNs
    computed there). ``config``: extra TOML for the daemon (a ``[prefetch]`` section, say).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"live device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--live-device cuda: this machine has no CUDA device")
    import tempfile

    from expertd.daemon.store.pack import pack_synthetic

    meta = trace.meta
    num_keys = meta.num_layers * meta.num_experts
    rows = []
    with tempfile.TemporaryDirectory(prefix="expertd-live-", dir="/tmp") as tmp:
        store = Path(tmp) / "store"
        manifest = pack_synthetic(store, preset_for(meta), scale=scale)
        config_path = Path(tmp) / "expertd.toml"
        config_path.write_text(config)
        for slots in capacities:
            for policy in policies:
                flags = [
                    "--config", str(config_path), "--host-size", f"{num_keys} slots", "--device", device,
                    "--device-size", f"{slots} slots", "--log-level", "warning",
                ]  # fmt: skip
                if policy != DEFAULT_NAME:  # `default` is what serve runs without a policy flag
                    flags += ["--device-policy", policy]
                daemon = PrivateDaemon(store, Path(tmp) / f"run-{slots}-{len(rows)}", flags)
                with daemon, daemon.connect(name="expertd-replay-live") as client:
                    result = drive(trace, ClientSource(client), progress=progress)
                    stats = client.stats()
                tier = stats["tiers"]["device"]
                rows.append(
                    {
                        "policy": policy,
                        "device": device,
                        "capacity": slots / num_keys,
                        "slots": slots,
                        "expert_bytes": manifest.raw_bytes,
                        "accesses": tier["accesses"],
                        "hits": tier["hits"],
                        "hit_rate": tier["hit_rate"],
                        "tokens": result.tokens,
                        "tokens_per_s": result.tokens_per_s,
                        "seconds": result.seconds,
                        "stall_s_per_token": stats["acquires"]["stall_s"] / max(1, result.tokens),
                        "wait_s_per_token": result.wait_s / max(1, result.tokens),
                        "bytes_moved": sum(link["bytes"] for link in stats["links"].values()),
                        "prefetch": stats["prefetch"],
                    }
                )
    return rows
