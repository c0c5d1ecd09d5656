"""Greedy generation with vLLM (run by tests/test_vllm.py with .venv-vllm's Python, not collected by pytest).

    python tests/vllm_generate.py JOB.json OUT.json

JOB: {"prompts": [[ids] …], "max_tokens": N,
      "runs": [{"name": NAME, "model": EXPORT, "engine": {LLM keyword arguments}, "repeat": R}, …]}
OUT: {NAME: [{"tokens": [[ids] …], "cached": [num_cached_tokens …]} per repeat]}
Every prompt of a run goes to vLLM in one call (continuous batching); float32, greedy, end-of-text ignored.
"""

from __future__ import annotations

import gc
import json
import sys


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt

    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    results = {}
    for run in job["runs"]:
        llm = LLM(model=run["model"], dtype="float32", enforce_eager=True, seed=0, **run["engine"])
        passes = []
        for _ in range(run.get("repeat", 1)):
            outs = llm.generate(prompts, params, use_tqdm=False)
            passes.append({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                           "cached": [o.num_cached_tokens or 0 for o in outs]})
        results[run["name"]] = passes
        del llm
        gc.collect()
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM starts its workers with spawn: they re-import this file
    main(*sys.argv[1:3])
