"""What each tensor of the model starts at (:func:`init_module`), and a layout-independent way to draw it
(:func:`init_weights`): every parameter from its own generator, seeded by the run's seed and the parameter's
one-process name.

The one-process initialiser (:meth:`KunlunBaize.reset_parameters`) draws every weight from the global generator in
module order, so a weight's value depends on every tensor drawn before it: a rank that builds only its pipeline
stage, or only its shard, cannot reproduce it without building everything. :func:`init_weights` draws each
parameter's full tensor from a generator of its own (seeded by ``(seed, name)``), then keeps what this rank holds
(a DTensor's local shard, cut by ``distribute_tensor``), so the initial weights are the same whatever the layout and
whatever subset a rank materialises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from .dense_residual import DenseLogits, initial_logits
from .layers import ESwish, RotaryEmbedding


@torch.no_grad()
def init_module(module: nn.Module, std: float, init=nn.init) -> None:
    """Initialise one module's own tensors: weights ~ N(0, std) (or the module's own ``init_std``, set by
    ``conv_init="fan_in"``); norms at 1; eSwish β at its ``beta_init``;
    dense-residual logits as its ``init`` says (0: uniform); rotary tables recomputed. ``init`` supplies
    ``normal_``/``ones_``/``zeros_``/``constant_`` (transformers' versions skip tensors loaded from a checkpoint;
    :class:`SeededInit`'s draw each tensor by its name)."""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
        init.normal_(module.weight, mean=0.0, std=getattr(module, "init_std", std))
    elif isinstance(module, nn.RMSNorm):
        init.ones_(module.weight)
    elif isinstance(module, ESwish):
        init.constant_(module.beta, module.beta_init)
    elif isinstance(module, DenseLogits):
        for layer, p in enumerate(module):
            init.zeros_(p)
            if module.init != "uniform" and not getattr(p, "_is_hf_initialized", False):
                fill_full(p, initial_logits(layer, module.init))
    elif isinstance(module, RotaryEmbedding):
        module.reset_parameters()


def name_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s generator in a run seeded ``seed`` (63 bits of a hash of both)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a DTensor's local shard (a view of it), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def fill_full(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor's value ``full`` into ``tensor``: all of it, or for a DTensor (FSDP2 or
    tensor-parallel shards) only this rank's part of it, cut without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(tensor, DTensor):
        part = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
        tensor.to_local().copy_(part.to_local())
    else:
        tensor.copy_(full)


class SeededInit:
    """``normal_``/``ones_``/``zeros_``/``constant_`` for :func:`init_module` that draw each tensor's full value
    from a CPU generator seeded by ``(seed, its name)`` and write this rank's part of it (:func:`fill_full`)."""

    def __init__(self, names: Mapping[int, str], seed: int) -> None:
        self.names, self.seed = names, seed

    def _name(self, tensor: torch.Tensor) -> str:
        try:
            return self.names[id(tensor)]
        except KeyError:
            raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is not a parameter of the module being "
                             "initialised: SeededInit draws only named parameters") from None

    def normal_(self, tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(name_seed(self.seed, self._name(tensor)))
        fill_full(tensor, torch.empty(tensor.shape, dtype=torch.float32).normal_(mean, std, generator=generator))
        return tensor

    def constant_(self, tensor: torch.Tensor, val: float) -> torch.Tensor:
        self._name(tensor)
        _local(tensor).fill_(val)  # the same everywhere: no draw, and every shard of it is the constant
        return tensor

    def ones_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.constant_(tensor, 1.0)

    def zeros_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.constant_(tensor, 0.0)


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, std: float) -> None:
    """Initialise every tensor of ``module`` (a :class:`KunlunBaize`, or a part of one that keeps its parameter
    names: a pipeline stage) as :func:`init_module` says, each parameter drawn from the generator of
    ``(seed, its name)``: the same values whatever the layout (FSDP2 or tensor-parallel shards hold their part
    of them) and whichever parameters this rank holds. Buffers (the rotary tables) are recomputed."""
    init = SeededInit({id(p): name for name, p in module.named_parameters()}, seed)
    for m in module.modules():
        init_module(m, std, init=init)
