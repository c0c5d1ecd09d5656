"""What crosses a pipeline stage boundary with the dense residual (eq. 1–2): the one rule the planner counts and
``train.parallel.pipeline`` sends."""

from __future__ import annotations

RAW, PARTIAL, PLAIN = "raw", "partial", "plain"


def boundary_form(after: int, n_layers: int, dense_residual: bool = True) -> str:
    """What a pipeline boundary after ``after`` layers carries (as ``train.parallel.pipeline`` sends it): ``raw``
    H_0 … H_s, ``partial`` H_s and one partial mix P_l = Σ_{i≤s} W[l, i]·H_i per later layer l (eq. 1; the weights
    are fixed within a step), whichever is fewer, or ``plain`` H_s without a dense residual."""
    if not dense_residual:
        return PLAIN
    return RAW if after + 1 <= n_layers - after + 1 else PARTIAL


def boundary_tensors(after: int, n_layers: int, dense_residual: bool = True) -> int:
    """Width-d tensors per token a boundary after ``after`` layers carries each way (see :func:`boundary_form`):
    min(s + 1, L − s + 1) with a dense residual, 1 without."""
    form = boundary_form(after, n_layers, dense_residual)
    return {PLAIN: 1, RAW: after + 1, PARTIAL: n_layers - after + 1}[form]
