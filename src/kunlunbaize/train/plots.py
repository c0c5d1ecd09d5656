"""End-of-run figures: loss curves and the dense-residual weight heatmap (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training total/main/MTP losses and validation loss against tokens seen."""
    plt = _pyplot()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        tokens = [r["tokens"] / 1e6 for r in train]
        ax.plot(tokens, [r["loss"] for r in train], label="train total", lw=1, alpha=0.6)
        ax.plot(tokens, [r["main_loss"] for r in train], label="train main (next token)", lw=1.5)
        depths = sorted({k for r in train for k in r if k.startswith("mtp_loss_")})
        for k in depths:
            ax.plot(tokens, [r.get(k, float("nan")) for r in train], label=f"train {k.replace('_loss_', ' depth ')}",
                    lw=1, ls="--")
    if val:
        ax.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-", label="validation main",
                lw=2, color="black")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dense_weights(matrix: torch.Tensor, path: Path, title: str = "") -> Path:
    """Heatmap of softmax(a_l) (rows: layer l; columns: source H_i; upper triangle empty)."""
    plt = _pyplot()
    m = matrix.float().clone()
    L = m.shape[0]
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    m[mask] = float("nan")
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * L, 1 + 0.55 * L))
    im = ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=float(torch.nan_to_num(m).max()))
    for i in range(L):
        for j in range(i + 1):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] < 0.5 * float(matrix.max()) else "black")
    ax.set_xticks(range(L), ["emb" if j == 0 else f"H{j}" for j in range(L)])
    ax.set_yticks(range(L), [f"layer {i}" for i in range(L)])
    ax.set_xlabel("source H_i (embedding output = H_0)")
    ax.set_title(title or "dense-residual weights softmax(a_l)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
