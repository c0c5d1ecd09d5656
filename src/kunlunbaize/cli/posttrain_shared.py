"""What ``kunlun posttrain`` and ``kunlun reward`` share: error handling, logging, and the reward options."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .args import UsageError, float_in, int_at_least


def fail(command: str, e: BaseException) -> SystemExit:
    """``kunlun COMMAND: error`` as the SystemExit to raise."""
    return SystemExit(f"kunlun {command}: {e}")


def need_trl(command: str) -> None:
    """A one-line error saying what to install when the post-training libraries are missing."""
    import importlib.util

    missing = [m for m in ("trl", "datasets", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"kunlun {command}: needs {', '.join(missing)} — pip install 'kunlunbaize[posttrain]'")


def errors() -> tuple[type[BaseException], ...]:
    """The errors a post-training command reports as one line (exit status 1)."""
    from ..checkpoint import CheckpointError
    from ..data.format import DataError
    from ..eval.convert import TaskFileError

    return (ValueError, CheckpointError, DataError, TaskFileError, OSError)


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr)


def report(value: Any) -> None:
    """Print the result as JSON, once (rank 0 under torchrun)."""
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(value, indent=2))


def check_rewards(args: argparse.Namespace) -> None:
    """``--reward-model`` needs ``--rewards`` to name it (a UsageError otherwise)."""
    from ..posttrain.rewards import MODEL_REWARD, parse_spec

    if args.reward_model and MODEL_REWARD not in [n for n, _ in parse_spec(args.rewards)]:
        raise UsageError(f"--reward-model is given but --rewards does not name it: add {MODEL_REWARD}=WEIGHT")


def build_reward(args: argparse.Namespace, device: str):
    """The ``--rewards`` (and ``--reward-model``) as one :class:`kunlunbaize.posttrain.rewards.Combined`."""
    from ..posttrain.rewards import Combined

    check_rewards(args)
    model_reward = None
    if args.reward_model:
        from ..posttrain.reward_model import ModelReward

        model_reward = ModelReward(args.reward_model, device=device)
    return Combined.from_spec(args.rewards, model_reward, max_chars=args.max_chars, timeout=args.timeout)


def rewards_spec(raw: str) -> str:
    """An argparse ``type`` for ``--rewards``: ``NAME[=WEIGHT],…`` of known rewards (checked, kept as text)."""
    from ..posttrain.rewards import parse_spec

    try:
        parse_spec(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return raw


def reward_args(p: argparse.ArgumentParser, default: str | None) -> None:
    """``--rewards``, ``--reward-model``, ``--max-chars`` and ``--timeout``."""
    p.add_argument("--rewards", type=rewards_spec, default=default, required=default is None, metavar="NAME[=W],…",
                   help="rule-based rewards and weights: math, code, answer_tag, no_repetition, length, and rm "
                        "(the --reward-model)" + (f" (default: {default})" if default else ""))
    p.add_argument("--reward-model", metavar="PATH", help="a reward model trained with `kunlun posttrain rm`")
    p.add_argument("--max-chars", type=int_at_least(1), default=None, help="the length reward's limit (default 512)")
    p.add_argument("--timeout", type=float_in(0, low_open=True), default=None,
                   help="seconds per sandboxed code run (default 10)")
