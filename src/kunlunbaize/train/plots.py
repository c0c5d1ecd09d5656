"""End-of-run figures: loss curves (training against validation, one loss per panel) and the dense-residual weight
heatmap (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


TRAIN_LABEL = "train: mean over the steps since the previous point"
VAL_LABEL = "validation: the model then, on fixed held-out windows"
NOTE = ("Like with like: the next-token loss on the left, each MTP depth's own loss on the right (the joint loss of "
        "eq. 22, their weighted sum, is in metrics.jsonl).\nThe lines read different text: a training point averages "
        "the batches of the last log window, each taken before its update (it lags while the loss falls fast); "
        "\nvalidation scores the model at that step on the same held-out windows every time, which may be easier or "
        "harder than the average training batch.")


def loss_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[str, list[float], list[float]]]]:
    """What :func:`plot_losses` draws: per panel (``next token``, then ``MTP depth j`` per depth), the training and
    validation series of that one loss as (label, tokens in millions, loss)."""
    train = [r for r in records if "main_loss" in r]
    val = [r for r in records if "val_loss" in r]

    def series(rows: list[dict[str, Any]], key: str, label: str) -> list[tuple[str, list[float], list[float]]]:
        rows = [r for r in rows if key in r]
        return [(label, [r["tokens"] / 1e6 for r in rows], [r[key] for r in rows])] if rows else []

    panels = {"next token (main head)": series(train, "main_loss", TRAIN_LABEL) + series(val, "val_loss", VAL_LABEL)}
    depths = sorted({int(k.rsplit("_", 1)[1]) for r in train for k in r if k.startswith("mtp_loss_")})
    for j in depths:
        panels[f"MTP depth {j} (predicts token t+{j + 1})"] = (series(train, f"mtp_loss_{j}", TRAIN_LABEL)
                                                             + series(val, f"val_mtp_loss_{j}", VAL_LABEL))
    return {name: lines for name, lines in panels.items() if lines}


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training against validation loss, the same loss in each panel (:func:`loss_series`), against tokens seen."""
    plt = _pyplot()
    panels = loss_series(records) or {"loss": []}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 + 4.5 * (len(panels) - 1), 5.6), squeeze=False,
                             sharey=True)
    for ax, (name, lines) in zip(axes[0], panels.items(), strict=True):
        for label, x, y in lines:
            is_val = label == VAL_LABEL
            ax.plot(x, y, "o-" if is_val else "-", label=label, lw=2 if is_val else 1.5,
                    color="black" if is_val else "tab:blue")
        ax.set_title(name)
        ax.set_xlabel("tokens (millions)")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel("cross-entropy (nats/token)")
    fig.suptitle(title or "loss")
    fig.text(0.01, 0.01, NOTE, fontsize=7, va="bottom", ha="left", wrap=True)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
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
