"""The parallel layout of ``kunlun train`` (issue 29): the mesh's sizes checked up front, and ``kunlun train`` under
tp2 and cp2 giving the one-process losses, with checkpoints that resume on another layout. The comparisons on real
ranks against one process (losses, gradients and parameters over several optimiser steps with gradient
accumulation; tp2 and cp2 for the model and every switch, the context-parallel pieces, their compositions with FSDP2)
are ``tests/test_parallel_layouts.py``'s, in one launch per rank count."""

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


TOKENS, RAMP = 32 * 4 * 4, ("--micro-batch-size", "2", "--batch-size-start", "2")  # ramp 2 -> 4 sequences


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory) -> Path:
    """The one-process ``kunlun train`` run both tests below match: 5 steps of the batch ramp with gradient
    accumulation, checkpoints at steps 2 and 4, validation every 2 steps (no effect on the training losses)."""
    from .test_train import _cli, _common, _run

    out = tmp_path_factory.mktemp("parallel") / "one"
    one = _run(_cli(*_common(dataset, out, TOKENS, *RAMP, "--ckpt-every", "2", "--keep-last", "0", "--eval-every",
                             "2", "--sample-tokens", "0")))
    assert one.returncode == 0, one.stdout + one.stderr
    return out


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_kunlun_train_tp2_resumes_across_layouts_and_exports(dataset, one_process, tmp_path, capsys):
    """Through ``kunlun train``, in one run folder: one process's step-2 checkpoint resumed on tp2 for two steps (2
    accumulated micro-batches each), then tp2's step-4 checkpoint resumed in one process for the last step: every
    step's loss is the one-process run's, and the tp2 checkpoint exports with ``kunlun export --hf``. (tp2 from step 1
    through the ramp's change of accumulation: ``tests/test_parallel_layouts.py``'s tp2 ramp run, through the
    trainer's own placement and batch plan. Until 2026-12-07 a second tp2 launch ran steps 1-2 here.)"""
    from .test_train import _cli, _common, _run, _torchrun, losses

    want = losses(one_process)
    assert len(want) == 5  # the first step at 2 sequences (one micro-batch), then 4 (two accumulated)
    out = tmp_path / "one_then_tp_then_one"
    keep = ("--keep-last", "0", "--sample-tokens", "0")  # step 4's checkpoint stays for the export
    tp = _run(_torchrun(2, *_common(dataset, out, TOKENS, *RAMP, *keep, "--tp", "2", "--stop-at-step", "4", "--resume",
                                    str(one_process / "checkpoints" / "step_00000002"))))
    assert tp.returncode == 0, tp.stdout + tp.stderr
    assert "dp_replicate 1 x dp_shard 1 x tp 2 (none)" in tp.stdout + tp.stderr
    rest = _run(_cli(*_common(dataset, out, TOKENS, *RAMP, *keep)))
    assert rest.returncode == 0 and "resumed from" in rest.stderr, rest.stdout + rest.stderr
    got = losses(out)
    assert sorted(got) == [3, 4, 5] and max(abs(got[s] - want[s]) for s in got) < 1e-4, (got, want)
    code, text, err = run_main(capsys, "export", "--hf", str(tmp_path / "hf"), "--checkpoint",
                               str(out / "checkpoints" / "step_00000004"))
    assert code == 0 and "reloaded logits identical" in text + err, err


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_kunlun_train_cp2_resumes_with_the_one_process_losses(dataset, one_process, tmp_path):
    """Through ``kunlun train --cp 2``, with gradient accumulation and validation: one process's step-2 checkpoint
    resumed on cp2 trains to the end with the one-process training and validation losses. (A cp2 checkpoint resumed
    in one process and on cp2: ``tests/test_parallel_layouts.py``'s cp2 run. Until 2026-12-07 cp2 also trained steps
    1-2 here, in a launch of its own.)"""
    from .test_train import _common, _run, _torchrun, losses

    out = tmp_path / "cp"
    run = _run(_torchrun(2, *_common(dataset, out, TOKENS, *RAMP, "--eval-every", "2", "--sample-tokens", "0", "--cp",
                                     "2", "--resume", str(one_process / "checkpoints" / "step_00000002"))))
    assert run.returncode == 0 and "resumed from" in run.stdout + run.stderr, run.stdout + run.stderr
    assert "dp_replicate 1 x dp_shard 1 x cp 2 x tp 1 (fsdp)" in run.stdout + run.stderr
    want, got = losses(one_process), losses(out)
    assert len(want) == 5 and sorted(got) == [3, 4, 5]
    assert max(abs(got[s] - want[s]) for s in got) < 1e-4
    want_val, got_val = _val_losses(one_process), _val_losses(out)
    assert sorted(want_val) == [0, 2, 4, 5] and sorted(got_val) == [4, 5], got_val
    assert max(abs(got_val[s] - want_val[s]) for s in got_val) < 1e-4


def _val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
