"""What each sublayer of a trained KunlunBaize contributes: ``python -m kunlunbaize.ablate.probe RUN [RUN …]``.

For every trunk block, the root-mean-square of each residual branch's output on validation text (self-attention,
and per conv scale the cross-attention over the conv features h_j and the eSwish MLP), the scale of h_j itself,
and the learned eSwish β of each scale's conv and MLP (eq. 5; 1 at initialisation). Branch outputs are added to a
stream whose RMS is also given, so a branch far below the others is one the model has learned to keep quiet. The
ablation study uses it to read *why* a component helps or hurts (docs/reports/ABLATION.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


@torch.no_grad()
def branch_scales(model: nn.Module, tokens: torch.Tensor) -> list[dict[str, Any]]:
    """One dict per trunk block: ``{"layer", "input", "self_attn", "cross_attn": [...], "mlp": [...],
    "conv": [...], "conv_beta": [...], "mlp_beta": [...]}`` (RMS over ``tokens`` [B, T]; β means). Plain blocks
    (``transformerx=False``) have one ``mlp`` entry and empty conv and cross-attention lists."""
    rows: list[dict[str, Any]] = []
    hooks = []

    def record(row: dict[str, Any], key: str, index: int | None = None):
        def hook(_module: nn.Module, inputs: tuple, output: Any) -> None:
            value = _rms(output[0] if isinstance(output, tuple) else output)
            if index is None:
                row[key] = value
            else:
                row[key][index] = value
        return hook

    for layer, block in enumerate(model.blocks):
        n = len(getattr(block, "convs", []))
        row: dict[str, Any] = {"layer": layer, "input": None, "self_attn": None, "cross_attn": [None] * n,
                               "mlp": [None] * max(n, 1), "conv": [None] * n}
        hooks.append(block.register_forward_pre_hook(lambda _m, args, row=row: row.__setitem__("input", _rms(args[0]))))
        hooks.append(block.attn.register_forward_hook(record(row, "self_attn")))
        if n:
            for j in range(n):
                hooks.append(block.cross_attns[j].register_forward_hook(record(row, "cross_attn", j)))
                hooks.append(block.mlps[j].register_forward_hook(record(row, "mlp", j)))
                hooks.append(block.convs[j].register_forward_hook(record(row, "conv", j)))
            row["conv_beta"] = [conv.act.beta.float().mean().item() for conv in block.convs]
            row["mlp_beta"] = [mlp.act.beta.float().mean().item() for mlp in block.mlps]
        else:
            hooks.append(block.mlp.register_forward_hook(record(row, "mlp", 0)))
        rows.append(row)
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return rows


def validation_tokens(data: str | Path, batch: int, seq_len: int) -> torch.Tensor:
    """The first ``batch × seq_len`` tokens of a prepared dataset's validation split, as [batch, seq_len]."""
    from ..data.format import open_split

    flat = np.concatenate([np.asarray(s) for s in open_split(data, "val")])[: batch * seq_len]
    if flat.size < batch * seq_len:
        raise ValueError(f"{data}: the validation split has {flat.size:,} tokens, fewer than {batch} × {seq_len}")
    return torch.from_numpy(flat.astype(np.int64)).view(batch, seq_len)


def _fmt(values: list[float | None]) -> str:
    return " / ".join("–" if v is None else f"{v:.3f}" for v in values) or "–"


def format_rows(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"### {name}", "", "| layer | stream in | self-attn | cross-attn per scale | MLP per scale | h_j | "
             "β conv | β MLP |", "|---:|---:|---:|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['input']:.3f} | {r['self_attn']:.3f} | {_fmt(r['cross_attn'])} | "
                     f"{_fmt(r['mlp'])} | {_fmt(r['conv'])} | {_fmt(r.get('conv_beta', []))} | "
                     f"{_fmt(r.get('mlp_beta', []))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from ..checkpoint import CheckpointError, resolve_checkpoint
    from ..infer.load import load_model

    p = argparse.ArgumentParser(prog="python -m kunlunbaize.ablate.probe", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run or checkpoint folders of KunlunBaize models")
    p.add_argument("--data", default="data/stdlib", help="prepared dataset whose validation split is used")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    try:
        tokens = validation_tokens(args.data, args.batch, args.seq_len)
        for run in args.runs:
            model, ckpt = load_model(resolve_checkpoint(run))
            print(format_rows(str(ckpt), branch_scales(model, tokens)), end="\n\n")
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"probe: {e}")


if __name__ == "__main__":
    main()
