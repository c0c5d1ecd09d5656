"""Greedy generation with vLLM (run by tests/test_vllm.py with .venv-vllm's Python, not collected by pytest).

    python tests/vllm_generate.py JOB.json OUT.json

JOB: {"prompts": [[ids] …], "max_tokens": N,
      "runs": [{"name": NAME, "model": EXPORT, "engine": {LLM keyword arguments}, "repeat": R}, …]}
A run with "refused": true expects the engine to refuse the model: OUT holds [{"error": MESSAGE}] for it.
OUT: {NAME: [{"tokens": [[ids] …], "cached": [num_cached_tokens …], "spec": {speculative decoding counters}}
      per repeat]}
Every prompt of a run goes to vLLM in one call (continuous batching); float32, greedy, end-of-text ignored. "spec"
holds the pass's speculative-decoding counters (drafts, draft tokens, accepted tokens, accepted per draft position)
when the engine has a ``speculative_config``.
"""

from __future__ import annotations

import gc
import json
import sys

SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted",
                 "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_pos"}


def spec_counters(llm) -> dict:
    """The process's speculative-decoding counters so far (vLLM's Prometheus metrics add up over engines)."""
    out: dict = {}
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[metric.name]] = list(metric.values) if hasattr(metric, "values") else metric.value
    return out


def delta(after: dict, before: dict) -> dict:
    """``after`` − ``before``, counter by counter (element-wise for the per-position vector)."""
    return {name: ([a - b for a, b in zip(value, before.get(name, [0] * len(value)), strict=True)]
                   if isinstance(value, list) else value - before.get(name, 0))
            for name, value in after.items()}


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt

    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    results = {}
    for run in job["runs"]:
        spec = "speculative_config" in run["engine"]
        try:
            llm = LLM(model=run["model"], dtype="float32", enforce_eager=True, seed=0, disable_log_stats=not spec,
                      **run["engine"])
        except Exception as e:  # a run that the model must refuse ("refused": true) records why
            if not run.get("refused"):
                raise
            results[run["name"]] = [{"error": f"{type(e).__name__}: {e}"}]
            gc.collect()
            continue
        passes = []
        for _ in range(run.get("repeat", 1)):
            before = spec_counters(llm) if spec else {}
            outs = llm.generate(prompts, params, use_tqdm=False)
            passes.append({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                           "cached": [o.num_cached_tokens or 0 for o in outs],
                           "spec": delta(spec_counters(llm), before) if spec else None})
        results[run["name"]] = passes
        del llm
        gc.collect()
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM starts its workers with spawn: they re-import this file
    main(*sys.argv[1:3])
