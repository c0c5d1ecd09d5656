"""A long command's output off a terminal: plain progress lines at a steady interval, no carriage returns."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from kunlunbaize.progress import INTERVAL, INTERVAL_ENV, Progress, duration, interval_from_env


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_a_plain_line_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = Progress(130, desc="train", unit="step", stream=out, interval=30, clock=clock)
    assert bar.bar is None  # a StringIO is no terminal: no tqdm
    for step in range(1, 131):
        clock.now += 1.0  # one second a step
        bar.set(step, {"tokens": f"{step * 4096:,}", "loss": f"{9 - step / 30:.3f}"})
    bar.close()
    bar.close()  # a second close prints nothing more
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 5  # at 30, 60, 90 and 120 s, then the end at 130
    assert lines[0] == "train: step 30/130 (23%) | tokens 122,880 | loss 8.000 | 30s elapsed, ETA 1m40s"
    assert lines[-1] == "train: step 130/130 (100%) | tokens 532,480 | loss 4.667 | 2m10s elapsed"


def test_a_resumed_job_counts_its_rate_from_where_it_started():
    out, clock = io.StringIO(), Clock()
    bar = Progress(200, desc="train", unit="step", initial=100, stream=out, interval=10, clock=clock)
    clock.now += 10
    bar.set(110)
    assert out.getvalue() == "train: step 110/200 (55%) | 10s elapsed, ETA 1m30s\n"


def test_counted_items_bytes_and_unknown_totals():
    out, clock = io.StringIO(), Clock()
    with Progress(3, desc="reading", unit="file", stream=out, interval=60, clock=clock) as bar:
        assert list(bar.wrap("abc")) == ["a", "b", "c"]
    assert out.getvalue() == "reading: 3/3 files (100%) | 0s elapsed\n"
    out = io.StringIO()
    with Progress(31_500_000, desc="tokenizing", unit="B", unit_scale=True, stream=out, clock=clock) as bar:
        bar.update(12_345_678)
    assert out.getvalue().startswith("tokenizing: 12.3MB/31.5MB (39%)")
    out = io.StringIO()
    with Progress(None, desc="x", unit="reply", stream=out, clock=clock) as bar:
        bar.update(7)
    assert out.getvalue() == "x: 7 replies | 0s elapsed\n"


def test_messages_pass_through_and_a_disabled_progress_is_silent():
    out = io.StringIO()
    bar = Progress(5, desc="x", stream=out, enabled=False)
    bar.update(5)
    bar.write("hello")
    bar.close()
    assert out.getvalue() == ""
    bar = Progress(5, desc="x", stream=out, interval=1e9)
    bar.write("note")
    assert out.getvalue() == "note\n"


def test_on_a_terminal_it_is_a_tqdm_bar():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = Progress(10, desc="x", unit="step", stream=out, tty=True)
    assert bar.bar is not None
    bar.set(10, {"loss": "1.0"})
    bar.close()
    assert "10/10" in out.getvalue()


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_from_env() == INTERVAL == 30.0
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=INTERVAL_ENV):
            interval_from_env()
    assert (duration(5), duration(187), duration(3725)) == ("5s", "3m07s", "1h02m")


def test_kunlun_train_into_a_pipe_prints_progress_lines(dataset, tmp_path):
    """The end-to-end case of the issue: stdout and stderr are pipes, and the run still says how far it is."""
    from .conftest import TRAIN_MODEL

    sets = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TRAIN_MODEL.items()]
    env = {**os.environ, INTERVAL_ENV: "0.001", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kunlunbaize.cli", "train", "--data", str(dataset), "--out",
                        str(tmp_path / "run"), "--preset", "tiny", "--seq-len", "32", "--tokens", str(32 * 8 * 4),
                        "--batch-size", "8", "--log-every", "2", "--sample-tokens", "0", "--set", *sets],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train: step ")]
    assert len(lines) >= 2, r.stderr  # every log step (the interval is tiny), the last one at the end
    assert re.fullmatch(r"train: step (\d+)/\1 \(100%\) \| tokens 1,\d{3} \| loss \d\.\d{3} \| val \d\.\d{3} \| "
                        r"lr \S+ \| tok/s [\d,]+ \| \d+s elapsed", lines[-1]), lines[-1]
    assert "\r" not in r.stderr + r.stdout


def test_post_training_off_a_terminal_prints_plain_lines_not_tqdm_bars(tmp_path, capfd, monkeypatch):
    """transformers' Trainer (under TRL's SFT, DPO and reward trainers) draws tqdm bars; in a log they give way to
    plain lines."""
    pytest.importorskip("transformers")
    import torch
    from transformers import Trainer, TrainingArguments

    from kunlunbaize.posttrain.models import plain_progress

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, labels):
            return {"loss": ((self.w * x - labels) ** 2).mean()}

    monkeypatch.setenv(INTERVAL_ENV, "0.001")
    rows = [{"x": torch.tensor([float(i)]), "labels": torch.tensor([2.0 * i])} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no")
    trainer = plain_progress(Trainer(model=Tiny(), args=args, train_dataset=rows), "sft", tty=False)
    trainer.train()
    err = capfd.readouterr().err
    assert "\r" not in err
    assert re.search(r"^sft: step 3/3 \(100%\) \| loss [\d.]+ \| \d+s elapsed$", err, re.M), err


@pytest.mark.parametrize("run", ["trained_run", "llama_run"])
def test_export_prints_no_progress_bars(run, tmp_path, request):
    """`kunlun export --hf` says what it wrote, without transformers' loading bars (carriage returns) around it."""
    pytest.importorskip("transformers")
    folder = request.getfixturevalue(run)
    r = subprocess.run([sys.executable, "-m", "kunlunbaize.cli", "export", "--checkpoint", str(folder), "--hf",
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout + r.stderr and "Loading weights" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("exported ") and "reloaded logits identical" in r.stderr, r.stderr


def test_progress_bars_are_silenced_only_while_writing(tmp_path):
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from kunlunbaize.hf.export import no_progress_bars, write_folder

    seen = []
    assert hf_logging.is_progress_bar_enabled()
    write_folder(tmp_path / "out", lambda tmp: (tmp.mkdir(), seen.append(hf_logging.is_progress_bar_enabled())))
    assert seen == [False] and hf_logging.is_progress_bar_enabled() and (tmp_path / "out").is_dir()
    hf_logging.disable_progress_bar()
    try:
        with no_progress_bars():
            pass
        assert not hf_logging.is_progress_bar_enabled()  # left as it was: off
    finally:
        hf_logging.enable_progress_bar()


def test_the_loss_plot_pairs_each_training_loss_with_its_validation_loss(tmp_path):
    """The main job's records (a committed run of the same settings): every panel shows one loss, training against
    validation (the joint loss, which adds the MTP terms, is not drawn beside the next-token validation loss)."""
    pytest.importorskip("matplotlib")
    from pathlib import Path

    from kunlunbaize.train.logging import read_metrics
    from kunlunbaize.train.plots import TRAIN_LABEL, VAL_LABEL, loss_series, plot_losses

    records = read_metrics(Path(__file__).resolve().parents[1] / "results/ablation-500k/runs/full-s0/metrics.jsonl")
    panels = loss_series(records)
    assert list(panels) == ["next token (main head)", "MTP depth 1 (predicts token t+2)",
                            "MTP depth 2 (predicts token t+3)"]
    for lines in panels.values():
        assert [label for label, _, _ in lines] == [TRAIN_LABEL, VAL_LABEL]
    (_, x, train), (_, vx, val) = panels["next token (main head)"]
    end = {r["step"]: r for r in records if r["step"] == 130 and "main_loss" in r}[130]
    assert train[-1] == end["main_loss"] and x[-1] == vx[-1] == end["tokens"] / 1e6
    assert val[0] == records[0]["val_loss"]  # validation before the first step
    assert all(y < 8 for y in train[1:])  # no joint-loss values (7–11 here) in the next-token panel
    assert plot_losses(records, tmp_path / "loss.png", "t").stat().st_size > 10_000
