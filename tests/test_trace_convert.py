"""Converters: each format on small generated inputs, on the real dumps when ../shared has them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from expertd.traces import list_shipped, shipped
from expertd.traces.convert import SHARED_RAW, ConvertOptions, convert, formats
from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, TraceFormatError, read_trace

RNG = np.random.default_rng(0)


def top(experts: int, k: int) -> list[int]:
    return [int(e) for e in RNG.permutation(experts)[:k]]


def run(fmt: str, src: Path, tmp_path: Path, **options: object):
    out = tmp_path / "out.etrace"
    convert(fmt, src, out, ConvertOptions(**options))
    return read_trace(out)


def fails(fmt: str, src: Path, tmp_path: Path) -> str:
    """The one-line error of a failed conversion; it must leave no file behind."""
    out = tmp_path / "out" / "x.etrace"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(TraceFormatError) as info:
        convert(fmt, src, out, ConvertOptions())
    assert list(out.parent.iterdir()) == []
    assert "\n" not in str(info.value)
    return str(info.value)


def shared(folder: str) -> Path:
    path = SHARED_RAW / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the raw traces are not redistributed)")
    return path


def assert_token_order(trace) -> None:
    trace.validate()
    assert trace.num_tokens() * trace.meta.num_layers >= len(trace)


def test_registry_lists_the_formats() -> None:
    names = [c.name for c in formats()]
    assert names == [
        "granite-json", "mixtral-jsonl", "moe-beyond-csv", "sglang-json", "sglang-routed-experts",
        "vllm-routed-experts",
    ]  # fmt: skip


def test_unknown_format_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trace format 'nope' \\(known: granite-json"):
        convert("nope", tmp_path, tmp_path / "x.etrace", ConvertOptions())


# --- granite-json ---


def granite_doc(prompts: dict[str, tuple[int, int]], layers: int = 3, experts: int = 8, k: int = 2):
    doc = {"model": "g", "num_layers": layers, "num_experts": experts, "top_k": k, "prompts": {}}
    for name, (prompt, decode) in prompts.items():
        doc["prompts"][name] = {
            "prompt_len": prompt,
            "prefill": [[top(experts, k) for _ in range(layers)] for _ in range(prompt)],
            "decode": [[top(experts, k) for _ in range(layers)] for _ in range(decode)],
        }
    return doc


def test_granite_prompts_become_requests_prefill_then_decode(tmp_path: Path) -> None:
    doc = granite_doc({"prose": (2, 3), "code": (1, 2)})
    (tmp_path / "g.json").write_text(json.dumps(doc))
    trace = run("granite-json", tmp_path / "g.json", tmp_path, license="MIT")
    assert trace.meta.requests == ["prose", "code"]
    assert (trace.meta.num_layers, trace.meta.top_k, trace.meta.license) == (3, 2, "MIT")
    assert len(trace) == (5 + 3) * 3
    first = trace.select(trace.request == 0)
    assert first.token.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert first.layer.tolist() == [0, 1, 2] * 5
    assert first.phase.tolist() == [PHASE_PREFILL] * 6 + [PHASE_DECODE] * 9
    assert first.experts[3].tolist() == doc["prompts"]["prose"]["prefill"][1][0]
    assert first.experts[-1].tolist() == doc["prompts"]["prose"]["decode"][2][2]


def test_granite_errors_name_the_element(tmp_path: Path) -> None:
    doc = granite_doc({"p": (2, 2)})
    doc["prompts"]["p"]["decode"][1][2] = [3, 9]
    (tmp_path / "g.json").write_text(json.dumps(doc))
    message = fails("granite-json", tmp_path / "g.json", tmp_path)
    assert message.endswith("g.json: prompts.p.decode[1][2]: expert id 9 out of range [0, 8)")
    doc = granite_doc({"p": (2, 2)})
    doc["prompts"]["p"]["prompt_len"] = 5
    (tmp_path / "g.json").write_text(json.dumps(doc))
    message = fails("granite-json", tmp_path / "g.json", tmp_path)
    assert message.endswith("prompts.p: prompt_len 5 but 2 prefill positions")
    (tmp_path / "g.json").write_text('{"prompts": ')
    assert "g.json:1: not JSON" in fails("granite-json", tmp_path / "g.json", tmp_path)


def test_granite_real_trace_counts(tmp_path: Path) -> None:
    src = shared("justinchuby__onnx-genai") / "scripts" / "moe_expert_trace.json"
    trace = run("granite-json", src, tmp_path)
    assert trace.meta.requests == ["english_prose", "code", "math"]
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (24, 32, 8)
    prefill = trace.select(trace.phase == PHASE_PREFILL)
    assert (prefill.num_tokens(), trace.num_tokens() - prefill.num_tokens()) == (112, 192)
    assert len(trace) == 304 * 24
    assert_token_order(trace)


def test_shipped_granite_trace_matches_a_fresh_conversion(tmp_path: Path) -> None:
    assert list_shipped() == ["granite-3.0-1b-a400m"]
    trace = read_trace(shipped())
    assert trace.meta.license.startswith("MIT")
    assert trace.num_tokens() == 304 and len(trace.meta.requests) == 3
    src = SHARED_RAW / "justinchuby__onnx-genai" / "scripts" / "moe_expert_trace.json"
    if src.is_file():
        np.testing.assert_array_equal(run("granite-json", src, tmp_path).experts, trace.experts)
    with pytest.raises(ValueError, match="no shipped trace 'nope'"):
        shipped("nope")


# --- sglang-json ---


def sglang_steps(prefill: int, decode: int, experts: int = 16, dense=(0, 2), moe=(1, 3)):
    steps = []
    for count in [prefill] + [1] * decode:
        step = {str(layer): None for layer in dense}
        step.update({str(layer): [[top(experts, 1)[0]] for _ in range(count)] for layer in moe})
        steps.append(dict(sorted(step.items(), key=lambda item: int(item[0]))))
    return steps


def write_sglang(root: Path, files: dict[str, list]) -> Path:
    for name, steps in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(steps))
    return root


def test_sglang_folders_of_requests_in_natural_order(tmp_path: Path) -> None:
    files = {"src/b/10.json": sglang_steps(2, 1), "src/b/2.json": sglang_steps(3, 2)}
    files["src/a/0.json"] = sglang_steps(1, 3)
    write_sglang(tmp_path, files)
    trace = run("sglang-json", tmp_path / "src", tmp_path, num_experts=16)
    assert trace.meta.requests == ["a/0", "b/2", "b/10"]
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (2, 16, 1)
    assert trace.meta.extra["moe_layer_ids"] == [1, 3]
    b2 = trace.select(trace.request == 1)
    assert b2.token.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert b2.layer.tolist() == [0, 1] * 5
    assert b2.phase.tolist() == [PHASE_PREFILL] * 6 + [PHASE_DECODE] * 4
    steps = files["src/b/2.json"]
    assert b2.experts[:, 0].tolist()[:4] == [
        steps[0]["1"][0][0],
        steps[0]["3"][0][0],
        steps[0]["1"][1][0],
        steps[0]["3"][1][0],
    ]


def test_sglang_single_file_is_named_folder_stem(tmp_path: Path) -> None:
    write_sglang(tmp_path, {"subj/7.json": sglang_steps(2, 2)})
    trace = run("sglang-json", tmp_path / "subj" / "7.json", tmp_path)
    assert trace.meta.requests == ["subj/7"]
    assert trace.meta.num_experts == 128


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda s: s[1].update({"1": [[200]]}), "step 1 layer 1 token 0: expert id 200 out of range"),
        (lambda s: s[1].update({"2": [[1]]}), "step 1: MoE layers [1, 2, 3] differ from [1, 3]"),
        (lambda s: s[0].update({"3": [[1]]}), "step 0 layer 3: 1 tokens, layer 1 has 2"),
        (lambda s: s[2].update({"3": [["x"]]}), "step 2 layer 3: expected a list of [1 expert ids]"),
    ],
)
def test_sglang_errors_name_file_step_and_layer(tmp_path: Path, edit, problem: str) -> None:
    write_sglang(tmp_path, {"src/s/0.json": sglang_steps(2, 2)})
    steps = sglang_steps(2, 2)
    edit(steps)
    write_sglang(tmp_path, {"src/s/1.json": steps})
    message = fails("sglang-json", tmp_path / "src", tmp_path)
    assert f"s/1.json: {problem}" in message


def test_sglang_real_subject_folder(tmp_path: Path) -> None:
    src = shared("andronius-yang__cse223b-proj") / "llama4-mmlu-abstract_algebra"
    trace = run("sglang-json", src, tmp_path)
    assert len(trace.meta.requests) == 100
    assert trace.meta.requests[:3] == [f"llama4-mmlu-abstract_algebra/{i}" for i in range(3)]
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (24, 128, 1)
    first = trace.select(trace.request == 0)  # the README's example: 25 prefill + 128 decode
    assert first.num_tokens() == 153
    assert first.select(first.phase == PHASE_PREFILL).num_tokens() == 25
    assert_token_order(trace)


@pytest.mark.slow
def test_sglang_real_llama4_totals(tmp_path: Path) -> None:
    trace = run("sglang-json", shared("andronius-yang__cse223b-proj"), tmp_path)
    assert len(trace.meta.requests) == 387
    assert trace.num_tokens() == 56_089
    assert len(trace) == 1_346_136
    prefill = trace.select(trace.phase == PHASE_PREFILL)
    assert prefill.num_tokens() == 7_255
    assert trace.meta.extra["moe_layer_ids"] == list(range(1, 48, 2))
    assert int(trace.experts.max()) < 128


# --- mixtral-jsonl ---


def mixtral_line(problem: int, layer: int, pos: int, raw: bool, dataset: str = "humaneval") -> str:
    record = {"dataset": dataset, "problem_id": problem, "layer": layer}
    record["token_pos" if raw else "token_idx"] = pos
    record["experts"] = top(8, 2)
    record["gating_probs"] = [0.7, 0.3]
    return json.dumps(record)


def write_processed(path: Path, problems: dict[int, int], drop=(), dataset="humaneval") -> None:
    """Layer-major processed records; a dropped (problem, layer, token) shifts that layer's tail."""
    lines = []
    for problem, tokens in problems.items():
        for layer in range(32):
            kept = [t for t in range(tokens) if (problem, layer, t) not in drop]
            lines += [mixtral_line(problem, layer, i, False, dataset) for i in range(len(kept))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_raw(path: Path, problem: int, prompt: int, decode: int, drop=()) -> None:
    """Forward order: the prefill pass layer by layer, then one pass per decode token."""
    lines = [
        mixtral_line(problem, layer, pos, True)
        for layer in range(32)
        for pos in range(prompt)
        if (0, layer, pos) not in drop
    ]
    for step in range(1, decode + 1):
        lines += [mixtral_line(problem, layer, 0, True) for layer in range(32)
                  if (step, layer, 0) not in drop]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_mixtral_prefers_raw_forward_order_and_counts_missing_cells(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_processed(src / "processed" / "humaneval_routing.jsonl", {0: 5, 1: 4}, drop={(1, 3, 2)})
    write_raw(src / "deep" / "routing_raw.jsonl", 0, prompt=3, decode=4, drop={(0, 5, 1), (2, 31, 0)})
    (src / "processed" / "humaneval_outputs.jsonl").write_text('{"problem_id": 0, "prompt": "x"}\n')
    trace = run("mixtral-jsonl", src, tmp_path)
    assert trace.meta.requests == ["humaneval/0", "humaneval/1"]
    assert trace.meta.extra["request_files"] == {
        "humaneval/0": "routing_raw.jsonl",
        "humaneval/1": "humaneval_routing.jsonl",
    }
    assert trace.meta.extra["ignored_processed_files"] == {"humaneval/0": "humaneval_routing.jsonl"}
    assert trace.meta.extra["missing_cells_by_request"] == {"humaneval/0": 2, "humaneval/1": 1}
    raw = trace.select(trace.request == 0)
    assert raw.num_tokens() == 7
    assert raw.select(raw.phase == PHASE_PREFILL).num_tokens() == 3
    assert len(raw) == 7 * 32 - 2
    assert not ((raw.token == 1) & (raw.layer == 5)).any()  # dropped prefill cell stays missing
    assert not ((raw.token == 4) & (raw.layer == 31)).any()  # decode pass 2 is token 3 + 2 - 1
    processed = trace.select(trace.request == 1)
    assert processed.num_tokens() == 4 and len(processed) == 4 * 32 - 1
    assert set(processed.phase.tolist()) == {PHASE_DECODE}
    assert trace.scores.dtype == np.float32
    assert_token_order(trace)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "humaneval_routing.jsonl:2: not JSON"),
        ('{"dataset": "h", "problem_id": 0, "layer": 40, "token_idx": 0, "experts": [0, 1], '
         '"gating_probs": [0.6, 0.4]}', "humaneval_routing.jsonl:2: layer 40 out of range [0, 32)"),
        ('{"dataset": "h", "problem_id": 0, "layer": 1, "token_idx": 0, "experts": [0], '
         '"gating_probs": [0.6, 0.4]}', "'experts' must be a list of 2 integers"),
        ('{"dataset": "h", "problem_id": 0, "layer": 1, "token_idx": 0, "experts": [3, 3], '
         '"gating_probs": [0.6, 0.4]}', "humaneval_routing.jsonl:2: duplicate expert id 3"),
        ('{"dataset": "h", "problem_id": 0, "layer": 1, "token_idx": 0, "experts": [3, 9], '
         '"gating_probs": [0.6, 0.4]}', "expert id 9 out of range [0, 8)"),
        ('{"dataset": "h", "problem_id": 0, "layer": 1, "token_idx": 0, "experts": [3, 4], '
         '"gating_probs": [NaN, 0.4]}', "'gating_probs' must be a list of 2 finite numbers"),
        ('{"dataset": "h", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [3, 4], '
         '"gating_probs": [0.6, 0.4]}', "humaneval_routing.jsonl:2: h/0 has token 0 at layer 0"),
    ],
)  # fmt: skip
def test_mixtral_errors_name_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    good = '{"dataset": "h", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], '
    good += '"gating_probs": [0.6, 0.4]}'
    (tmp_path / "humaneval_routing.jsonl").write_text(f"{good}\n{line}\n")
    assert problem in fails("mixtral-jsonl", tmp_path / "humaneval_routing.jsonl", tmp_path)


def test_mixtral_skips_a_cut_final_line_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "src" / "humaneval_routing.jsonl"
    write_processed(path, {0: 3})
    whole = run("mixtral-jsonl", path, tmp_path)
    cut = path.read_text()
    path.write_text(cut + cut.splitlines()[0][:40])  # a writer stopped 40 bytes into line 97
    trace = run("mixtral-jsonl", path, tmp_path)
    assert f"{path}:97: truncated final row skipped (not JSON" in capsys.readouterr().err
    assert trace.meta.extra["truncated_rows_skipped"] == [f"{path}:97"]
    assert np.array_equal(trace.experts, whole.experts) and len(trace) == 96
    path.write_text(cut + cut.splitlines()[0][:40] + "\n")  # a newline after it: not a cut, a bad line
    assert "humaneval_routing.jsonl:97: not JSON" in fails("mixtral-jsonl", path, tmp_path)


def test_mixtral_decode_pass_must_hold_one_token(tmp_path: Path) -> None:
    write_raw(tmp_path / "routing_raw.jsonl", 0, prompt=2, decode=1)
    text = (tmp_path / "routing_raw.jsonl").read_text().replace('"token_pos": 0', '"token_pos": 1')
    (tmp_path / "routing_raw.jsonl").write_text(text.replace('"token_pos": 1', '"token_pos": 0', 32))
    message = fails("mixtral-jsonl", tmp_path / "routing_raw.jsonl", tmp_path)
    assert "routing_raw.jsonl:65: humaneval/0 decode pass 1 has token_pos 1" in message


def test_mixtral_real_traces(tmp_path: Path) -> None:
    trace = run("mixtral-jsonl", shared("Mario928__speculative-moe"), tmp_path)
    assert trace.meta.requests == ["gsm8k/0", "gsm8k/1", "humaneval/0", "humaneval/1"]
    tokens = [trace.select(trace.request == r).num_tokens() for r in range(4)]
    assert tokens == [168, 79, 135 + 83, 255]  # the README's table; humaneval/0 from the raw file
    assert trace.meta.extra["missing_cells_by_request"] == {
        "gsm8k/0": 10,
        "gsm8k/1": 5,
        "humaneval/0": 4320 - 4198 + 77,  # prefill 135 x 32 cells, 4,198 rows; 77 decode dropped
        "humaneval/1": 29,
    }
    assert trace.select(trace.phase == PHASE_PREFILL).num_tokens() == 135
    assert np.allclose(trace.scores.sum(1), 1.0, atol=1e-5)
    assert_token_order(trace)


# --- moe-beyond-csv ---

CSV_HEADER = "Layer ID,Batch Number,Token,Activated Expert IDs\n"


def csv_text(layers: dict[int, list[list[int]]]) -> str:
    rows = [f'{layer},0,tok{i},"{ids}"' for layer, tokens in layers.items()
            for i, ids in enumerate(tokens)]  # fmt: skip
    return CSV_HEADER + "\n".join(rows) + "\n"


def test_csv_rows_grouped_by_layer_become_token_order(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "more").mkdir(parents=True)
    (src / "req0.csv").write_text(csv_text({1: [[3, 17], [4, 5], [1, 2]], 2: [[6, 7], [8, 9]]}))
    (src / "more" / "req1.csv").write_text(csv_text({1: [[0, 1]], 2: [[2, 3]]}))
    trace = run("moe-beyond-csv", src, tmp_path)
    assert trace.meta.requests == ["req0", "more/req1"]  # a folder's own files first
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (2, 64, 2)
    assert trace.meta.extra == {
        "moe_layer_ids": [1, 2],
        "missing_cells": 1,
        "missing_cells_by_request": {"req0": 1},
    }
    req0 = trace.select(trace.request == 0)
    assert req0.token.tolist() == [0, 0, 1, 1, 2]
    assert req0.layer.tolist() == [0, 1, 0, 1, 0]
    assert req0.experts.tolist() == [[3, 17], [6, 7], [4, 5], [8, 9], [1, 2]]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (csv_text({1: [[1, 2]], 2: [[3, 4]], 3: [[1, 5]]}), "layer 3 is not one of"),
        (csv_text({1: [[1, 2]], 2: [[3, 4, 5]]}), "b.csv:3: 3 expert ids, expected top-k 2"),
        (csv_text({1: [[1, 99]], 2: [[3, 4]]}), "b.csv:2: expert id 99 out of range [0, 64)"),
        (CSV_HEADER + '1,0,a,"[1, 2]"\n2,0,a,"[1, 2]"\n1,0,b,"[1, 3]"\n', "b.csv:4: layer 1 again"),
        (CSV_HEADER + 'x,0,a,"[1, 2]"\n', "b.csv:2: Layer ID 'x' is not an integer"),
        (CSV_HEADER + '1,0,a,"[1, "\n', "b.csv:2: Activated Expert IDs '[1, ' is not a list"),
        ("Layer,Token\n", "b.csv:1: missing column 'Layer ID'"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_text(csv_text({1: [[1, 2]], 2: [[3, 4]]}))
    (tmp_path / "src" / "b.csv").write_text(text)
    assert problem in fails("moe-beyond-csv", tmp_path / "src", tmp_path)


@pytest.mark.parametrize(
    ("tail", "problem"),
    [
        ('2,0,tok1,"[3, ', "Activated Expert IDs '[3, ' is not a list of ints"),  # cut inside the id list
        ("2,0,t", "3 fields, the header has 4"),  # cut in a field, no final newline
        ("2,0\n", "2 fields, the header has 4"),  # fewer fields than the header, even with a newline
    ],
)
def test_csv_truncated_final_row_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tail: str, problem: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text(csv_text({1: [[1, 2], [5, 6]], 2: [[3, 4], [7, 8]]}))
    (src / "b.csv").write_text(csv_text({1: [[1, 2], [5, 6]], 2: [[3, 4]]}) + tail)
    trace = run("moe-beyond-csv", src, tmp_path)
    where = f"{src / 'b.csv'}:5"
    assert f"warning: {where}: truncated final row skipped ({problem})" in capsys.readouterr().err
    assert trace.meta.extra["truncated_rows_skipped"] == [where]
    assert trace.meta.extra["missing_cells_by_request"] == {"b": 1}  # the cut row's cell, counted
    assert trace.select(trace.request == 1).experts.tolist() == [[1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (csv_text({1: [[1, 2]]}) + "2,0,x\n" + csv_text({2: [[3, 4]]})[len(CSV_HEADER) :],
         "b.csv:3: 3 fields, the header has 4"),  # a cut row that is not the last one
        (csv_text({1: [[1, 2]]}) + 'y,0,x,"[3, 4]"', "b.csv:3: Layer ID 'y' is not an integer"),  # whole, bad
    ],
)  # fmt: skip
def test_csv_malformed_rows_other_than_a_cut_last_one_still_fail(
    tmp_path: Path, text: str, problem: str
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_text(csv_text({1: [[1, 2]], 2: [[3, 4]]}))
    (tmp_path / "src" / "b.csv").write_text(text)
    assert problem in fails("moe-beyond-csv", tmp_path / "src", tmp_path)


def test_directory_without_the_formats_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    assert "no .csv files in this directory" in fails("moe-beyond-csv", tmp_path / "src", tmp_path)
