"""Compiled blocks (``--compile``) in pipeline stages (issue 29): the layout checks let them through, and a shared
parameter's gradient is summed in its parameter's layout. That each stage's blocks compiled one by one, as the trainer
places them (the pipelining runtime calls the stage module's forward and backward itself, so the stage is never
compiled whole), give the one-process eager run's losses, gradients and parameters under 1F1B and under interleaved
1F1B with activation checkpointing is ``tests/test_parallel_layouts.py``'s
``test_compiled_blocks_under_pp2_equal_one_process_under_1f1b_and_interleaved_1f1b`` (in that file's one 2-rank
launch)."""

from __future__ import annotations

from dataclasses import replace

import pytest


def test_compile_with_pp_passes_the_layout_checks(dataset):
    """``--compile`` with ``--pp 2``, and with ``--pp 2 --tp 2``, is no longer refused."""
    import torch

    from kunlunbaize.train.config import TrainConfig
    from kunlunbaize.train.distributed import DistEnv
    from kunlunbaize.train.trainer import _check_runnable

    env = DistEnv(0, 2, 0, torch.device("cpu"))
    model = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "mtp_depth": 1}
    cfg = TrainConfig(data=str(dataset), preset="tiny", model_overrides=model, seq_len=16, pp=2, compile=True,
                      batch_size=4, batch_size_start=4, micro_batch_size=2)  # 2 micro-batches a step, as 1F1B needs
    assert _check_runnable(cfg, env, dataset).pp == 2
    assert _check_runnable(replace(cfg, tp=2), DistEnv(0, 4, 0, torch.device("cpu")), dataset).tp == 2


def test_a_shared_gradient_is_summed_in_its_parameters_layout():
    """The copies of a shared parameter on two pipeline ranks exchange their gradients' local parts, so each is first
    laid out as the parameter: DTensor's embedding backward gives a vocabulary-sharded embedding a replicated
    gradient (the whole table on every tp rank), while a copy without a gradient contributes zeros laid out as the
    parameter (under --compile --pp 2 --tp 2 the two met: gloo aborted on 7808 vs 3968 bytes)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from kunlunbaize.train.parallel.pipeline_stages import grad_in_layout

    if dist.is_initialized():
        pytest.skip("needs its own one-rank process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)])
        grad = distribute_tensor(torch.randn(5, 3), mesh, [Replicate()])
        laid = grad_in_layout(grad, param)
        assert laid.placements == param.placements and torch.equal(laid.full_tensor(), grad.full_tensor())
        assert grad_in_layout(param, param) is param
        plain = torch.randn(5, 3)
        assert grad_in_layout(plain, plain) is plain
    finally:
        dist.destroy_process_group()
