"""`vllm-routed-experts`, `sglang-routed-experts`: the routing vLLM and SGLang return per request.

Both engines, started with ``--enable-return-routed-experts``, hand back each finished
sequence's routing: every token's top-k expert ids at every MoE layer, ``[tokens, layers, k]``.

- vLLM (0.32): ``CompletionOutput.routed_experts``, a NumPy integer array (uint8, uint16 or
  int32, by expert count) covering the prompt then the generated tokens but the last; its
  OpenAI server returns it per choice as base64 of the array's ``.npy`` bytes. Older layouts
  split off the prompt's rows as ``prompt_routed_experts``.
- SGLang: ``meta_info["routed_experts"]``, base64 of the raw int32 buffer, with no shape:
  ``--layers`` and ``--top-k`` give it.

Files read (SRC is one file or a directory of them; each request is named ``folder/stem``,
with ``/N`` for the N-th of several in one file):

- ``.npy``: one request, an integer array ``[tokens, layers, k]`` (``np.save`` of the output);
- ``.json``: a nested list ``[tokens][layers][k]``; an object with ``routed_experts`` (a
  base64 ``.npy`` string or a nested list) and optionally ``prompt_routed_experts``; an
  OpenAI completion response (one request per choice); SGLang's response object(s) with
  ``meta_info.routed_experts``; or a list of such objects.

Neither engine records the expert count: ``--experts`` is required. Rows from
``prompt_routed_experts`` are prefill and the rest decode when every request has that split
(`expertd.traces.vllm_record` knows each prompt's length and marks phases itself); otherwise
the trace has no phase column. Input is untrusted: dtype, rank, sizes, ids and duplicates are
checked before a row is written, and no pickle is ever loaded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expertd.traces.convert import (
    ConvertOptions,
    converter,
    expert_problem,
    int_array,
    make_meta,
    natural_key,
    progress,
)
from expertd.traces.format import (
    MAX_LAYERS,
    MAX_TOP_K,
    PHASE_DECODE,
    PHASE_PREFILL,
    TraceFormatError,
    TraceWriter,
)

MAX_FILE_BYTES = 4 << 30  # one dump file; larger ones are refused before they are read
SUFFIXES = (".npy", ".json")


@dataclass
class Routed:
    """One request's routing: experts [T, L, k] int64; the first ``prompt`` rows are prefill."""

    name: str
    experts: np.ndarray
    prompt: int | None  # None: the dump does not say where the prompt ends


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted((p for p in src.rglob("*") if p.suffix in SUFFIXES and p.is_file()), key=natural_key)
    if not files:
        raise TraceFormatError(f"{src}: no .npy or .json files in this directory")
    return files


def checked(where: str, array: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``array`` as int64 [T, L, k] after the checks no malformed dump passes."""
    if array.dtype.kind not in "iu":
        raise TraceFormatError(f"{where}: expert ids are {array.dtype}, expected an integer dtype")
    if array.ndim != 3:
        raise TraceFormatError(f"{where}: shape {list(array.shape)}, expected [tokens, layers, top_k]")
    tokens, layers, k = array.shape
    if not 1 <= layers <= MAX_LAYERS or not 1 <= k <= MAX_TOP_K:
        raise TraceFormatError(f"{where}: {layers} layers x top-{k} is out of bounds")
    if shape is not None and (layers, k) != shape:
        raise TraceFormatError(
            f"{where}: {layers} layers x top-{k}; the first request has {shape[0]} x {shape[1]}"
        )
    return np.asarray(array, dtype=np.int64)


def check_request(
    name: str,
    where: str,
    experts: np.ndarray,
    prompt: int | None,
    shape: tuple[int, ...] | None,
    num_experts: int,
) -> Routed:
    """One request's routing, checked: rank, dtype, sizes, ``shape`` (L, k) if set, ids in range
    and distinct per row, ``prompt`` within its tokens. Stored as int16 until written."""
    experts = checked(where, experts, shape)
    if not len(experts):
        raise TraceFormatError(f"{where}: no tokens")
    if prompt is not None and not 0 <= prompt <= len(experts):
        raise TraceFormatError(f"{where}: {len(experts)} routed tokens for a prompt of {prompt}")
    layers, k = experts.shape[1:]
    problem = expert_problem(experts.reshape(-1, k), num_experts)
    if problem:
        token, layer = divmod(problem[0], layers)
        raise TraceFormatError(f"{where}: token {token} layer {layer}: {problem[1]}")
    return Routed(name, experts.astype(np.int16), prompt)


def _npy(where: str, data: bytes | Path) -> np.ndarray:
    """A ``.npy`` array, never a pickle; `TraceFormatError` for anything else."""
    try:
        if isinstance(data, Path):
            return np.load(data, mmap_mode="r", allow_pickle=False)
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise TraceFormatError(f"{where}: not a .npy array ({str(exc).splitlines()[0][:120]})") from None


def _b64(where: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TraceFormatError(f"{where}: not base64") from None


def _vllm_array(where: str, value: Any) -> np.ndarray:
    """vLLM's routed_experts: a base64 ``.npy`` string or nested lists."""
    if isinstance(value, str):
        return _npy(where, _b64(where, value))
    array = int_array(value, 3)
    if array is None:
        raise TraceFormatError(f"{where}: expected base64 .npy text or a [tokens][layers][k] list of ints")
    return array


def _sglang_array(where: str, value: Any, options: ConvertOptions) -> np.ndarray:
    """SGLang's routed_experts: base64 of raw little-endian int32, shaped by --layers and --top-k."""
    if options.num_layers is None or options.top_k is None:
        raise TraceFormatError(f"{where}: SGLang's routing has no shape: pass --layers and --top-k")
    if not isinstance(value, str):
        raise TraceFormatError(f"{where}: expected base64 text")
    raw = _b64(where, value)
    per_token = options.num_layers * options.top_k
    if len(raw) % (4 * per_token):
        raise TraceFormatError(
            f"{where}: {len(raw)} bytes is not a whole number of tokens of {options.num_layers} layers x "
            f"top-{options.top_k} int32"
        )
    return np.frombuffer(raw, dtype="<i4").reshape(-1, options.num_layers, options.top_k)


def _from_object(
    where: str, obj: Any, engine: str, options: ConvertOptions
) -> Iterator[tuple[str, Any, Any]]:
    """(suffix, routed, prompt rows or None) of each request in one parsed JSON value."""
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for i, item in enumerate(obj):
            for suffix, routed, prompt in _from_object(f"{where}[{i}]", item, engine, options):
                yield f"/{i}{suffix}", routed, prompt
        return
    if engine == "sglang":
        meta = obj.get("meta_info") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or "routed_experts" not in meta:
            raise TraceFormatError(f"{where}: expected SGLang response objects with meta_info.routed_experts")
        yield "", _sglang_array(f"{where}.meta_info.routed_experts", meta["routed_experts"], options), None
        return
    if isinstance(obj, list):
        yield "", _vllm_array(where, obj), None
        return
    if not isinstance(obj, dict):
        raise TraceFormatError(f"{where}: expected a list or an object, got {type(obj).__name__}")
    if isinstance(obj.get("choices"), list):  # an OpenAI completion response
        for i, choice in enumerate(obj["choices"]):
            if not isinstance(choice, dict) or choice.get("routed_experts") is None:
                raise TraceFormatError(
                    f"{where}.choices[{i}]: no routed_experts (was the server started with "
                    "--enable-return-routed-experts?)"
                )
            yield f"/{i}", _vllm_array(f"{where}.choices[{i}].routed_experts", choice["routed_experts"]), None
        return
    if obj.get("routed_experts") is None:
        raise TraceFormatError(f"{where}: no routed_experts key")
    routed = _vllm_array(f"{where}.routed_experts", obj["routed_experts"])
    prompt = obj.get("prompt_routed_experts")
    if prompt is None:
        yield "", routed, None
        return
    yield "", routed, _vllm_array(f"{where}.prompt_routed_experts", prompt)


def read_requests(src: Path, engine: str, options: ConvertOptions) -> Iterator[Routed]:
    """Every request under ``src``, checked (shape consistent across requests, ids in range)."""
    if options.num_experts is None:
        raise TraceFormatError(f"{src}: {engine}'s routing does not record the expert count: pass --experts")
    shape: tuple[int, int] | None = None
    for path in _files(src):
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TraceFormatError(f"{path}: {path.stat().st_size} bytes is over the {MAX_FILE_BYTES} limit")
        name = f"{path.parent.name}/{path.stem}"
        if path.suffix == ".npy":
            if engine == "sglang":
                raise TraceFormatError(f"{path}: SGLang returns JSON; .npy files are vLLM's")
            parts: Iterator[tuple[str, Any, Any]] = iter([("", _npy(str(path), path), None)])
        else:
            try:
                obj = json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise TraceFormatError(f"{path}: not JSON ({exc})") from None
            parts = _from_object(str(path), obj, engine, options)
        for suffix, routed, prompt in parts:
            where = f"{path}{suffix}"
            if prompt is not None:
                prompt = checked(f"{where} (prompt_routed_experts)", prompt, shape)
                routed = np.concatenate([prompt, checked(where, routed, prompt.shape[1:])])
            request = check_request(name + suffix, where, routed, None if prompt is None else len(prompt),
                                    shape, options.num_experts)  # fmt: skip
            shape = request.experts.shape[1:]
            yield request


def write_requests(
    out: Path, requests: list[Routed], options: ConvertOptions, source: str, **meta: Any
) -> None:
    """Write checked ``requests`` as a trace (phases if every request knows its prompt length)."""
    if not requests:
        raise TraceFormatError(f"{source}: no request")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise TraceFormatError(f"{source}: two requests have the same name")
    _, layers, k = requests[0].experts.shape
    has_phase = all(r.prompt is not None for r in requests)
    fields = {"model": "unknown", "num_layers": layers, "num_experts": options.num_experts, "top_k": k}
    trace_meta = make_meta(options, **{**fields, **meta}, source=source, requests=names, has_phase=has_phase)
    with TraceWriter(out, trace_meta) as writer:
        for request, routed in enumerate(requests):
            tokens = len(routed.experts)
            phase = None
            if has_phase:
                assert routed.prompt is not None
                phase = np.repeat([PHASE_PREFILL, PHASE_DECODE], [routed.prompt, tokens - routed.prompt])
                phase = np.repeat(phase, layers)
            writer.append(
                request,
                np.repeat(np.arange(tokens), layers),
                np.tile(np.arange(layers), tokens),
                routed.experts.reshape(-1, k),
                phase=phase,
            )


def _convert(engine: str, src: Path, out: Path, options: ConvertOptions) -> None:
    files = _files(src)
    requests = list(progress(read_requests(src, engine, options), f"{engine}-routed-experts"))
    source = f"{engine}-routed-experts: {len(files)} files under {src.name}"
    write_requests(out, requests, options, source)


@converter("vllm-routed-experts", "vLLM routed_experts [tokens, layers, k]: .npy, or JSON (OpenAI responses)")
def convert_vllm(src: Path, out: Path, options: ConvertOptions) -> None:
    _convert("vllm", src, out, options)


@converter("sglang-routed-experts", "SGLang meta_info.routed_experts (base64 int32): --layers, --top-k")
def convert_sglang_routed(src: Path, out: Path, options: ConvertOptions) -> None:
    _convert("sglang", src, out, options)
