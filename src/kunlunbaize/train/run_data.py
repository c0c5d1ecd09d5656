"""The prepared dataset a run trains on: its train windows and sampler, its validation windows (if any) and what
identifies it in a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import tokenizer_digest
from ..data.format import DataError, is_prepared, load_meta
from .config import DEFAULT_DATA, TrainConfig
from .data import LongDocWindows, TokenWindows, TrainSampler
from .distributed import DistEnv

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class RunData:
    """A prepared dataset opened for training at one sequence length."""

    path: Path
    meta: dict[str, Any]
    train: TokenWindows
    sampler: TrainSampler
    val: TokenWindows | None
    no_val_reason: str
    """Why ``val`` is None (empty when there is validation)."""
    tokenizer_files: list[Path]
    """Copied into every checkpoint."""
    identity: dict[str, Any]
    """Recorded in every checkpoint: path, tokenizer digest, train tokens."""


def resolve_data(cfg: TrainConfig, env: DistEnv) -> Path:
    """The prepared dataset; the embedded default corpus is prepared on first use."""
    path = Path(cfg.data)
    if not is_prepared(path):
        if cfg.data != DEFAULT_DATA:
            raise DataError(f"no prepared dataset at {path}; run `kunlun prepare SOURCES --out {path}` first")
        if env.is_main:
            from ..data.prepare import prepare

            print(f"preparing the embedded corpus (Python standard library) into {path} …", flush=True)
            prepare(sources=[], out=path)
        if env.distributed:
            torch.distributed.barrier()
    return path


def open_run_data(cfg: TrainConfig, data_path: Path) -> RunData:
    """Open the prepared dataset at ``data_path`` for ``cfg``'s sequence length and seed."""
    meta = load_meta(data_path)
    train = (LongDocWindows if cfg.long_docs else TokenWindows)(data_path, "train", cfg.seq_len)
    val, no_val_reason = _val_windows(cfg, data_path, meta)
    return RunData(path=data_path, meta=meta, train=train, sampler=TrainSampler(train, cfg.seed), val=val,
                   no_val_reason=no_val_reason,
                   tokenizer_files=[data_path / n for n in TOKENIZER_FILES if (data_path / n).is_file()],
                   identity={"path": str(data_path.resolve()), "tokenizer_sha256": tokenizer_digest(data_path),
                             "train_tokens": meta["splits"]["train"]["tokens"]})


def _val_windows(cfg: TrainConfig, data_path: Path, meta: dict[str, Any]) -> tuple[TokenWindows | None, str]:
    """The validation windows, or None and why there is no validation."""
    if cfg.eval_batches == 0:
        return None, "--eval-batches 0"
    if int(meta["splits"].get("val", {}).get("tokens", 0)) == 0:
        return None, f"{data_path} has no validation split (prepared with --val-fraction 0)"
    try:
        return TokenWindows(data_path, "val", cfg.seq_len), ""
    except DataError as e:
        raise DataError(f"{e}; or train without validation with --eval-batches 0") from None
