"""Parallel styles beyond ``torch.distributed.tensor.parallel``'s own, for the modules a plain colwise/rowwise
split does not cover: a computation repeated on every tensor-parallel rank, eSwish on a channel-sharded input,
mixing weights whose gradient is a partial sum over sequence shards, a sequence-parallel norm whose output is
gathered for a vocabulary-parallel head, and a rowwise split whose output may enter a compiled region."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel, SequenceParallel


def _replicate_params(_name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for p_name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(p_name, nn.Parameter(distribute_tensor(param.data, mesh, [Replicate()])))


def _to_local(_module: nn.Module, outputs: Any, _mesh: DeviceMesh) -> Any:
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


class ReplicateCompute(ParallelStyle):
    """The module runs in full on every rank: parameters replicated, its (full, identical) tensor inputs taken as
    replicated, its output handed on as a plain tensor. Used where splitting would save too little to be worth
    a collective (the depthwise convolutions, the MTP's embedding norms)."""

    def __init__(self, keep_dtensor: bool = False) -> None:
        super().__init__()
        self.keep_dtensor = keep_dtensor
        """Hand the output on as a replicated DTensor (the input of a vocabulary-parallel head)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_inputs(_module, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) if _is_plain(t) else t
                         for t in inputs)

        return distribute_module(module, device_mesh, _replicate_params, replicate_inputs,
                                 None if self.keep_dtensor else _to_local)


class ChannelShardedESwish(ParallelStyle):
    """eSwish on an input sharded on its last (channel) dimension, as a colwise-parallel linear leaves it: a
    per-channel β is sharded with the channels, a scalar β is replicated (its gradient summed over the ranks)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(_name, mod, mesh):
            for p_name, param in list(mod.named_parameters(recurse=False)):
                placement = Shard(0) if param.numel() > 1 else Replicate()
                mod.register_parameter(p_name, nn.Parameter(distribute_tensor(param.data, mesh, [placement])))

        def shard_input(_module, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Shard(t.dim() - 1)], run_check=False) if _is_plain(t) else t
                         for t in inputs)

        return distribute_module(module, device_mesh, partition, shard_input, _to_local)


class PartialGradOutput(ParallelStyle):
    """Replicated parameters whose output every rank applies to its own sequence shard: the output is handed on
    as a plain tensor whose gradient is a partial sum, added up over the ranks in the backward pass (the
    dense-residual logits)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partial_grad(_module, outputs, _mesh):
            return outputs.to_local(grad_placements=[Partial()]) if isinstance(outputs, DTensor) else outputs

        return distribute_module(module, device_mesh, _replicate_params, None, partial_grad)


class GatheredSequenceParallel(SequenceParallel):
    """A norm under sequence parallelism whose output is gathered over the sequence and kept a replicated
    DTensor: the input of a vocabulary-parallel output head (``input @ W.T`` with ``W`` sharded on the
    vocabulary gives logits sharded on the vocabulary, for ``loss_parallel``)."""

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=[Replicate()])


class WaitedRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` whose output collective has completed when the output is handed on: a plain tensor,
    never the ``AsyncCollectiveTensor`` that ``RowwiseParallel``'s asynchronous reduce-scatter leaves. For a module
    run eagerly whose output is the input of a ``torch.compile``'d region (the embedding, the first block's
    input): AOTAutograd (torch 2.13) waits on such an input before tracing and traces the waited tensor, which
    does not require grad, so the compiled backward returned no gradient for it (``--compile`` under ``--tp``
    lost the first block's share of the embedding's gradient)."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts, async_op=False)
        return outputs.to_local() if use_local_output else outputs


class ShardedWeight(ParallelStyle):
    """Only the weight of a linear output head sharded on its first (vocabulary) dimension: the model multiplies
    by the weight itself (``linear(x, head.weight)``), never through the module's forward."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(_name, mod, mesh):
            for p_name, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(p_name, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))

        return distribute_module(module, device_mesh, partition)


def _is_plain(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and not isinstance(t, DTensor)
