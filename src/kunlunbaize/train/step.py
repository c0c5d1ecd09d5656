"""One optimiser step and one validation pass: what ``kunlun train``, ``kunlun demo`` and the training benchmarks
all run.

:func:`train_step` takes a step's micro-batches on this rank: each goes forward with the joint loss (eq. 22) under
the precision context, and backward scaled by the number of micro-batches (the gradient all-reduce of DDP/FSDP2
only on the last one); then the gradients are clipped and, unless the loss or the gradient norm is not finite,
the optimiser steps. The gradients are cleared either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.documents import document_ids
from .distributed import DistEnv, all_reduce_mean, gradient_sync


@dataclass(frozen=True)
class StepResult:
    """What one :func:`train_step` measured."""

    losses: torch.Tensor
    """[joint loss, main loss, MTP loss of depth 1, …], float32, averaged over micro-batches (and ranks)."""
    grad_norm: torch.Tensor
    """Total gradient norm before clipping."""
    finite: bool
    """False when the loss or the gradient norm was not finite: the optimiser did not step."""

    @property
    def loss(self) -> float:
        """The joint loss (eq. 22)."""
        return self.losses[0].item()

    @property
    def main_loss(self) -> float:
        """The main head's next-token loss."""
        return self.losses[1].item()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``; ``auto`` is bf16 on a GPU and fp32 otherwise."""
    return dtype if dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def precision(device: torch.device, dtype: str) -> AbstractContextManager:
    """The context forward passes run in: bf16 autocast for ``bf16``, nothing for ``fp32``."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[torch.Tensor], *,
               grad_clip: float, autocast: AbstractContextManager | None = None,
               loss_kwargs: dict[str, Any] | None = None, env: DistEnv | None = None,
               document_eot: int | None = None) -> StepResult:
    """Accumulate the gradient of the mean loss over ``micro_batches`` (token ids, also the labels), clip it to
    ``grad_clip`` and step ``optimizer``, unless the loss or the gradient is not finite; then zero the gradients.

    ``model`` may be wrapped for data parallelism (DDP, FSDP2) and tensor-parallel; the losses are averaged
    over ranks when ``env`` is distributed (the ranks of a tensor-parallel group hold the same loss).
    ``loss_kwargs`` go to the forward (e.g. ``logits=False`` for KunlunBaize's chunked loss). With
    ``document_eot`` (``--doc-mask``) each window's documents, ended by that token id, are computed as if alone.
    """
    autocast = autocast if autocast is not None else nullcontext()
    loss_kwargs = loss_kwargs or {}
    accum = len(micro_batches)
    sums: torch.Tensor | None = None
    for m, x in enumerate(micro_batches):
        with gradient_sync(model, m == accum - 1), autocast:
            out = model(x, labels=x, **loss_kwargs, **_documents(x, document_eot))
            (out.loss / accum).backward()
        terms = torch.stack([_plain(t).detach().float() for t in (out.loss, out.main_loss, *out.mtp_losses)]) / accum
        sums = terms if sums is None else sums + terms
    assert sums is not None, "train_step needs at least one micro-batch"
    if env is not None:
        sums = all_reduce_mean(sums, env)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
        gnorm = gnorm.full_tensor()
    return _update(optimizer, sums, gnorm)


def _update(optimizer: Any, sums: torch.Tensor, gnorm: torch.Tensor) -> StepResult:
    """Step ``optimizer`` unless the losses or the gradient norm are not finite; clear the gradients either way."""
    finite = bool(torch.isfinite(sums).all()) and bool(torch.isfinite(gnorm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(losses=sums, grad_norm=gnorm, finite=finite)


def _documents(x: torch.Tensor, eot_id: int | None) -> dict[str, torch.Tensor]:
    """The forward's ``document_ids`` for the window ``x`` when documents are masked (``eot_id`` given)."""
    return {} if eot_id is None else {"document_ids": document_ids(x, eot_id)}


def pipeline_step(pipe: Any, optimizer: Any, micro_batches: Sequence[torch.Tensor], *, grad_clip: float,
                  autocast: AbstractContextManager | None = None, env: DistEnv | None = None,
                  document_eot: int | None = None) -> StepResult:
    """:func:`train_step` for this rank's stages of a pipeline (:class:`~.parallel.pipeline.Pipeline`): the
    micro-batches go through the pipeline schedule as its micro-batches (the last stage's losses, on every rank),
    the gradients of shared parameters are summed over their copies, the norm is clipped over every stage (sharded
    gradients included) and every stage's optimiser steps, unless the loss or the norm is not finite. With
    ``document_eot`` every stage computes each window's documents as if alone, as :func:`train_step` does."""
    x = torch.cat(list(micro_batches))
    with autocast if autocast is not None else nullcontext():
        sums = pipe.step(x, x, n_microbatches=len(micro_batches), **_documents(x, document_eot))
    if env is not None:  # every stage and every tensor-parallel rank holds its data-parallel rank's losses
        sums = all_reduce_mean(sums, env)
    return _update(optimizer, sums, pipe.clip_grad_norm_(grad_clip))


def pipeline_evaluate(pipe: Any, batches: Sequence[torch.Tensor], device: torch.device, *,
                      autocast: AbstractContextManager | None = None,
                      document_eot: int | None = None) -> dict[str, float]:
    """:func:`evaluate` through a pipeline's stages (forward only, each batch as one micro-batch; documents
    masked with ``document_eot``)."""
    for m in pipe.modules:
        m.eval()
    sums: torch.Tensor | None = None
    with torch.no_grad(), (autocast if autocast is not None else nullcontext()):
        for x in batches:
            x = x.to(device)
            terms = pipe.evaluate(x, x, n_microbatches=1, **_documents(x, document_eot))[1:]  # main, MTP depths
            sums = terms if sums is None else sums + terms
    for m in pipe.modules:
        m.train()
    assert sums is not None, "evaluate needs at least one batch"
    vals = (sums / len(batches)).tolist()
    return {"val_loss": vals[0], **{f"val_mtp_loss_{j}": v for j, v in enumerate(vals[1:], start=1)}}


def _plain(loss: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor (under tensor parallelism ``loss_parallel`` gives a replicated DTensor)."""
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def evaluate(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, *,
             autocast: AbstractContextManager | None = None,
             loss_kwargs: dict[str, Any] | None = None, document_eot: int | None = None) -> dict[str, float]:
    """Mean main and per-depth MTP losses over ``batches`` (``val_loss``, ``val_mtp_loss_1`` …), in eval mode
    (documents masked as in :func:`train_step` with ``document_eot``); the model is left in train mode."""
    model.eval()
    sums: torch.Tensor | None = None
    with torch.no_grad(), (autocast if autocast is not None else nullcontext()):
        for x in batches:
            x = x.to(device)
            out = model(x, labels=x, **(loss_kwargs or {}), **_documents(x, document_eot))
            terms = torch.stack([_plain(out.main_loss).float(), *[_plain(t).float() for t in out.mtp_losses]])
            sums = terms if sums is None else sums + terms
    model.train()
    assert sums is not None, "evaluate needs at least one batch"
    vals = (sums / len(batches)).tolist()
    return {"val_loss": vals[0], **{f"val_mtp_loss_{j}": v for j, v in enumerate(vals[1:], start=1)}}
