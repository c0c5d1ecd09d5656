"""Cross-entropy of a linear output head without materialising the logits (the memory-light loss of eq. 22–23).

``linear_cross_entropy(h, W, targets)`` equals ``F.cross_entropy(h @ W.T, targets)`` (mean over targets that are not
``ignore_index``) and its gradients, but computes the logits ``chunk`` rows at a time: each chunk's logits, softmax and
gradients are made and dropped in the forward pass, so the peak extra memory is one chunk of logits instead of
[rows, vocabulary] for the main head and every MTP depth at once. The gradients with respect to ``h`` and ``W`` are
kept from the forward pass and scaled by the incoming gradient in the backward pass (as Liger-Kernel's fused linear
cross-entropy does).
"""

from __future__ import annotations

import torch

from .loss import IGNORE_INDEX

CHUNK_ROWS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        count = valid.sum()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        scale = 1.0 / count.clamp(min=1).float()
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            v = valid[start:start + chunk]
            logits = (h @ weight.t()).float()  # [chunk, V], in fp32 for the softmax
            lse = torch.logsumexp(logits, dim=-1)
            safe = torch.where(v, t, torch.zeros_like(t))
            picked = logits.gather(-1, safe[:, None])[:, 0]
            total = total + ((lse - picked) * v).sum()
            if want_h or want_w:
                grad = torch.softmax(logits, dim=-1)  # d loss / d logits = softmax − one-hot, on valid rows
                grad.scatter_add_(-1, safe[:, None], -torch.ones_like(picked)[:, None])
                grad = grad * (v[:, None] * scale)
                if want_h:
                    grad_h[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                if want_w:
                    grad_w += grad.t() @ h.float()
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` over targets ≠ ``ignore_index`` (0 when there
    are none), ``chunk`` rows of logits at a time. ``hidden`` [..., d], ``weight`` [V, d], ``targets`` [...]."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    if flat_h.shape[0] != flat_t.shape[0]:
        raise ValueError(f"{flat_h.shape[0]} hidden rows but {flat_t.shape[0]} targets")
    if not (torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad)):
        return _loss_only(flat_h, weight, flat_t, chunk, ignore_index)  # evaluation: no gradients to make
    return _LinearCrossEntropy.apply(flat_h, weight, flat_t, chunk, ignore_index)


def _loss_only(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
               ignore_index: int) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start:start + chunk] @ weight.t()).float()
        total = total + torch.nn.functional.cross_entropy(logits, targets[start:start + chunk],
                                                          ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def shifted_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, shift: int,
                                 chunk: int = CHUNK_ROWS, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`~kunlunbaize.model.loss.shifted_cross_entropy` of the head ``weight`` on ``hidden`` [B, T, d] without
    its logits: position i predicts ``labels[:, i + shift]``."""
    T = labels.shape[1]
    if shift >= T:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    return linear_cross_entropy(hidden[:, :T - shift], weight, labels[:, shift:], chunk, ignore_index)
