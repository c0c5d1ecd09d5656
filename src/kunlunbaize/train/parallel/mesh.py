"""The run's device mesh and the model placed on it: the architecture's tensor-parallel plan over ``tp`` and its
context-parallel plan over ``cp`` (in that order), then data parallelism over ``dp_replicate`` × ``dp_shard`` (DDP,
FSDP2 or HSDP, each block sharded on its own, then the root: torchtitan's order; with ``cp`` the sharding group is
``dp_shard × cp``, torchtitan's ``dp_shard_cp``; under pipeline parallelism each stage is a root)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ...arch import ArchSpec
from ..distributed import DistEnv
from .layout import MESH_DIMS, Layout, LayoutError

TP_MIN_TORCH = "2.6"
"""The oldest torch ``--tp`` runs on: public ``torch.distributed.tensor`` and ``torch.distributed.fsdp.fully_shard``."""


def build_mesh(layout: Layout, env: DistEnv) -> DeviceMesh | None:
    """The ``pp × dp_replicate × dp_shard × cp × tp`` mesh of the process group (None in a single process)."""
    if not env.distributed:
        return None
    if layout.world_size != env.world_size:
        raise LayoutError(f"the layout {layout.describe()} has {layout.world_size} ranks, the process group "
                          f"{env.world_size}")
    return init_device_mesh(env.device.type, layout.shape, mesh_dim_names=MESH_DIMS)


@dataclass
class PlacedModel:
    """The model as the training step runs it, and how its loss is computed under the layout."""

    wrapped: nn.Module
    """The model wrapped for data parallelism (forward, backward); the same module under FSDP2 or none."""
    loss_kwargs: dict[str, Any]
    """Keyword arguments of its training forward beyond the tokens and labels."""
    loss_contexts: list[Callable[[], AbstractContextManager]] = field(default_factory=list)
    """Contexts every forward and backward must run in (``loss_parallel`` under tensor parallelism)."""


def tensor_parallel(model: nn.Module, spec: ArchSpec, layout: Layout, mesh: DeviceMesh | None) -> PlacedModel:
    """Apply ``spec``'s tensor-parallel plan over ``mesh["tp"]`` when ``layout.tp`` > 1 (in place)."""
    placed = PlacedModel(wrapped=model, loss_kwargs=spec.train_kwargs())
    if layout.tp > 1:
        if torch.__version__ < TP_MIN_TORCH:
            raise LayoutError(f"--tp needs torch >= {TP_MIN_TORCH} (DTensor tensor parallelism with FSDP2; tested on "
                              f"2.13), this is torch {torch.__version__}; upgrade torch or train with --tp 1")
        try:
            plan = spec.hook("parallelize")
        except NotImplementedError:
            raise LayoutError(f"the {spec.title} architecture has no tensor-parallel plan; train it with --tp 1") \
                from None
        from torch.distributed.tensor.parallel import loss_parallel

        placed.loss_kwargs = plan(model, mesh)
        placed.loss_contexts.append(loss_parallel)
    return placed


def context_parallel(placed: PlacedModel, spec: ArchSpec, layout: Layout, mesh: DeviceMesh | None) -> None:
    """Apply ``spec``'s context-parallel plan over ``mesh["cp"]`` when ``layout.cp`` > 1 (in place)."""
    if layout.cp == 1:
        return
    try:
        plan = spec.hook("context_parallel")
    except NotImplementedError:
        raise LayoutError(f"the {spec.title} architecture has no context-parallel plan; train it with --cp 1") \
            from None
    plan(placed.wrapped, mesh)


def data_parallel(placed: PlacedModel, blocks: list[nn.Module], layout: Layout, mesh: DeviceMesh | None,
                  env: DistEnv, param_dtype: torch.dtype | None = None) -> None:
    """Wrap the placed model for data parallelism as ``layout.wrap`` says (DDP, or FSDP2 per block then the root)."""
    if layout.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        placed.wrapped = DDP(placed.wrapped, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    elif layout.wrap == "fsdp":
        _fully_shard(placed.wrapped, blocks, _dp_mesh(layout, mesh), param_dtype)


def shard_stage(stage: nn.Module, blocks: list[nn.Module], layout: Layout, mesh: DeviceMesh | None) -> None:
    """FSDP2 (HSDP) over the data-parallel sub-mesh for one pipeline stage: each of its blocks, then the stage."""
    _fully_shard(stage, blocks, _dp_mesh(layout, mesh), None)


def _dp_mesh(layout: Layout, mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The data-parallel sub-mesh FSDP2 shards over: ``dp_shard``, or ``dp_replicate × dp_shard`` (HSDP); with
    context parallelism ``dp_shard × cp`` flattened (each cp rank's gradients are cp times its share of the global
    mean's, :mod:`.context`, so FSDP2's average over it is their sum)."""
    if mesh is None:
        return None
    shard = "dp_shard"
    if layout.cp > 1:
        shard = "dp_shard_cp"
        mesh["dp_shard", "cp"]._flatten(shard)
    return mesh["dp_replicate", shard] if layout.dp_replicate > 1 else mesh[shard]


def _fully_shard(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh | None,
                 param_dtype: torch.dtype | None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh} if mesh is not None else {}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


class StepContext:
    """Contexts entered afresh around every forward and backward (a training step enters it per micro-batch)."""

    def __init__(self, *factories: Callable[[], AbstractContextManager]) -> None:
        self.factories = factories
        self._stacks: list[ExitStack] = []

    def __enter__(self) -> StepContext:
        stack = ExitStack()
        for make in self.factories:
            stack.enter_context(make())
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stacks.pop().__exit__(*exc)
