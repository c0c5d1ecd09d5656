"""The parallel layout of ``kunlun train`` (issue 29): the mesh's sizes checked up front, and tensor (+ sequence)
parallelism and its composition with FSDP2 computing what one process computes — losses, gradients and parameters
over several optimiser steps with gradient accumulation — and checkpoints that resume on another layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kunlunbaize.arch import get_arch
from kunlunbaize.config import ModelConfig
from kunlunbaize.train.parallel.layout import Layout, LayoutError, check_model, resolve_layout

from .test_cli_errors import run_main

ROOT = Path(__file__).resolve().parents[1]


# --- the layout, checked before anything starts ---------------------------------------------------------------

@pytest.mark.parametrize(("world", "kw", "want"), [
    (1, {}, Layout(1, 1, 1, "none")),
    (4, {}, Layout(4, 1, 1, "ddp")),  # --parallel auto under torchrun: DDP, as before the mesh
    (4, {"parallel": "ddp"}, Layout(4, 1, 1, "ddp")),
    (4, {"parallel": "fsdp"}, Layout(1, 4, 1, "fsdp")),
    (2, {"parallel": "none"}, Layout(2, 1, 1, "none")),
    (4, {"tp": 2}, Layout(1, 2, 2, "fsdp")),  # the ranks left over shard the data-parallel dimension
    (2, {"tp": 2}, Layout(1, 1, 2, "none")),
    (8, {"dp_replicate": 2, "tp": 2}, Layout(2, 2, 2, "fsdp")),  # HSDP × TP
    (4, {"dp_replicate": 2, "dp_shard": 1, "tp": 2}, Layout(2, 1, 2, "fsdp")),
    (4, {"dp_replicate": 4}, Layout(4, 1, 1, "ddp")),
    (4, {"dp_replicate": 2, "dp_shard": 2}, Layout(2, 2, 1, "fsdp")),
    (2, {"cp": 2}, Layout(1, 1, 1, "fsdp", cp=2)),  # cp is folded into FSDP2's sharding group
    (4, {"cp": 2}, Layout(1, 2, 1, "fsdp", cp=2)),
    (4, {"dp_replicate": 2, "cp": 2}, Layout(2, 1, 1, "fsdp", cp=2)),
    (4, {"cp": 2, "tp": 2}, Layout(1, 1, 2, "fsdp", cp=2)),  # FSDP2 over dp_shard x cp, the plan over tp
    (8, {"cp": 2, "tp": 2}, Layout(1, 2, 2, "fsdp", cp=2)),
])
def test_layout_from_the_options(world, kw, want):
    assert resolve_layout(world, **kw) == want


def test_the_layout_is_checked_without_importing_torch():
    code = ("import sys, kunlunbaize.train.parallel.layout as m; m.resolve_layout(4, tp=2); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.distributed
def test_context_parallel_attention_and_conv_halos_equal_the_whole_sequence():
    """2 gloo ranks (spawned): the load-balanced split, the attention over gathered keys/values and the causal
    convolutions' halos give the whole-sequence outputs and gradients (``tests.parallel_worker.cp_units``)."""
    import socket

    import torch.multiprocessing as mp

    from .parallel_worker import cp_units

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(cp_units, args=(port,), nprocs=2, join=True)


def test_tensor_parallel_ranks_share_a_data_parallel_rank():
    layout = Layout(2, 1, 2, "fsdp")
    assert [layout.dp_rank(r) for r in range(4)] == [0, 0, 1, 1] and layout.dp == 2
    assert layout.describe() == "dp_replicate 2 x dp_shard 1 x tp 2 (fsdp)"
    assert Layout(1, 4, 1, "fsdp").describe() == "fsdp" and Layout(1, 1, 1, "none").describe() == "none"


def test_context_parallel_ranks_share_a_data_parallel_rank():
    layout = Layout(2, 1, 1, "fsdp", cp=2)
    assert [layout.dp_rank(r) for r in range(4)] == [0, 0, 1, 1] and layout.dp == 2
    assert [layout.cp_rank(r) for r in range(4)] == [0, 1, 0, 1] and layout.shape == (1, 2, 1, 2, 1)
    assert layout.describe() == "dp_replicate 2 x dp_shard 1 x cp 2 x tp 1 (fsdp)"


@pytest.mark.parametrize(("world", "kw", "message"), [
    (4, {"tp": 3}, "--dp-replicate 1 x --tp 3 = 3 does not divide the 4 ranks"),
    (4, {"dp_shard": 4, "tp": 2}, "--dp-replicate 1 x --dp-shard 4 x --tp 2 = 8 ranks, but 4 were launched"),
    (4, {"parallel": "ddp", "tp": 2}, "--parallel ddp gives every rank to data parallelism"),
    (2, {"tp": 0}, "--tp must be a whole number >= 1"),
    (4, {"cp": 3}, "--dp-replicate 1 x --cp 3 x --tp 1 = 3 does not divide the 4 ranks"),
    (4, {"dp_shard": 4, "cp": 2}, "--dp-replicate 1 x --dp-shard 4 x --cp 2 x --tp 1 = 8 ranks, but 4 were"),
    (2, {"parallel": "ddp", "cp": 2}, "--parallel ddp gives every rank to data parallelism"),
    (2, {"cp": 0}, "--cp must be a whole number >= 1"),
])
def test_layouts_that_do_not_fit_the_ranks_are_refused(world, kw, message):
    with pytest.raises(LayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(world, **kw)


@pytest.mark.parametrize(("overrides", "seq_len", "message"), [
    ({"n_heads": 6, "n_kv_heads": 6, "d_model": 48}, 32, "--tp 4 does not divide n_heads = 6"),
    ({"n_kv_heads": 2}, 32, "n_kv_heads = 2 (key/value heads (GQA KV heads are split, not replicated))"),
    ({"vocab_size": 258}, 32, "vocab_size = 258"),
    ({"scale_ffn_hidden": 6}, 32, "scale_hidden = 6"),
    ({"transformerx": False, "ffn_hidden": 66}, 32, "ffn_hidden = 66"),
    ({}, 30, "--tp 4 does not divide --seq-len 30"),
])
def test_models_that_do_not_split_over_tp_are_refused(overrides, seq_len, message):
    base = {"vocab_size": 256, "d_model": 64, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 128}
    cfg = ModelConfig(**{**base, **overrides})
    with pytest.raises(LayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_model(Layout(1, 1, 4, "none"), cfg, seq_len)
    check_model(Layout(1, 1, 1, "none"), cfg, seq_len)  # nothing to split without tensor parallelism


def test_a_sequence_that_does_not_split_over_cp_is_refused():
    cfg = ModelConfig(vocab_size=256, d_model=64, n_heads=8, n_kv_heads=4, ffn_hidden=128)
    with pytest.raises(LayoutError, match=r"--cp 2 needs --seq-len divisible by 2 x 2 = 4 .*got 30"):
        check_model(Layout(1, 1, 1, "fsdp", cp=2), cfg, 30)
    check_model(Layout(1, 1, 1, "fsdp", cp=2), cfg, 28)


def test_a_cp_rank_part_that_does_not_split_over_tp_is_refused():
    """Sequence parallelism shards each cp rank's part of the sequence (seq_len / cp), not the whole sequence."""
    cfg = ModelConfig(vocab_size=256, d_model=64, n_heads=8, n_kv_heads=4, ffn_hidden=128)
    with pytest.raises(LayoutError, match=r"--tp 4 does not divide --seq-len 20 / --cp 2 = 10 .*divisible by 8"):
        check_model(Layout(1, 1, 4, "fsdp", cp=2), cfg, 20)
    check_model(Layout(1, 1, 4, "fsdp", cp=2), cfg, 24)


def test_kunlun_train_refuses_a_layout_before_starting(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, _, err = run_main(capsys, "train", "--tp", "3")
    assert code == 2 and "--tp 3 = 3 does not divide the 4 ranks" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(capsys, "train", "--cp", "2", "--seq-len", "30")
    assert code == 2 and "--cp 2 needs --seq-len divisible by 2 x 2 = 4" in err and len(err.strip().splitlines()) == 1


def test_an_architecture_without_a_plan_is_refused_tensor_parallelism():
    from kunlunbaize.train.parallel.mesh import tensor_parallel

    llama = get_arch("llama")
    assert "parallelize" not in llama.hooks and "parallelize" in get_arch("kunlunbaize").hooks
    with pytest.raises(LayoutError, match="no tensor-parallel plan; train it with --tp 1"):
        tensor_parallel(object(), llama, Layout(1, 1, 2, "none"), None)


def test_an_architecture_without_a_plan_is_refused_context_parallelism():
    from kunlunbaize.train.parallel.mesh import context_parallel

    assert "context_parallel" in get_arch("kunlunbaize").hooks
    with pytest.raises(LayoutError, match="no context-parallel plan; train it with --cp 1"):
        context_parallel(object(), get_arch("llama"), Layout(1, 1, 1, "fsdp", cp=2), None)


def test_tensor_parallelism_on_an_old_torch_is_refused_with_the_version(monkeypatch):
    import torch
    from torch.torch_version import TorchVersion

    from kunlunbaize.train.parallel.mesh import tensor_parallel

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    with pytest.raises(LayoutError, match=r"--tp needs torch >= 2.6 .*this is torch 2.5.1"):
        tensor_parallel(object(), get_arch("kunlunbaize"), Layout(1, 1, 2, "none"), None)


# --- real ranks: the same numbers as one process ---------------------------------------------------------------

def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def _worker(tmp_path: Path, nproc: int, spec: dict) -> dict:
    """Run ``tests/parallel_worker.py`` on ``nproc`` ranks; its results."""
    spec = {"steps": 2, "accum": 2, "batch": 4, "seq": 16, "out": str(tmp_path), **spec}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           "-m", "tests.parallel_worker", str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp_path / "result.json").read_text())


def _assert_equal(results: dict) -> None:
    for name, r in results.items():
        assert r["loss"] < 1e-5 and r["grad"] < 1e-6 and r["grad_norm"] < 1e-5, (name, r)
        assert r["param"] < 1e-4, (name, r)  # AdamW at lr 1e-2 after two steps: float rounding, amplified
        for where, d in r.get("resume", {}).items():
            assert d["loss"] < 1e-5 and d["param"] < 1e-4, (name, where, d)


FULL = {"mtp_depth": 2, "conv_kernel_sizes": [3, 7]}
ABLATIONS = [{"dense_residual": False}, {"transformerx": False}, {"mtp_depth": 0},
             {"tie_embeddings": True, "mtp_share_head": True, "eswish_per_channel": True,
              "conv_kernel_sizes": [1, 4], "dense_init": "identity", "activation_checkpointing": True}]


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_equals_one_process_for_the_model_and_every_switch(tmp_path):
    """tp2 with sequence parallelism: the full model (resumed from its tp2 checkpoint in one process and on tp2)
    and each single-switch ablation, plus tied/shared heads, per-channel eSwish, a kernel of 1, activation
    checkpointing."""
    results = _worker(tmp_path, 2, {"layouts": [[1, 1, 2]], "configs": [FULL, *ABLATIONS],
                                    "resume_on": [None, [1, 1, 2]]})
    assert len(results) == 1 + len(ABLATIONS) and set(next(iter(results.values()))["resume"]) == {"None",
                                                                                                  "[1, 1, 2]"}
    _assert_equal(results)


@pytest.mark.slow
@pytest.mark.distributed
def test_dp2_tp2_hsdp_tp2_and_dp2_cp2_equal_one_process_and_reshard_to_dp4(tmp_path):
    """4 ranks: FSDP2 over dp_shard 2 × tp 2, HSDP (dp_replicate 2) × tp 2 and FSDP2 over dp_shard 2 × cp 2 (the
    context-parallel ranks folded into the sharding group); the dp2×tp2 checkpoint resumed on dp_shard 4 and in one
    process."""
    results = _worker(tmp_path, 4, {"layouts": [[1, 2, 2], [2, 1, 2], [1, 2, 2, 1]], "configs": [FULL], "batch": 8,
                                    "resume_on": [[1, 4, 1], None]})
    assert len(results) == 3
    _assert_equal(results)


@pytest.mark.slow
@pytest.mark.distributed
def test_cp2_equals_one_process_for_the_model_and_every_switch(tmp_path):
    """cp2 (each sequence split in 4 chunks, rank 0 holding the first and last): the full model (resumed from its cp2
    checkpoint in one process and on cp2) and each single-switch ablation, plus tied/shared heads, per-channel
    eSwish, a kernel of 1 and activation checkpointing (its recomputation gathers again). Kernel 7 over chunks of 4
    tokens: a halo spans two earlier chunks."""
    results = _worker(tmp_path, 2, {"layouts": [[1, 1, 2, 1]], "configs": [FULL, *ABLATIONS],
                                    "resume_on": [None, [1, 1, 2, 1]]})
    assert len(results) == 1 + len(ABLATIONS) and set(next(iter(results.values()))["resume"]) == {"None",
                                                                                                  "[1, 1, 2, 1]"}
    _assert_equal(results)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_kunlun_train_tp2_resumes_across_layouts_and_exports(dataset, tmp_path, capsys):
    """Through ``kunlun train``: tp2 (with the batch ramp, 2 → 4 sequences, and gradient accumulation) gives the
    one-process losses; its checkpoint resumes in one process, a one-process checkpoint resumes on tp2, both with
    the one-process losses after; a tp2 checkpoint exports with ``kunlun export --hf``."""
    from .test_train import _cli, _common, _run, _torchrun, losses

    tokens, micro = 32 * 4 * 4, ("--micro-batch-size", "2", "--batch-size-start", "2")
    one = _run(_cli(*_common(dataset, tmp_path / "one", tokens, *micro, "--ckpt-every", "2", "--keep-last", "0",
                             "--sample-tokens", "0")))
    assert one.returncode == 0, one.stdout + one.stderr
    want = losses(tmp_path / "one")
    # tp2 for two steps, then one process for the rest, in one run folder
    out = tmp_path / "tp_then_one"
    tp = _run(_torchrun(2, *_common(dataset, out, tokens, *micro, "--tp", "2", "--stop-at-step", "2")))
    assert tp.returncode == 0, tp.stdout + tp.stderr
    assert "dp_replicate 1 x dp_shard 1 x tp 2 (none)" in tp.stdout + tp.stderr
    rest = _run(_cli(*_common(dataset, out, tokens, *micro, "--sample-tokens", "0")))
    assert rest.returncode == 0 and "resumed from" in rest.stderr, rest.stdout + rest.stderr
    # one process's step-2 checkpoint resumed on tp2
    again = _run(_torchrun(2, *_common(dataset, tmp_path / "one_then_tp", tokens, *micro, "--tp", "2", "--resume",
                                       str(tmp_path / "one" / "checkpoints" / "step_00000002"))))
    assert again.returncode == 0, again.stdout + again.stderr
    got, resumed = losses(out), losses(tmp_path / "one_then_tp")
    assert len(want) == 5  # the first step at 2 sequences (one micro-batch), then 4 (two accumulated)
    assert sorted(got) == sorted(want) and sorted(resumed) == [s for s in sorted(want) if s > 2]
    assert max(abs(got[s] - want[s]) for s in want) < 1e-4
    assert max(abs(resumed[s] - want[s]) for s in resumed) < 1e-4
    code, text, err = run_main(capsys, "export", "--hf", str(tmp_path / "hf"), "--checkpoint",
                               str(tmp_path / "one_then_tp"))
    assert code == 0 and "reloaded logits identical" in text + err, err


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_kunlun_train_cp2_resumes_with_the_one_process_losses(dataset, tmp_path):
    """Through ``kunlun train --cp 2``, with the batch ramp (2 → 4 sequences), gradient accumulation and validation:
    stopped after step 2 and resumed on cp2, the training and validation losses are one process's."""
    from .test_train import _cli, _common, _run, _torchrun, losses

    tokens, extra = 32 * 4 * 4, ("--micro-batch-size", "2", "--batch-size-start", "2", "--eval-every", "2",
                                 "--sample-tokens", "0")
    one = _run(_cli(*_common(dataset, tmp_path / "one", tokens, *extra)))
    assert one.returncode == 0, one.stdout + one.stderr
    out = tmp_path / "cp"
    first = _run(_torchrun(2, *_common(dataset, out, tokens, *extra, "--cp", "2", "--stop-at-step", "2")))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "dp_replicate 1 x dp_shard 1 x cp 2 x tp 1 (fsdp)" in first.stdout + first.stderr
    rest = _run(_torchrun(2, *_common(dataset, out, tokens, *extra, "--cp", "2")))
    assert rest.returncode == 0 and "resumed from" in rest.stdout + rest.stderr, rest.stdout + rest.stderr
    want, got = losses(tmp_path / "one"), losses(out)
    assert len(want) == 5 and sorted(got) == sorted(want)
    assert max(abs(got[s] - want[s]) for s in want) < 1e-4
    want_val, got_val = _val_losses(tmp_path / "one"), _val_losses(out)
    assert sorted(want_val) == sorted(got_val) == [0, 2, 4, 5]
    assert max(abs(got_val[s] - want_val[s]) for s in want_val) < 1e-4


def _val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
