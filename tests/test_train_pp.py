"""Pipeline parallelism in ``kunlun train`` (issue 29): ``--pp`` layouts checked up front with the reason, and real
torchrun ranks giving the one-process run's losses under each schedule (with the batch ramp and gradient
accumulation), composed with FSDP2 and tensor parallelism, and checkpoints that resume across pp and one process.
(pp2 x tp2 and pp2 x cp2 against one process: ``tests/test_parallel_layouts.py``.)"""

from __future__ import annotations

import pytest

from kunlunbaize.train.parallel.layout import (
    Layout,
    LayoutError,
    check_microbatches,
    check_pipeline,
    resolve_layout,
)

from .test_cli_errors import run_main


def _refused(fn, *args, match: str, **kwargs) -> None:
    with pytest.raises(LayoutError, match=match.replace("(", r"\(").replace(")", r"\)")):
        fn(*args, **kwargs)


def test_pipeline_layouts_and_their_mesh():
    assert resolve_layout(8, pp=2, tp=2) == Layout(1, 2, 2, "fsdp", pp=2)  # the ranks left over shard the data
    assert resolve_layout(2, pp=2) == Layout(1, 1, 1, "none", pp=2)
    assert resolve_layout(4, pp=2, dp_replicate=2) == Layout(2, 1, 1, "fsdp", pp=2)  # FSDP2 per stage, never DDP
    assert resolve_layout(4, cp=2, pp=2) == Layout(1, 1, 1, "fsdp", cp=2, pp=2)  # FSDP2 per stage over cp
    layout = Layout(1, 2, 2, "fsdp", pp=2)
    assert layout.shape == (2, 1, 2, 1, 2) and layout.world_size == 8 and layout.dp == 2
    # pp is the outermost dimension: ranks 0-3 are stage 0, 4-7 stage 1, each with the same data-parallel ranks
    assert [layout.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert layout.describe() == "pp 2 x dp_replicate 1 x dp_shard 2 x tp 2 (fsdp)"


@pytest.mark.parametrize(("fn", "args", "kwargs", "message"), [
    (resolve_layout, (6,), {"pp": 4}, "--pp 4 x --dp-replicate 1 x --tp 1 = 4 does not divide the 6 ranks"),
    (resolve_layout, (4,), {"pp": 2, "dp_shard": 1}, "--pp 2 x --dp-replicate 1 x --dp-shard 1 x --tp 1 = 2 ranks, "
                                                     "but 4 were launched"),
    (resolve_layout, (2,), {"pp": 0}, "--pp must be a whole number >= 1"),
    (resolve_layout, (2,), {"pp": 2, "parallel": "ddp"}, "--parallel ddp gives every rank to data parallelism"),
    (check_pipeline, (Layout(pp=2), 3, "1f1b"), {}, "n_layers = 3 does not split evenly into 2 pipeline stages"),
    (check_pipeline, (Layout(pp=2), 4, "interleaved1f1b", 3), {}, "n_layers = 4 does not split evenly into 6"),
    (check_pipeline, (Layout(pp=2), 4, "1f1b", 2), {}, "--pp-schedule 1f1b runs one stage per rank"),
    (check_pipeline, (Layout(pp=2), 4, "1f1b"), {"layers_per_stage": [3, 2]}, "--pp-layers 3,2 must give each of"),
    (check_pipeline, (Layout(pp=2), 4, "zb"), {}, "--pp-schedule 'zb' is not one of gpipe, 1f1b, interleaved1f1b"),
    (check_pipeline, (Layout(), 4, "1f1b"), {"layers_per_stage": [4]}, "--pp-layers/--pp-stages-per-rank need --pp"),
    (check_microbatches, ("1f1b", 4, [4, 2]), {}, "1f1b needs at least --pp 4 micro-batches per step, but a step "
                                                  "has 2"),
    (check_microbatches, ("interleaved1f1b", 2, [4, 5]), {}, "a multiple of count // --pp 2, but a step has 5"),
])
def test_bad_pipeline_layouts_are_refused_with_the_reason(fn, args, kwargs, message):
    _refused(fn, *args, match=message, **kwargs)


def test_good_pipeline_layouts_pass():
    check_pipeline(Layout(pp=2), 4, "interleaved1f1b", 2)
    check_pipeline(Layout(pp=2), 4, "1f1b", layers_per_stage=[3, 1])
    check_microbatches("gpipe", 4, [1, 2])  # GPipe takes any count
    check_microbatches("interleaved1f1b", 2, [1, 2, 3, 4])


def test_kunlun_train_refuses_a_pipeline_layout_before_starting(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(capsys, "train", "--pp", "2", "--set", "n_layers=3")
    assert code == 2 and "n_layers = 3 does not split evenly into 2 pipeline stages" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(capsys, "train", "--pp", "2", "--pp-layers", "2,0")
    assert code == 2 and "every stage needs at least one layer" in err


def test_pipelining_on_an_old_torch_is_refused_with_the_version(monkeypatch):
    import torch
    from torch.torch_version import TorchVersion

    from kunlunbaize.train.parallel.pipeline import require_pipelining

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.7.1"))
    with pytest.raises(RuntimeError, match=r"pipeline parallelism needs torch >= 2.8 .*found 2.7.1"):
        require_pipelining()


# --- real ranks through `kunlun train` ---------------------------------------------------------------------------
RAMP = ("--micro-batch-size", "1", "--batch-size-start", "2")  # 2 → 4 sequences: 2, then 4 micro-batches a step
TOKENS = 32 * 4 * 4  # five steps: 2 sequences, then 4


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    """The one-process run the pipelined runs must match (checkpoints at steps 2 and 4)."""
    from .test_train import _cli, _run, losses

    out = tmp_path_factory.mktemp("pp") / "one"
    run = _run(_cli(*_args(dataset, out, "--ckpt-every", "2", "--keep-last", "0", "--sample-tokens", "0")))
    assert run.returncode == 0, run.stdout + run.stderr
    want = losses(out)
    assert len(want) == 5
    return out, want


def _args(dataset, out, *extra: str) -> list[str]:
    """``kunlun train``'s arguments: the tiny model of 4 layers (four stages for interleaved 1F1B; the last
    ``--set`` item, after TRAIN_MODEL's), the batch ramp with gradient accumulation."""
    from .test_train import _common

    return [*_common(dataset, out, TOKENS, *RAMP, *extra), "n_layers=4"]


def _close(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps), got
    assert max(abs(got[s] - want[s]) for s in steps) < 1e-4, (got, want)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_kunlun_train_pp2_under_each_schedule_equals_one_process_and_resumes(dataset, tmp_path, one_process, capsys):
    """pp2 under 1F1B for two steps (the ramp's step of 2 micro-batches, then one of 4), then one process for the
    rest in the same run folder; one process's step-2 checkpoint resumed under interleaved 1F1B (two stages a rank)
    for the rest: every step's loss is the one-process run's, and the interleaved run's checkpoint exports with
    ``kunlun export --hf``. GPipe through ``kunlun train`` is the 8-rank test's below. (Until 2026-12-07 GPipe
    resumed the step-2 checkpoint here and interleaved 1F1B ran from the start in a third launch.)"""
    from .test_train import _cli, _run, _torchrun, losses

    ref, want = one_process
    out = tmp_path / "pp_then_one"
    pp = _run(_torchrun(2, *_args(dataset, out, "--pp", "2", "--stop-at-step", "2", "--sample-tokens", "0")))
    assert pp.returncode == 0, pp.stdout + pp.stderr
    assert "pp 2 x dp_replicate 1 x dp_shard 1 x tp 1 (none)" in pp.stdout + pp.stderr
    rest = _run(_cli(*_args(dataset, out, "--sample-tokens", "0")))
    assert rest.returncode == 0 and "resumed from" in rest.stderr, rest.stdout + rest.stderr
    _close(losses(out), want, range(1, 6))
    inter = _run(_torchrun(2, *_args(dataset, tmp_path / "interleaved", "--pp", "2", "--pp-schedule",
                                     "interleaved1f1b", "--pp-stages-per-rank", "2", "--resume",
                                     str(ref / "checkpoints" / "step_00000002"), "--sample-tokens", "0")))
    assert inter.returncode == 0, inter.stdout + inter.stderr
    _close(losses(tmp_path / "interleaved"), want, range(3, 6))
    code, text, err = run_main(capsys, "export", "--hf", str(tmp_path / "hf"), "--checkpoint",
                               str(tmp_path / "interleaved"))
    assert code == 0 and "reloaded logits identical" in text + err, err


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_kunlun_train_pp2_dp2_tp2_equals_one_process(dataset, tmp_path, one_process):
    """pp2 × dp_shard 2 × tp2 on one mesh (8 ranks, GPipe: a data-parallel rank's first step has one micro-batch)
    gives the one-process losses. It stops after three steps (the ramp's first step and two at the full batch: the
    five steps it once ran cost ~30 CPU-s more and checked nothing the first three do not). pp2 × tp2 and pp2 × cp2
    (4 ranks) are compared with one process, gradients included, in ``tests/test_parallel_layouts.py``'s 4-rank
    launch, through the trainer's own placement (``runner.place``)."""
    from .test_train import _run, _torchrun, losses

    _, want = one_process
    out = tmp_path / "pp_8"
    run = _run(_torchrun(8, *_args(dataset, out, "--pp", "2", "--dp-shard", "2", "--tp", "2", "--pp-schedule",
                                   "gpipe", "--stop-at-step", "3", "--sample-tokens", "0")), timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pp 2 x dp_replicate 1 x dp_shard 2 x tp 2 (fsdp)" in run.stdout + run.stderr
    _close(losses(out), want, range(1, 4))
