"""Compiled blocks (``--compile``) under tensor and context parallelism (issue 29): the blocks compiled after the
parallel plan, as the trainer places them, give the one-process run's losses and every gradient. The embedding's output
enters the first compiled block; while it was an ``AsyncCollectiveTensor`` the compiled backward gave it no
gradient (the embedding's gradient was off by up to 0.04)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_parallel import FULL

ROOT = Path(__file__).resolve().parents[1]
# two steps of two accumulated micro-batches of 2 sequences of 16 tokens, on one data-parallel rank
SPEC = {"samples": 8, "batch": 4, "batch_start": 4, "ramp": 0.0, "micro": 2, "seq": 16}


def _worker(tmp_path: Path, nproc: int, runs: list[dict]) -> dict:
    """``tests/parallel_layouts_worker.py`` on ``nproc`` ranks over ``runs``; its results."""
    (tmp_path / "spec.json").write_text(json.dumps({**SPEC, "runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           "-m", "tests.parallel_layouts_worker", str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp_path / "result.json").read_text())


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


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_blocks_under_tp2_and_cp2_equal_one_process(tmp_path):
    """2 ranks, tp2 then cp2 (one launch), the full model (dense residual, TransformerX, MTP depth 2) with its blocks
    compiled as the trainer compiles them: two steps of two accumulated micro-batches give one eager process's
    losses, gradients before every step, gradient norms and parameters (fp32). The backend is ``aot_eager``: the tp
    fault was in AOTAutograd (inductor gave the same wrong gradient), and inductor's code generation takes tens of
    minutes on a loaded 2-core machine."""
    runs = [{"config": FULL, "layout": layout, "mode": "compile-aot_eager"} for layout in ([1, 1, 2], [1, 1, 1, 2])]
    results = _worker(tmp_path, 2, runs)
    assert len(results) == 2, results
    for r in results.values():
        assert r["steps"] == [[4, 2], [4, 2]], r
        assert r["first_grad"] < 1e-6 and r["first_grad_norm"] < 1e-5, r  # the same parameters: float rounding
        assert r["loss"] < 1e-5 and r["grad"] < 1e-5 and r["grad_norm"] < 1e-5, r
        assert r["param"] < 1e-4, r  # AdamW at lr 1e-2 amplifies float rounding in the parameters
