"""llama.cpp as a peer of bench/live_vs_mmap.py: a GGUF of the store's shapes whose router replays the trace.

    python bench/llama_peer.py run GGUF TRACE MAX_TOKENS COLD_TOKENS WARM SLOTS   (the bench runs this)

Optional: needs ``llama_cpp`` (llama-cpp-python, built from its PyPI source package) and
``gguf``; `available` says why not, and the bench skips the row.

The GGUF is a ``llama``-architecture MoE with the trace model's expert count, top-k and the
synthetic store's hidden and ffn sizes (f16: the same bytes per expert as the store's
bf16). The router replays the trace exactly: token ``f`` (the trace's ``f``-th forward
pass) embeds as a large spike on hidden dimension ``f``; attention's output projection is
zero and the experts' down projections are small, so every layer's normalised input is
that spike, and layer ``l``'s gate row for dimension ``f`` is high exactly on the experts
the trace chose at (``f``, ``l``). Weights are mmap'd (llama.cpp's default): the page cache
is its RAM tier, bounded by the bench's cgroup like the other clients.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

SPIKE = 100.0  # the embedding's one large component
GATE_HIGH, GATE_LOW = 8.0, -8.0


def _read_bytes() -> int:
    return int(Path("/proc/self/io").read_text().split("read_bytes:")[1].split()[0])


def available() -> str:
    """Empty if llama.cpp can run here, else why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except Exception as exc:  # an import of a native build can fail in many ways
        return f"{type(exc).__name__}: {exc}"
    return ""


def ensure_gguf(store: Path, trace_name: str, max_tokens: int) -> Path:
    """The GGUF beside ``store`` (written once) for the first ``max_tokens`` of ``trace_name``."""
    path = store.parent / f"{store.name}-{trace_name}-{max_tokens}.gguf"
    if not path.exists():
        write_gguf(store, trace_name, max_tokens, path)
    # Written back and out of the page cache: pages still dirty from the write would stay
    # cached (charged to this process, not the client's memory group) and the run unbounded.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


@functools.cache
def _block(std: float, seed: int):
    import numpy as np

    return (np.random.default_rng(seed).standard_normal(1 << 16) * std).astype(np.float16)


def _tiled(shape: tuple[int, ...], std: float, seed: int):
    """Random-looking f16 weights, cheaply: one small block per (std, seed % 7), repeated."""
    import numpy as np

    return np.resize(_block(std, seed % 7), shape)


def write_gguf(store: Path, trace_name: str, max_tokens: int, path: Path) -> None:
    import gguf
    import numpy as np

    from expertd.daemon.cli.replay_cli import load_for_replay
    from expertd.daemon.store.manifest import load_manifest
    from expertd.traces.replay import forward_ids

    manifest = load_manifest(store)
    trace = load_for_replay(trace_name, "all", max_tokens)
    shapes = {t.name: t.shape for t in manifest.tensors}
    ffn, hidden = next(iter(shapes.values()))  # gate/w1 first: [ffn, hidden]
    layers, experts, top_k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    forwards = forward_ids(trace)
    tokens = int(forwards[-1]) + 1
    if tokens > hidden:
        raise ValueError(f"{tokens} tokens need a hidden size >= {tokens}, the store has {hidden}")
    vocab, heads = tokens + 3, max(1, hidden // 64)
    gates = np.zeros((layers, experts, hidden), dtype=np.float32)  # [L, E, D]
    gates[:, :, :tokens] = GATE_LOW
    for f, layer, chosen in zip(forwards.tolist(), trace.layer.tolist(), trace.experts.tolist(), strict=True):
        for rank, e in enumerate(chosen):
            gates[layer, e, f] = GATE_HIGH - 0.01 * rank
    embed = np.zeros((vocab, hidden), dtype=np.float16)  # [V, D]
    for f in range(tokens):
        embed[3 + f, f] = SPIKE
    tensors: list[tuple[str, object]] = [("token_embd.weight", lambda: embed)]
    tensors += [("output_norm.weight", lambda: np.ones(hidden, dtype=np.float32))]
    tensors += [("output.weight", lambda: _tiled((vocab, hidden), 0.02, 1))]
    for i in range(layers):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", lambda: np.ones(hidden, dtype=np.float32)),
            (b + "attn_q.weight", lambda i=i: _tiled((hidden, hidden), 0.02, 10 + i)),
            (b + "attn_k.weight", lambda i=i: _tiled((hidden, hidden), 0.02, 20 + i)),
            (b + "attn_v.weight", lambda i=i: _tiled((hidden, hidden), 0.02, 30 + i)),
            (b + "attn_output.weight", lambda: np.zeros((hidden, hidden), dtype=np.float16)),
            (b + "ffn_norm.weight", lambda: np.ones(hidden, dtype=np.float32)),
            (b + "ffn_gate_inp.weight", lambda i=i: gates[i]),
            (b + "ffn_gate_exps.weight", lambda i=i: _tiled((experts, ffn, hidden), 0.02, 40 + i)),
            (b + "ffn_up_exps.weight", lambda i=i: _tiled((experts, ffn, hidden), 0.02, 50 + i)),
            (b + "ffn_down_exps.weight", lambda i=i: _tiled((experts, hidden, ffn), 0.001, 60 + i)),
        ]
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_context_length(max(512, tokens + 8))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(top_k)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{f}" for f in range(tokens)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * tokens)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    made = {}
    for name, make in tensors:
        array = make()  # type: ignore[operator]
        made[name] = (array.shape, array.dtype, array.nbytes)
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, make in tensors:
        writer.write_tensor_data(make())  # type: ignore[operator]
    writer.close()
    os.replace(tmp, path)


def run(gguf_path: str, trace_name: str, max_tokens: int, cold_tokens: int, warm: bool) -> None:
    """The bench's client protocol: load, print ``ready``, wait for a line, run, print JSON."""
    import llama_cpp

    from expertd.daemon.cli.replay_cli import load_for_replay
    from expertd.traces.live_sources import drop_file_cache
    from expertd.traces.replay import forward_ids

    trace = load_for_replay(trace_name, "all", max_tokens)
    tokens = int(forward_ids(trace)[-1]) + 1
    drop_file_cache(Path(gguf_path))
    # Ready before the model loads: llama.cpp maps it with MAP_POPULATE (reading all of it),
    # so the memory limit must be in force first, or the whole file counts as the idle footprint.
    print("ready", flush=True)
    sys.stdin.readline()
    llm = llama_cpp.Llama(
        model_path=gguf_path, n_ctx=max(512, tokens + 8), n_threads=1, n_threads_batch=1, n_batch=8,
        use_mmap=True, verbose=False,
    )  # fmt: skip
    if warm:
        for f in range(tokens):
            llm.eval([3 + f])
        llm.reset()
    cold_seconds = 0.0
    io_before = _read_bytes()
    started = time.perf_counter()
    for f in range(tokens):
        if f == cold_tokens and not warm:
            cold_seconds = time.perf_counter() - started
        llm.eval([3 + f])
    seconds = time.perf_counter() - started
    cold = cold_tokens if cold_seconds else 0
    result = {
        "tokens": tokens,
        "rows": len(trace),
        "seconds": seconds,
        "wait_s": 0.0,
        "cold_tokens": cold,
        "cold_seconds": cold_seconds,
        "tokens_per_s": tokens / seconds,
        "steady_tokens_per_s": (tokens - cold) / (seconds - cold_seconds),
        "cold_tokens_per_s": cold / cold_seconds if cold_seconds else float("nan"),
        "read_bytes": _read_bytes() - io_before,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 8 or sys.argv[1] != "run":
        raise SystemExit(__doc__.split("\n")[2])
    _, _, path, name, max_tok, cold_tok, warm_flag, _slots = sys.argv
    run(path, name, int(max_tok), int(cold_tok), warm_flag == "1")
