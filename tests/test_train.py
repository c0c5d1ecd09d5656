"""Training loop: exact resume, NaN guard, signals, DDP == single process, FSDP2 + DCP resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kunlunbaize.checkpoint import CheckpointError, checkpoint_dirs
from kunlunbaize.model import KunlunBaize, ModelOutput
from kunlunbaize.train.trainer import TrainConfig, TrainingError, train

from .helpers import TRAIN_MODEL as MODEL

pytest.importorskip("tokenizers")


def config(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(dataset), out=str(out), preset="tiny", model_overrides=dict(MODEL), seq_len=32,
                tokens=32 * 4 * 12, batch_size=4, batch_size_start=2, batch_ramp=0.3, lr=3e-3, log_every=1,
                eval_every=4, eval_batches=2, ckpt_every=1000, progress=False, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.subprocess
def test_resume_reproduces_uninterrupted_run(dataset, tmp_path):
    straight = train(config(dataset, tmp_path / "a"))
    assert straight["finished"] and straight["val_loss"] < straight["first_val_loss"]
    first = train(config(dataset, tmp_path / "b", stop_at_step=5))
    assert not first["finished"] and first["step"] == 5
    resumed = train(config(dataset, tmp_path / "b"))
    assert resumed["finished"] and resumed["step"] == straight["step"]
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == straight["step"]
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}  # bitwise equal
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "b" / "dense_residual_weights.png").stat().st_size > 1000
    again = train(config(dataset, tmp_path / "b"))  # a finished run re-run: reports, trains nothing
    assert again["step"] == resumed["step"] and again["val_loss"] == resumed["val_loss"]
    ckpt = Path(resumed["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "tokenizer.json").is_file()  # self-contained for generation


def test_fresh_run_refuses_folder_with_checkpoints_and_bad_checkpoint_is_reported(dataset, tmp_path):
    train(config(dataset, tmp_path / "r", stop_at_step=2))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(config(dataset, tmp_path / "r", resume="none"))
    (ckpt,) = checkpoint_dirs(tmp_path / "r" / "checkpoints")
    for f in ckpt.glob("*.distcp"):
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not load checkpoint"):
        train(config(dataset, tmp_path / "r"))
    with pytest.raises(CheckpointError, match=r"different model config \(n_layers\)"):
        train(config(dataset, tmp_path / "r", model_overrides={**MODEL, "n_layers": 3}))


@pytest.mark.slow
def test_a_checkpoint_older_than_a_config_field_resumes(dataset, tmp_path):
    """A checkpoint written before a ModelConfig field existed (its config.json lacks it) resumes when the run
    uses that field's default, and is refused, naming the field, when it does not."""
    import json

    train(config(dataset, tmp_path / "r", stop_at_step=2))
    (ckpt,) = checkpoint_dirs(tmp_path / "r" / "checkpoints")
    saved = json.loads((ckpt / "config.json").read_text())
    del saved["conv_init"]
    (ckpt / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"different model config \(conv_init\)"):
        train(config(dataset, tmp_path / "r", stop_at_step=3, model_overrides={**MODEL, "conv_init": "fan_in"}))
    assert train(config(dataset, tmp_path / "r", stop_at_step=3))["step"] == 3


def test_interrupted_save_is_not_resumed(dataset, tmp_path):
    train(config(dataset, tmp_path / "r", stop_at_step=2))
    (tmp_path / "r" / "checkpoints" / "step_00000009.tmp").mkdir()  # a save killed half-way
    assert [p.name for p in checkpoint_dirs(tmp_path / "r" / "checkpoints")] == ["step_00000002"]


def test_nan_guard_skips_then_aborts(dataset, tmp_path, monkeypatch):
    original = KunlunBaize.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs) -> ModelOutput:
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (3,) or calls["n"] >= 8:  # one bad step, later every step
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(KunlunBaize, "forward", poisoned)
    cfg = config(dataset, tmp_path / "n", batch_size=2, batch_size_start=2, max_bad_steps=3)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_steps") == 1 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kunlunbaize.cli", "train", *args]


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone",
            "-m", "kunlunbaize.cli", "train", *args]


def _common(dataset: Path, out: Path, tokens: int, *extra: str) -> list[str]:
    sets = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in MODEL.items()]
    return ["--data", str(dataset), "--out", str(out), "--preset", "tiny", "--seq-len", "32",
            "--tokens", str(tokens), "--batch-size", "4", "--batch-size-start", "4", "--lr", "3e-3",
            "--log-every", "1", "--eval-every", "1000", "--warmup-steps", "2", "--no-progress", *extra,
            "--set", *sets]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run in a new process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_saves_and_exits_cleanly(dataset, tmp_path):
    out = tmp_path / "s"
    proc = subprocess.Popen(_cli(*_common(dataset, out, 32 * 4 * 10_000)), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output
    assert "sample (" not in output  # asked to stop: no sample to wait for
    (ckpt,) = checkpoint_dirs(out / "checkpoints")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] >= 3


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_ddp_two_ranks_equals_one_process(dataset, tmp_path):
    tokens = 32 * 4 * 6
    one = _run(_cli(*_common(dataset, tmp_path / "one", tokens)))
    assert one.returncode == 0, one.stdout + one.stderr
    assert "seed 0; MTP self-speculative" in one.stdout  # the main job ends by generating
    two = _run(_torchrun(2, *_common(dataset, tmp_path / "two", tokens, "--parallel", "ddp", "--sample-tokens", "0")))
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # Same global batch, gradients averaged over ranks: equal up to float reduction order.
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_fsdp_two_ranks_trains_and_resumes_on_one(dataset, tmp_path):
    """FSDP2 on two ranks trains two steps and writes one DCP shard a rank; one process resumes its checkpoint and
    trains the last two (the run was 4 + 4 steps until 2026-12-07: the later steps showed nothing more)."""
    out = tmp_path / "f"
    two = _run(_torchrun(2, *_common(dataset, out, 32 * 4 * 4, "--parallel", "fsdp", "--stop-at-step", "2",
                                     "--sample-tokens", "0")))
    assert two.returncode == 0, two.stdout + two.stderr
    (ckpt,) = checkpoint_dirs(out / "checkpoints")
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    one = _run(_cli(*_common(dataset, out, 32 * 4 * 4, "--sample-tokens", "0")))
    assert one.returncode == 0, one.stdout + one.stderr
    loss = losses(out)
    assert sorted(loss) == list(range(1, 5)) and all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    assert "resumed from" in one.stderr


def test_llama_baseline_trains_through_the_same_loop_with_matched_params(dataset, tmp_path):
    from kunlunbaize import ModelConfig
    from kunlunbaize.arch.llama_baseline import LlamaBaseline

    cfg = ModelConfig.preset("tiny", vocab_size=320, **MODEL)
    llama = LlamaBaseline(cfg)
    target = cfg.num_params() - cfg.param_breakdown()["mtp"]
    assert abs(llama.num_params() - target) / target < 0.02  # FFN widened to match, up to rounding
    summary = train(config(dataset, tmp_path / "llama", arch="llama", tokens=32 * 4 * 6))
    assert summary["finished"] and summary["val_loss"] < summary["first_val_loss"]
    assert summary["params"] == llama.num_params()


def test_llama_baseline_activation_checkpointing_stores_less_with_the_same_gradients():
    """``--activation-checkpointing`` on the Llama baseline goes through transformers' current API (no deprecation
    warning) and recomputes its layers: fewer saved activations, the same gradients."""
    import warnings

    from kunlunbaize import ModelConfig
    from kunlunbaize.arch.llama_baseline import LlamaBaseline

    torch.manual_seed(0)
    llama = LlamaBaseline(ModelConfig.preset("tiny", vocab_size=320, **MODEL)).train()
    ids = torch.randint(0, 320, (2, 16))

    def run() -> tuple[dict[str, torch.Tensor], int]:
        saved: list[int] = []
        llama.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            llama(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in llama.named_parameters()}, sum(saved)

    plain, stored_plain = run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        llama.set_activation_checkpointing(True)
    ckpt, stored_ckpt = run()
    assert stored_ckpt < stored_plain / 2
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)
    llama.set_activation_checkpointing(False)
    assert run()[1] == stored_plain
