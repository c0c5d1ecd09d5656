"""Training-side safety: dataset identity on resume, run-folder lock, logs cut back on resume, damaged checkpoints,
Ctrl-C twice, no validation, file modes, and TrainConfig validation."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from kunlunbaize.checkpoint import CheckpointError, checkpoint_dirs
from kunlunbaize.train.logging import read_metrics
from kunlunbaize.train.trainer import TrainConfig, TrainingError, train

from .test_train import _cli, _common, _env, config

pytest.importorskip("tokenizers")


def _steps(run: Path, key: str = "loss") -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if key in r]


SHORT = 32 * 4 * 6  # tokens: a few steps


def _copy_dataset(dataset: Path, dest: Path) -> Path:
    shutil.copytree(dataset, dest)
    return dest


@pytest.mark.slow
def test_resume_refuses_a_dataset_made_with_another_tokenizer(dataset, tmp_path):
    train(config(dataset, tmp_path / "r", tokens=SHORT, stop_at_step=2))
    other = _copy_dataset(dataset, tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same vocabulary size, ids that mean other text
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match=r"another tokenizer.*resume with the --data it was trained on"):
        train(config(other, tmp_path / "r", tokens=SHORT))
    assert [p.name for p in checkpoint_dirs(tmp_path / "r" / "checkpoints")] == ["step_00000002"]
    same = _copy_dataset(dataset, tmp_path / "same")
    tok = json.loads((same / "tokenizer.json").read_text())
    tok["padding"] = {"strategy": "BatchLongest"}  # another layout and a setting that does not change ids
    (same / "tokenizer.json").write_text(json.dumps(tok, indent=4, sort_keys=True))
    assert train(config(same, tmp_path / "r", tokens=SHORT))["finished"]


@pytest.mark.slow
def test_metrics_and_tensorboard_are_cut_back_on_resume(dataset, tmp_path):
    run = tmp_path / "r"
    train(config(dataset, run, tokens=SHORT, eval_every=1, ckpt_every=2, keep_last=0, stop_at_step=4))
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if killed at step 4 with the last checkpoint at 2
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.')  # and killed half-way through a line
    summary = train(config(dataset, run, tokens=SHORT, eval_every=1))
    assert summary["finished"]
    steps = _steps(run)
    assert steps == list(range(1, summary["step"] + 1))  # each step once
    assert _steps(run, "val_loss") == sorted(set(_steps(run, "val_loss")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tb_steps = [e.step for e in events.Scalars("loss")]
    assert tb_steps == list(range(1, summary["step"] + 1))


@pytest.mark.slow
def test_fresh_run_sets_the_logs_of_an_earlier_run_aside(dataset, tmp_path):
    run = tmp_path / "r"
    train(config(dataset, run, tokens=SHORT, stop_at_step=3))
    shutil.rmtree(run / "checkpoints")  # interrupted before its first checkpoint
    summary = train(config(dataset, run, tokens=32 * 4 * 2))
    assert _steps(run) == list(range(1, summary["step"] + 1))
    assert _steps(run / "previous-1") == [1, 2, 3]
    assert (run / "previous-1" / "tensorboard").is_dir()


def test_truncate_metrics_drops_later_and_half_written_records(tmp_path):
    from kunlunbaize.train.logging import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n{"step": 3, "lo')
    assert truncate_metrics(path, 1) == 2
    assert read_metrics(path) == [{"step": 1, "loss": 2}]


@pytest.mark.slow
def test_damaged_checkpoint_is_named_and_auto_falls_back(dataset, tmp_path, capfd):
    run = tmp_path / "r"
    train(config(dataset, run, tokens=SHORT, ckpt_every=2, keep_last=0, stop_at_step=4))
    newest = run / "checkpoints" / "step_00000004"
    (newest / "rng_0.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"rng_0\.pt is damaged.*--resume .*step_N.*--resume none"):
        train(config(dataset, run, tokens=SHORT, resume=str(newest)))
    (newest / ".metadata").write_bytes(b"garbage")
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=r"step_00000004: its model/optimiser state .* is damaged"):
        train(config(dataset, run, tokens=SHORT, resume=str(newest)))
    assert "Traceback" not in capfd.readouterr().err  # DCP's own logged tracebacks are silenced
    summary = train(config(dataset, run, tokens=SHORT))  # auto: the newest is damaged, the one before is good
    err = capfd.readouterr().err
    assert "falling back to the previous checkpoint" in err and "step_00000002" in err
    assert summary["finished"] and _steps(run) == list(range(1, summary["step"] + 1))
    assert (run / "checkpoints" / "superseded-1" / "step_00000004").is_dir()  # kept, but out of the way
    assert checkpoint_dirs(run / "checkpoints")[-1] == Path(summary["checkpoint"])
    with pytest.raises(CheckpointError, match=r"/nonexistent does not exist"):
        train(config(dataset, tmp_path / "x", resume="/nonexistent"))


def test_spent_budget_into_a_new_folder_reports_the_checkpoint(trained_run, dataset, tmp_path, capfd):
    from .helpers import TRAIN_MODEL

    ckpt = checkpoint_dirs(trained_run / "checkpoints")[-1]
    cfg = TrainConfig(data=str(dataset), out=str(tmp_path / "new"), preset="tiny", model_overrides=dict(TRAIN_MODEL),
                      seq_len=32, tokens=32 * 8 * 20, batch_size=8, lr=3e-3, resume=str(ckpt), progress=False)
    summary = train(cfg)
    assert summary["checkpoint"] == str(ckpt) and summary["val_loss"] is None
    assert "nothing to train" in capfd.readouterr().err
    json.loads((tmp_path / "new" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))


@pytest.mark.slow
def test_training_without_validation(dataset, tmp_path, capfd):
    no_val = _copy_dataset(dataset, tmp_path / "noval")
    meta = json.loads((no_val / "meta.json").read_text())
    for shard in meta["splits"]["val"]["shards"]:
        (no_val / shard["file"]).unlink()
    meta["splits"]["val"] = {"shards": [], "tokens": 0, "documents": 0}  # as --val-fraction 0 writes it
    (no_val / "meta.json").write_text(json.dumps(meta))
    for data, kw, why in ((no_val, {}, "--val-fraction 0"), (dataset, {"eval_batches": 0}, "--eval-batches 0")):
        run = tmp_path / why.split()[0].strip("-")
        summary = train(config(data, run, tokens=32 * 4 * 2, **kw))
        assert summary["finished"] and summary["val_loss"] is None and "first_val_loss" not in summary
        assert _steps(run, "val_loss") == [] and (run / "loss_curve.png").is_file()
        err = capfd.readouterr().err
        assert err.count("no validation: ") == 1 and why in err


@pytest.mark.parametrize("field,value", [
    ("tokens", 0), ("batch_size", -4), ("batch_size_start", 0), ("micro_batch_size", 0), ("lr", -1.0),
    ("lr", math.nan), ("warmup_steps", -1), ("ckpt_every", 0), ("keep_last", -1), ("eval_batches", -1),
    ("weight_decay", -0.1), ("beta2", 1.0), ("batch_ramp", 2.0), ("stop_at_step", 0), ("peak_tflops", 0.0),
    ("resume", ""), ("preset", "huge"), ("decay_start", 0.99),
])
def test_nonsensical_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} = .* is invalid: it must be"):
        TrainConfig(**{field: value}).validate()


def test_every_file_honours_the_umask(trained_run, tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    files = [p for p in trained_run.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {str(p.relative_to(trained_run)): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != want} == {}
    pytest.importorskip("transformers")
    from kunlunbaize.hf.export import export_hf

    out = export_hf(trained_run, tmp_path / "hf", verify=False, log=lambda _m: None)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.stat().st_mode & 0o777 != want} == {}


class _Reader:
    """Collects a process's merged output in a thread, so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self._thread.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            if time.time() > deadline:
                pytest.fail(f"no {text!r} in output:\n{''.join(self.lines)}")
            time.sleep(0.05)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def _start(dataset: Path, out: Path) -> tuple[subprocess.Popen, _Reader]:
    proc = subprocess.Popen(_cli(*_common(dataset, out, 32 * 4 * 10_000, "--sample-tokens", "0")), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, _Reader(proc)


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(_steps(out)) < n:
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"training did not reach {n} steps (exit {proc.poll()})")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_second_run_in_the_same_folder_is_refused_until_the_first_dies(dataset, tmp_path):
    out = tmp_path / "r"
    proc, reader = _start(dataset, out)
    try:
        _wait_for_steps(out, 2, proc)
        with pytest.raises(TrainingError, match=rf"{out} is in use by another `kunlun train` \(pid {proc.pid}\)"):
            train(config(dataset, out))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up at all: the lock must not outlive the process
        proc.wait()
    reader.text()
    summary = train(config(dataset, out, tokens=32 * 4 * 2))
    assert summary["finished"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_second_ctrl_c_keeps_saving_without_a_traceback(dataset, tmp_path):
    out = tmp_path / "r"
    proc, reader = _start(dataset, out)
    try:
        _wait_for_steps(out, 3, proc)
        proc.send_signal(signal.SIGINT)
        reader.wait_for("received SIGINT: finishing this step")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = reader.text()
    assert proc.returncode == 0, output
    assert "please wait" in output and "Traceback" not in output
    (ckpt,) = checkpoint_dirs(out / "checkpoints")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] >= 3


def test_sample_prompt_comes_from_the_corpus(dataset, tmp_path):
    """The sample after training starts from the corpus's own text; `def main():` only for the embedded Python."""
    from tokenizers import Tokenizer

    from kunlunbaize.infer.sample import MAX_PROMPT_CHARS, STDLIB_PROMPT, corpus_prompt

    tok = Tokenizer.from_file(str(dataset / "tokenizer.json"))
    prompt = corpus_prompt(dataset, tok)
    assert prompt and prompt != STDLIB_PROMPT and len(prompt) <= MAX_PROMPT_CHARS
    corpus = "".join(p.read_text() for p in (Path(sysconfig.get_paths()["stdlib"])).glob("*.py")
                     if p.name in ("textwrap.py", "shlex.py", "colorsys.py", "fnmatch.py", "bisect.py", "heapq.py"))
    assert prompt in corpus
    stdlib = tmp_path / "stdlib"
    shutil.copytree(dataset, stdlib)
    meta = json.loads((stdlib / "meta.json").read_text())
    meta["sources"] = ["python-stdlib:/usr/lib/python3"]
    (stdlib / "meta.json").write_text(json.dumps(meta))
    assert corpus_prompt(stdlib, tok) == STDLIB_PROMPT


def test_cli_rerun_of_a_finished_run_says_so(trained_run, dataset, tmp_path, capsys):
    """`kunlun train` again on a finished run says once that there is nothing to train (not "resumed from …" and
    then "nothing to train", nor 'trained N steps' as if it had trained them now)."""
    from kunlunbaize.cli import main

    from .helpers import TRAIN_MODEL

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    sets = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TRAIN_MODEL.items()]
    main(["train", "--data", str(dataset), "--out", str(run), "--preset", "tiny", "--seq-len", "32", "--tokens",
          str(32 * 8 * 20), "--batch-size", "8", "--lr", "3e-3", "--eval-every", "1000", "--no-progress",
          "--sample-tokens", "0", "--set", *sets])
    out, err = capsys.readouterr()
    assert "\ntrained " not in out and "resumed from" not in err, err
    said = [ln for ln in (out + err).splitlines() if "already" in ln or "nothing to train" in ln]
    assert len(said) == 1 and said[0].startswith("nothing to train: ") and "step 22" in said[0], out + err
    assert "the run as it stands: 22 steps" in out


def test_resume_with_another_dense_lr_mult_is_refused_clearly(trained_run, tmp_path):
    """The optimiser of a --dense-lr-mult run has another layout: resuming with another value names the cause
    (not "damaged") and leaves the run as it was."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    saved = json.loads((run / "train_config.json").read_text())
    cfg = TrainConfig(**{**saved, "out": str(run), "tokens": saved["tokens"] * 2, "dense_lr_mult": 10.0})
    with pytest.raises(CheckpointError, match=r"trained with --dense-lr-mult 1, not 10"):
        train(cfg)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
