"""Joint next-token + multi-token prediction loss (eq. 22–23)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .documents import Documents

IGNORE_INDEX = -100


@dataclass
class LossTerms:
    total: torch.Tensor
    main: torch.Tensor
    mtp: list[torch.Tensor]  # L^j for j = 1 … D (unweighted)

    @classmethod
    def joint(cls, main: torch.Tensor, mtp: list[torch.Tensor], gammas: tuple[float, ...]) -> LossTerms:
        """L = L_main + Σ_j γ_j L^j (eq. 22) from its terms."""
        total = main
        for gamma, term in zip(gammas, mtp, strict=True):
            total = total + gamma * term
        return cls(total=total, main=main, mtp=mtp)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, i]`` against ``labels[:, i + shift]`` over valid targets."""
    T = labels.shape[1]
    if shift >= T:
        return logits.sum() * 0.0  # no target inside the sequence; keeps the graph connected
    pred = logits[:, : T - shift].reshape(-1, logits.shape[-1])
    target = labels[:, shift:].reshape(-1)
    if not (target != ignore_index).any():
        return pred.sum() * 0.0
    return F.cross_entropy(pred.float(), target, ignore_index=ignore_index)


def multi_token_loss(
    logits: torch.Tensor,
    mtp_logits: list[torch.Tensor],
    labels: torch.Tensor,
    gammas: tuple[float, ...],
    ignore_index: int = IGNORE_INDEX,
    documents: Documents | None = None,
) -> LossTerms:
    """L = L_main + Σ_j γ_j L^j with ``labels`` aligned to the input (HF convention: shifted here).

    The main head at position i predicts t_{i+1}; MTP depth j at position i predicts t_{i+j+1}. With
    ``documents`` (packed documents) a target in another document than its position's is ignored.
    """
    def targets(shift: int) -> torch.Tensor:
        return labels if documents is None else documents.labels(labels, shift, ignore_index)

    main = shifted_cross_entropy(logits, targets(1), 1, ignore_index)
    mtp = [shifted_cross_entropy(lg, targets(j + 1), j + 1, ignore_index) for j, lg in enumerate(mtp_logits, start=1)]
    return LossTerms.joint(main, mtp, gammas)
