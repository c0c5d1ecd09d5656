"""How well post-trained models still draft for themselves: greedy MTP self-speculative decoding of chat replies.

For each model folder (e.g. the base model, SFT with the joint loss, SFT with ``--no-mtp``), the replies to the same
held-out generated code tasks are decoded greedily with MTP self-speculative decoding. Reported per model: tokens per
trunk forward (the prefill counted, so 1.0 means no draft was ever accepted), and the acceptance of each depth's
drafts. docs/reports/POSTTRAINING.md has the figures.

    python benchmarks/posttrain_mtp.py runs/posttrain-demo/base-chat runs/posttrain-demo/sft/model runs/sft-nomtp/model
"""

from __future__ import annotations

import argparse
import platform

import torch

from kunlunbaize.infer.speculative import speculative_generate
from kunlunbaize.posttrain.sample import Sampler
from kunlunbaize.posttrain.tasks import code_problems


def measure(folder: str, prompts: int, max_new_tokens: int) -> dict[str, float]:
    """Tokens per trunk forward and per-depth acceptance over the replies to ``prompts`` held-out code tasks."""
    sampler = Sampler(folder)
    forwards = tokens = 0
    drafted: dict[int, list[float]] = {}
    for task in code_problems("test", prompts):
        ids = sampler.encode_prompt([{"role": "user", "content": task["prompt"]}])
        stats = speculative_generate(sampler.model, ids, max_new_tokens, eos_id=sampler.eos_id,
                                     should_stop=sampler.ends_turn).stats
        forwards += stats["trunk_forwards"] + 1  # + the prefill, which gives the first token
        tokens += stats["tokens"]
        for key, value in stats.items():
            if key.startswith("acceptance_depth_") and value == value:  # skip NaN (nothing drafted)
                drafted.setdefault(int(key.rsplit("_", 1)[1]), []).append(value)
    out = {"tokens_per_trunk_forward": tokens / max(1, forwards)}
    out.update({f"acceptance_depth_{j}": sum(v) / len(v) for j, v in sorted(drafted.items())})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="model folders (kunlun posttrain outputs, exports with a chat format)")
    p.add_argument("--prompts", type=int, default=10, help="held-out code tasks to decode (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; greedy, "
          f"{args.prompts} held-out code tasks, up to {args.max_new_tokens} tokens each")
    print("| model | tokens / trunk forward | acceptance per depth |")
    print("|---|---:|---|")
    for folder in args.folders:
        r = measure(folder, args.prompts, args.max_new_tokens)
        depths = ", ".join(f"{v:.2f}" for k, v in r.items() if k.startswith("acceptance"))
        print(f"| {folder} | {r['tokens_per_trunk_forward']:.2f} | {depths} |")


if __name__ == "__main__":
    main()
