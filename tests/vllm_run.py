"""Run a real vLLM `LLM` on token-id prompts, greedy, and print what it generated as one JSON line.

    python tests/vllm_run.py MODEL_DIR '[[84, 104], [97]]' --max-tokens 8

A script, not an import: each run gets fresh vLLM processes, so ``EXPERTD_VLLM`` in its
environment decides whether expertd serves the experts (the plugin reads it at start).
Tiny models have no tokenizer (their vocabulary is bytes): prompts are token ids.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

#: vLLM's CPU backend: a small KV cache (GiB), and no pinning of OpenMP threads to cores that
#: other processes share. Callers may override.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

#: The CPU attention kernels take head sizes from 32 up: the tiny models get 2 heads of 32.
CPU_OVERRIDES = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}


def engine_args(model_dir: str, dtype: str, tp: int = 1) -> dict:
    """What every test engine is started with (small, eager: no compile on a 2-core machine);
    ``tp`` > 1: tensor parallel ranks in processes of vLLM's mp executor (gloo on the CPU)."""
    parallel = {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"} if tp > 1 else {}
    return {
        **parallel,
        "model": model_dir,
        "skip_tokenizer_init": True,
        "dtype": dtype,
        "max_model_len": 128,
        "enforce_eager": True,
        "max_num_seqs": 4,
        "seed": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("prompts", help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--record", metavar="DIR", help="also save each routed_experts .npy and trace.etrace")
    args = parser.parse_args()
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams

    extra = {"enable_return_routed_experts": True} if args.record else {}
    llm = LLM(**engine_args(args.model_dir, args.dtype, args.tp), **extra)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=0, detokenize=False)
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(args.prompts)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for output in outputs:
        done = output.outputs[0]
        chosen = [step[token].logprob for step, token in zip(done.logprobs, done.token_ids, strict=True)]
        result.append({"tokens": list(done.token_ids), "logprobs": chosen})
    if args.record:
        import numpy as np

        from expertd.traces.vllm_record import write_trace

        for output in outputs:
            np.save(f"{args.record}/{output.request_id}.npy", output.outputs[0].routed_experts)
        config = json.loads(Path(args.model_dir, "config.json").read_text())
        experts = config.get("num_experts") or config["num_local_experts"]
        write_trace(outputs, f"{args.record}/trace.etrace", num_experts=experts, model="tiny")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
