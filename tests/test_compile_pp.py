"""Compiled blocks (``--compile``) in pipeline stages (issue 29): each stage's blocks compiled one by one, as the
trainer places them (the pipelining runtime calls the stage module's forward and backward itself, so the stage is
never compiled whole), give the one-process eager run's losses, gradients and parameters under 1F1B and under
interleaved 1F1B with activation checkpointing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from .test_compile_tp import _worker
from .test_parallel import FULL

STAGED = {**FULL, "n_layers": 4}
"""Four layers: two stages of two blocks under 1F1B, four stages of one block (two a rank) under interleaved 1F1B."""


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


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_blocks_under_pp2_equal_one_process_under_1f1b_and_interleaved_1f1b(tmp_path):
    """2 ranks, one launch: pp2 under 1F1B, then under interleaved 1F1B (two stages a rank) with activation
    checkpointing, the full model (dense residual across the boundaries, TransformerX, MTP depth 2 on the last stage)
    with every stage's blocks compiled (backend ``aot_eager``, as ``test_compile_tp.py``): two steps of two
    micro-batches give one eager process's losses, gradients before every step, gradient norms and parameters
    (fp32). The second run reuses the first's Dynamo graphs (the same block code and shapes)."""
    runs = [{"config": STAGED, "layout": [1, 1, 1, 1, 2], "mode": "compile-aot_eager", "schedule": "1f1b"},
            {"config": STAGED, "layout": [1, 1, 1, 1, 2], "mode": "compile-aot_eager", "schedule": "interleaved1f1b",
             "stages_per_rank": 2, "activation_checkpointing": True}]
    results = _worker(tmp_path, 2, runs)
    assert len(results) == 2, results
    for r in results.values():
        assert r["compiled"] == 2 and r["graphs"] > 0, r  # rank 0's two blocks ran compiled
        assert r["steps"] == [[4, 2], [4, 2]], r
        assert r["first_grad"] < 1e-6 and r["first_grad_norm"] < 1e-5, r  # the same parameters: float rounding
        assert r["loss"] < 1e-5 and r["grad"] < 1e-5 and r["grad_norm"] < 1e-5, r
        assert r["param"] < 1e-4, r  # AdamW at lr 1e-2 amplifies float rounding in the parameters
