"""What the ``kunlun`` commands share: argument types, ``--set`` overrides, ``--device``, and :class:`UsageError`.

Nothing here imports torch at module level: building the parser stays light (``kunlun --help``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from ..config import PRESETS, ModelConfig
from ..defaults import PREFILL_CHUNK


class UsageError(Exception):
    """An argument value (or combination) found wrong after parsing: ``main`` reports it as a usage error,
    ``kunlun <cmd>: <message> — see `kunlun <cmd> --help``` with exit status 2. The message names the option."""


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (and <= ``high``); underscores allowed, e.g. 1_000."""

    def parse(raw: str) -> int:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
        if value < low or (high is not None and value > high):
            where = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {where}, got {value}")
        return value

    return parse


SEED = int_at_least(0, 2**63 - 1)  # what torch.Generator.manual_seed takes


def float_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in [low, high] (or (low, high] with ``low_open``)."""
    if high < math.inf:
        where = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        where = f"{'>' if low_open else '>='} {low:g}"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"expected a finite number {where}, got {raw}")
        return value

    return parse


def override(pair: str) -> tuple[str, Any]:
    """An argparse ``type`` for ``--set``: ``key=value`` → (key, typed value: int, float, bool or comma tuple)."""
    if "=" not in pair:
        raise argparse.ArgumentTypeError(f"{pair!r} must look like key=value, e.g. --set mtp_depth=1")
    key, raw = pair.split("=", 1)
    return key, _parse_value(raw)


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if "," in raw:
        return tuple(_parse_value(p) for p in raw.split(",") if p)
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def add_model_args(parser: argparse.ArgumentParser, default_preset: str | None, help_set: str) -> None:
    """``--preset NAME`` and ``--set KEY=VALUE …`` (parsed by :func:`override`)."""
    parser.add_argument("--preset", default=default_preset, choices=list(PRESETS))
    parser.add_argument("--set", nargs="*", type=override, default=[], metavar="KEY=VALUE", help=help_set)


def model_config(preset: str, overrides: list[tuple[str, Any]], ignore: tuple[str, ...] = ()) -> ModelConfig:
    """The ModelConfig of ``--preset`` and ``--set`` (keys in ``ignore`` left out); a bad one is a UsageError."""
    try:
        return ModelConfig.preset(preset, **{k: v for k, v in overrides if k not in ignore})
    except ValueError as e:
        raise UsageError(f"--set: invalid config: {e} (`kunlun info --preset {preset}` shows every field)") from None


def resolve_device(name: str) -> str:
    """``--device`` checked against this machine: auto (cuda when available, else cpu), cpu, cuda[:N], mps.
    A device this machine lacks, or an unknown name, is a :class:`UsageError`."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {name!r} — use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is usable on this machine — use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) — use cuda:0 … "
                             "or auto")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available here — use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name} is not supported — use auto, cpu, cuda or cuda:N")
    return str(dev)


def new_command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """``sub.add_parser(name, …)``, remembered in the parsed arguments (``command_parser``) so that errors found
    after parsing are reported by the parser of the command (or posttrain stage) that was run."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(command_parser=parser)
    return parser


def add_prefill_chunk_arg(parser: argparse.ArgumentParser) -> None:
    """``--prefill-chunk N``: tokens per prefill chunk (``prefill_chunk`` of the generate functions)."""
    parser.add_argument("--prefill-chunk", type=int_at_least(1), default=PREFILL_CHUNK, metavar="N",
                        help="read a long prompt N tokens at a time through the cache: the same output, a working "
                             "memory that does not grow with the prompt (default: %(default)s)")
