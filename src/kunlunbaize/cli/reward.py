"""``kunlun reward``: score {prompt, completion} JSONL with rule-based rewards and/or a reward model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .args import new_command, resolve_device
from .posttrain_shared import build_reward, check_rewards, errors, fail, log, reward_args


def add_parser(sub: Any) -> None:
    """Add ``reward`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    rw = new_command(sub, "reward", help="score {prompt, completion} JSONL with rule-based rewards and/or a "
                                         "reward model")
    rw.add_argument("input", help="JSONL of {prompt, completion, answer?, test?, …}")
    reward_args(rw, None)
    rw.add_argument("--out", help="scored JSONL (default: INPUT.scored.jsonl)")
    rw.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> None:
    """Score each record, write them with one column per reward, print the mean of each."""
    from ..posttrain.data import prompt_records, read, write_jsonl
    from ..posttrain.rewards import completion_text

    check_rewards(args)
    device = resolve_device(args.device)
    try:
        records = prompt_records(read(args.input), args.input)
        for i, r in enumerate(records):
            if "completion" not in r or r["completion"] is None:
                raise ValueError(f"{args.input}, record {i + 1}: missing 'completion' — kunlun reward scores "
                                 '{"prompt": …, "completion": …} records')
            completion_text(r["completion"])  # a string or chat turns
        reward = build_reward(args, device)
        columns = sorted({k for r in records for k in r if k not in ("prompt", "completion")})
        table = reward.score([r["prompt"] for r in records], [r["completion"] for r in records],
                             **{k: [r.get(k) for r in records] for k in columns})
        scored = [{**r, **{name: values[i] for name, values in table.items()}} for i, r in enumerate(records)]
        out = args.out or str(Path(args.input).with_suffix("")) + ".scored.jsonl"
        write_jsonl(out, scored)
    except errors() as e:
        raise fail("reward", e) from None
    print(f"{'reward':<16} {'mean':>8} {'n':>6}")
    for name, values in table.items():
        applied = [v for v in values if v is not None]
        mean = sum(applied) / len(applied) if applied else float("nan")
        print(f"{name:<16} {mean:>8.4f} {len(applied):>6}")
    log(f"scored records: {out}")
