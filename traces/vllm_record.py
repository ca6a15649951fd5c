"""Write vLLM's returned routing straight to an `.etrace`: `write_trace(outputs, path, ...)`.

    llm = LLM(MODEL_DIR, enable_return_routed_experts=True)
    outputs = llm.generate(prompts, params)
    write_trace(outputs, "prod.etrace", num_experts=128, model="Qwen/Qwen3-30B-A3B")
    # expertd replay prod.etrace --timed

Each finished request's ``outputs[0].routed_experts`` (``[prompt + generated - 1, layers, k]``)
becomes one request of the trace; its first ``len(prompt_token_ids)`` rows are prefill, the
rest decode. The arrays are checked exactly as `expertd trace convert --format
vllm-routed-experts` checks a dump (they are the same code). vLLM is not imported here: any
objects with those attributes do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from expertd.traces.convert import ConvertOptions
from expertd.traces.convert_engines import Routed, check_request, write_requests
from expertd.traces.format import TraceFormatError


def routed_requests(outputs: Iterable[Any], num_experts: int) -> list[Routed]:
    """vLLM ``RequestOutput`` s as checked `Routed` requests named by their request ids."""
    requests: list[Routed] = []
    for output in outputs:
        where = f"request {output.request_id}"
        if not output.outputs or getattr(output.outputs[0], "routed_experts", None) is None:
            raise TraceFormatError(
                f"{where}: no routed_experts (start vLLM with enable_return_routed_experts)"
            )
        experts = np.asarray(output.outputs[0].routed_experts)
        prompt = len(output.prompt_token_ids or ())
        shape = requests[0].experts.shape[1:] if requests else None
        requests.append(check_request(str(output.request_id), where, experts, prompt, shape, num_experts))
    return requests


def write_trace(
    outputs: Iterable[Any],
    path: str | os.PathLike[str],
    *,
    num_experts: int,
    model: str = "unknown",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the routing of vLLM ``outputs`` (finished ``RequestOutput`` s) to ``path``."""
    requests = routed_requests(outputs, num_experts)
    options = ConvertOptions(model=model, num_experts=num_experts)
    write_requests(Path(path), requests, options, "expertd.traces.vllm_record", extra=extra or {})
    return Path(path)
