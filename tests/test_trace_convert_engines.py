"""`vllm-routed-experts` / `sglang-routed-experts`: the engines' returned routing, as they save it.

The files are written the way the engines write them: ``np.save`` of the array (vLLM's
``routed_experts``), its ``.npy`` bytes in base64 inside an OpenAI response (vLLM's server), and
raw int32 bytes in base64 under ``meta_info`` (SGLang). tests/test_vllm.py converts files a
real vLLM returned.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expertd.traces.convert import ConvertOptions, convert
from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, TraceFormatError, read_trace
from expertd.traces.vllm_record import write_trace

RNG = np.random.default_rng(0)
EXPERTS, LAYERS, K = 16, 3, 4


def routing(tokens: int, dtype: str = "uint8") -> np.ndarray:
    """[tokens, LAYERS, K] distinct ids per row, as an engine returns them."""
    rows = [RNG.permutation(EXPERTS)[:K] for _ in range(tokens * LAYERS)]
    return np.array(rows, dtype=dtype).reshape(tokens, LAYERS, K)


def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def convert_to(fmt: str, src: Path, tmp_path: Path, **options: object):
    out = tmp_path / "out.etrace"
    convert(fmt, src, out, ConvertOptions(**{"num_experts": EXPERTS, **options}))
    return read_trace(out)


def rows_of(trace, request: int) -> np.ndarray:
    """A request's experts back as [tokens, layers, k]."""
    mine = trace.request == request
    return trace.experts[mine].reshape(-1, trace.meta.num_layers, trace.meta.top_k)


def test_npy_files_become_one_request_each_in_token_order(tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    arrays = {"2": routing(5), "10": routing(3, "int32")}
    for stem, array in arrays.items():
        np.save(dump / f"{stem}.npy", array)
    trace = convert_to("vllm-routed-experts", dump, tmp_path)
    assert trace.meta.requests == ["dump/2", "dump/10"]  # natural order
    assert (trace.meta.num_layers, trace.meta.top_k, trace.meta.num_experts) == (LAYERS, K, EXPERTS)
    assert not trace.meta.has_phase  # a bare array does not say where the prompt ends
    for request, stem in enumerate(arrays):
        assert np.array_equal(rows_of(trace, request), arrays[stem])
    trace.validate()


def test_an_openai_response_gives_one_request_per_choice(tmp_path: Path) -> None:
    first, second = routing(6, "uint16"), routing(2)
    response = {
        "object": "text_completion",
        "choices": [
            {"index": 0, "routed_experts": npy_b64(first)},
            {"index": 1, "routed_experts": npy_b64(second)},
        ],
    }
    (tmp_path / "resp.json").write_text(json.dumps(response))
    trace = convert_to("vllm-routed-experts", tmp_path / "resp.json", tmp_path, model="m")
    assert trace.meta.requests == [f"{tmp_path.name}/resp/0", f"{tmp_path.name}/resp/1"]
    assert np.array_equal(rows_of(trace, 0), first) and np.array_equal(rows_of(trace, 1), second)
    assert trace.meta.model == "m"


def test_a_prompt_split_marks_prefill_and_decode(tmp_path: Path) -> None:
    prompt, generated = routing(4), routing(3)
    obj = {"prompt_routed_experts": prompt.tolist(), "routed_experts": npy_b64(generated)}
    (tmp_path / "r.json").write_text(json.dumps(obj))
    trace = convert_to("vllm-routed-experts", tmp_path / "r.json", tmp_path)
    assert trace.meta.has_phase
    assert np.array_equal(rows_of(trace, 0), np.concatenate([prompt, generated]))
    per_token = trace.phase[:: trace.meta.num_layers]
    assert per_token.tolist() == [PHASE_PREFILL] * 4 + [PHASE_DECODE] * 3


def test_sglang_raw_int32_is_shaped_by_layers_and_top_k(tmp_path: Path) -> None:
    array = routing(5, "int32")
    responses = [{"text": "", "meta_info": {"routed_experts": base64.b64encode(array.tobytes()).decode()}}]
    (tmp_path / "s.json").write_text(json.dumps(responses))
    trace = convert_to("sglang-routed-experts", tmp_path / "s.json", tmp_path, num_layers=LAYERS, top_k=K)
    assert np.array_equal(rows_of(trace, 0), array)
    with pytest.raises(TraceFormatError, match="pass --layers and --top-k"):
        convert_to("sglang-routed-experts", tmp_path / "s.json", tmp_path)
    with pytest.raises(TraceFormatError, match="not a whole number of tokens of 7 layers"):
        convert_to("sglang-routed-experts", tmp_path / "s.json", tmp_path, num_layers=7, top_k=K)


def write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))
    return path


NPY_HEADER_ONLY = b"\x93NUMPY\x01\x00v\x00{'descr': '<i4', 'fortran_order': False, 'shape': (99999, 48, 8), }"
BAD = {
    "out of range": (
        "a.npy", np.full((2, LAYERS, K), EXPERTS, np.int32), "token 0 layer 0: expert id 16 out of range"
    ),
    "duplicate": ("a.npy", np.zeros((1, LAYERS, K), np.int32), "duplicate expert id 0"),
    "negative": ("a.json", [[[-1, 1, 2, 3]] * LAYERS], "expert id -1 out of range"),
    "float ids": ("a.npy", routing(2).astype(np.float32), "expert ids are float32, expected an integer"),
    "rank": ("a.npy", np.arange(8, dtype=np.int32), "shape [8], expected [tokens, layers, top_k]"),
    "top-k too big": ("a.npy", np.zeros((1, 1, 65), np.int32), "1 layers x top-65 is out of bounds"),
    "empty": ("a.npy", np.zeros((0, LAYERS, K), np.int32), "no tokens"),
    "pickle": ("a.npy", np.array([{"x": 1}], dtype=object), "not a .npy array"),
    "truncated": ("a.npy", NPY_HEADER_ONLY, "not a .npy array"),
    "not base64": ("a.json", {"routed_experts": "@@@"}, "not base64"),
    "base64 of junk": ("a.json", {"routed_experts": base64.b64encode(b"junk").decode()}, "not a .npy array"),
    "no routing": (
        "a.json", {"choices": [{"text": "x", "routed_experts": None}]}, "--enable-return-routed-experts"
    ),
    "not json": ("a.json", b"{nope", "not JSON"),
    "ragged": ("a.json", [[[0, 1, 2, 3]], [[0, 1]]], "expected base64 .npy text or a [tokens][layers][k]"),
    "a string": ("a.json", "hello", "expected a list or an object, got str"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_dumps_are_refused_by_name_and_leave_no_file(case: str, tmp_path: Path) -> None:
    name, content, message = BAD[case]
    src = write(tmp_path, name, content)
    out = tmp_path / "out" / "x.etrace"
    out.parent.mkdir()
    with pytest.raises(TraceFormatError, match=message.replace("[", r"\[").replace("(", r"\(")):
        convert("vllm-routed-experts", src, out, ConvertOptions(num_experts=EXPERTS))
    assert list(out.parent.iterdir()) == []


def test_requests_must_agree_on_layers_and_top_k(tmp_path: Path) -> None:
    np.save(tmp_path / "1.npy", routing(2))
    np.save(tmp_path / "2.npy", routing(2)[:, :2])
    with pytest.raises(TraceFormatError, match="2 layers x top-4; the first request has 3 x 4"):
        convert_to("vllm-routed-experts", tmp_path, tmp_path)


def test_the_expert_count_is_required(tmp_path: Path) -> None:
    np.save(tmp_path / "1.npy", routing(2))
    with pytest.raises(TraceFormatError, match="pass --experts"):
        convert("vllm-routed-experts", tmp_path / "1.npy", tmp_path / "o.etrace", ConvertOptions())


class _Completion:
    def __init__(self, routed: np.ndarray) -> None:
        self.routed_experts = routed


class _RequestOutput:
    """The two fields of vLLM's RequestOutput the recorder reads (vLLM itself: tests/test_vllm.py)."""

    def __init__(self, request_id: str, prompt: int, routed: np.ndarray) -> None:
        self.request_id, self.prompt_token_ids = request_id, list(range(prompt))
        self.outputs = [_Completion(routed)]


def test_the_recorder_marks_each_prompt_as_prefill(tmp_path: Path) -> None:
    a, b = routing(7), routing(4)
    path = write_trace([_RequestOutput("0", 5, a), _RequestOutput("1", 1, b)], tmp_path / "r.etrace",
                       num_experts=EXPERTS, model="tiny", extra={"engine": "vllm"})  # fmt: skip
    trace = read_trace(path)
    assert trace.meta.requests == ["0", "1"] and trace.meta.model == "tiny"
    assert trace.meta.extra == {"engine": "vllm"}
    assert np.array_equal(rows_of(trace, 0), a) and np.array_equal(rows_of(trace, 1), b)
    phases = trace.phase[:: trace.meta.num_layers].tolist()
    assert phases == [PHASE_PREFILL] * 5 + [PHASE_DECODE] * 2 + [PHASE_PREFILL] + [PHASE_DECODE] * 3
    with pytest.raises(TraceFormatError, match="request x: 4 routed tokens for a prompt of 9"):
        write_trace([_RequestOutput("x", 9, b)], tmp_path / "bad.etrace", num_experts=EXPERTS)


def test_the_cli_converts_and_names_a_bad_file(tmp_path: Path) -> None:
    np.save(tmp_path / "1.npy", routing(3))
    cli = [sys.executable, "-m", "expertd.daemon", "trace", "convert", "-f", "vllm-routed-experts"]
    ok = subprocess.run([*cli, str(tmp_path / "1.npy"), "-o", str(tmp_path / "o.etrace"), "--experts", "16"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "9 rows, 3 tokens, 1 requests" in ok.stdout
    bad = subprocess.run([*cli, str(tmp_path / "1.npy"), "-o", str(tmp_path / "p.etrace"), "--experts", "4"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "out of range [0, 4)" in bad.stderr
