"""Compiled blocks (``--compile``) under tensor and context parallelism (issue 29): the layout checks let them through.
That the blocks compiled after the parallel plan, as the trainer places them, give the one-process run's losses and
every gradient under tp2 and cp2 is ``tests/test_parallel_layouts.py``'s
``test_compiled_blocks_under_tp2_and_cp2_equal_one_process`` (in that file's one 2-rank launch, which pays the ranks'
start-up once for all of its checks). The embedding's output enters the first compiled block; while it was an
``AsyncCollectiveTensor`` the compiled backward gave it no gradient (the embedding's gradient was off by up to
0.04)."""

from __future__ import annotations


def test_compile_with_tp_passes_the_layout_checks(dataset):
    """``--compile`` with ``--tp 2`` or ``--cp 2`` is no longer refused (``--pp``: ``test_compile_pp.py``)."""
    import torch

    from kunlunbaize.train.config import TrainConfig
    from kunlunbaize.train.distributed import DistEnv
    from kunlunbaize.train.trainer import _check_runnable

    env = DistEnv(0, 2, 0, torch.device("cpu"))
    model = {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "mtp_depth": 1}
    cfg = TrainConfig(data=str(dataset), preset="tiny", model_overrides=model, seq_len=16, tp=2, compile=True)
    assert _check_runnable(cfg, env, dataset).tp == 2
    cfg = TrainConfig(data=str(dataset), preset="tiny", model_overrides=model, seq_len=16, cp=2, compile=True)
    assert _check_runnable(cfg, env, dataset).cp == 2
