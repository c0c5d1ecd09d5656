"""The position-loss task of ``kunlun eval``: loss per position bucket over long validation windows."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kunlunbaize.eval.position_loss import bucket_edges, curves_markdown, plot_curves
from kunlunbaize.eval.runner import TaskRunner
from kunlunbaize.eval.tasks import TaskError, make_task

from .test_cli_errors import run_main

pytest.importorskip("tokenizers")

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled "
        "cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, had been "
        "tacked to the wall. " * 40)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A prepared dataset (byte-level BPE of 400 tokens) whose validation split is two copies of :data:`TEXT`."""
    from kunlunbaize.data.prepare import prepare
    from kunlunbaize.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("posloss")
    src = root / "corpus"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(f"Part {i}. {TEXT}")
    train_tokenizer([TEXT], vocab_size=400).save(str(root / "tokenizer.json"))
    out = root / "ds"
    prepare(sources=[str(src)], out=out, tokenizer=str(root / "tokenizer.json"), workers=1, val_fraction=0.5,
            progress=False, log=None)
    return out


def val_tokens(data: Path) -> np.ndarray:
    from kunlunbaize.data.format import open_split

    return np.concatenate([np.asarray(s, dtype=np.int64) for s in open_split(data, "val")])


class KnownLossModel:
    """A checkpoint whose loss at position t is exactly log(V − 1 + e^(a·t)), whatever the text: every logit is 0
    but that of a token the text never holds, which is a·t."""

    def __init__(self, data: Path, context: int, slope: float = 0.01) -> None:
        from tokenizers import Tokenizer

        self.checkpoint, self.context, self.slope = data, context, slope
        self.tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
        self.vocab = self.tokenizer.get_vocab_size()
        self.absent = next(i for i in range(self.vocab - 1, 0, -1) if i not in set(val_tokens(data).tolist()))
        self.inputs: list[torch.Tensor] = []

    def final_logits(self, ids: torch.Tensor, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        assert rows == [(0, 0, ids.shape[1])] and ids.shape[1] <= self.context
        self.inputs.append(ids.clone())
        logits = torch.zeros(ids.shape[1], self.vocab, dtype=torch.float64)
        logits[:, self.absent] = self.slope * torch.arange(ids.shape[1], dtype=torch.float64)
        return logits

    def expected(self, t: int) -> float:
        return math.log(self.vocab - 1 + math.exp(self.slope * t))


def _run(model, folder: Path, lengths=(64, 256), per_length=None, logs=None, limit=None, data=None):
    task = make_task("position-loss", data=data, lengths=lengths, per_length=per_length)
    runner = TaskRunner(model, task, folder, checkpoint_hash="x", progress=False, limit=limit,
                        log=(logs.append if logs is not None else lambda m: None))
    return runner.run()


def test_a_model_whose_loss_is_known_per_position_gives_exactly_that(data_dir, tmp_path):
    model = KnownLossModel(data_dir, context=512)
    summary = _run(model, tmp_path / "pl", data=data_dir, per_length=3)
    for n in (64, 256):
        curve = summary["position_loss"]["curves"][str(n)]
        assert curve["windows"] == 3 and len(curve["loss"]) == 32 and curve["starts"][0] == 0
        for a, e, value in zip(curve["starts"], curve["ends"], curve["loss"], strict=True):
            assert value == pytest.approx(sum(model.expected(t) for t in range(a, e)) / (e - a), abs=1e-6)
    rows = {r["metric"]: r for r in summary["rows"]}
    assert rows["loss@256"]["value"] == pytest.approx(sum(map(model.expected, range(256))) / 256, abs=1e-6)
    assert rows["loss@256 last bucket"]["n"] == 3


def test_windows_are_consecutive_slices_of_the_validation_split(data_dir, tmp_path):
    model = KnownLossModel(data_dir, context=512)
    _run(model, tmp_path / "pl", lengths=(100,), per_length=4, data=data_dir)
    tokens = val_tokens(data_dir)
    assert [x.shape for x in model.inputs] == [(1, 100)] * 4
    for w, ids in enumerate(model.inputs):
        assert ids[0].tolist() == tokens[w * 100:w * 100 + 100].tolist()
    lines = [json.loads(ln) for ln in (tmp_path / "pl" / "records.jsonl").read_text().splitlines()]
    assert [(ln["length"], ln["window"], ln["start"]) for ln in lines] == [(100, w, 100 * w) for w in range(4)]


def test_default_windows_are_every_whole_one_and_a_rerun_resumes(data_dir, tmp_path):
    model = KnownLossModel(data_dir, context=512)
    first = _run(model, tmp_path / "pl", lengths=(256,), data=data_dir, limit=2)
    assert first["problems"] == 2
    summary = _run(model, tmp_path / "pl", lengths=(256,), data=data_dir)
    whole = (len(val_tokens(data_dir)) - 1) // 256
    assert summary["problems"] == whole and len(model.inputs) == whole  # the first two windows were not redone
    assert (tmp_path / "pl" / "position_loss.png").is_file()
    assert "| positions | ds |" in (tmp_path / "pl" / "position_loss.md").read_text()  # the checkpoint's name


def test_lengths_beyond_the_context_are_read_through_a_sliding_window_of_it(data_dir, tmp_path):
    logs: list[str] = []
    model = KnownLossModel(data_dir, context=128)  # its logits depend on the position inside what it is given
    summary = _run(model, tmp_path / "pl", lengths=(64, 256), per_length=1, data=data_dir, logs=logs)
    assert any("256 tokens exceed the model's context of 128: read through a sliding window of 128 tokens (64 apart)"
               in m for m in logs)
    assert [x.shape[1] for x in model.inputs] == [64, 128, 128, 128]  # 64; then 256 as 0-127, 64-191, 128-255
    tokens = val_tokens(data_dir)
    assert model.inputs[2][0].tolist() == tokens[64:192].tolist()
    # positions 0-127 are scored in the first chunk; 128-191 in the second, 192-255 in the third (local 64-127)
    expected = [model.expected(t if t < 128 else 64 + t % 64) for t in range(256)]
    curve = summary["position_loss"]["curves"]["256"]
    for a, e, value in zip(curve["starts"], curve["ends"], curve["loss"], strict=True):
        assert value == pytest.approx(sum(expected[a:e]) / (e - a), abs=1e-6)
    lines = [json.loads(ln) for ln in (tmp_path / "pl" / "records.jsonl").read_text().splitlines()]
    assert [ln["context"] for ln in lines] == [64, 128]


def test_a_length_longer_than_the_split_is_refused(data_dir, tmp_path):
    with pytest.raises(TaskError, match="a window of 100000 tokens needs 100001 tokens, but the split holds only"):
        _run(KnownLossModel(data_dir, context=200_000), tmp_path / "pl", lengths=(100_000,), data=data_dir)


def test_a_length_under_two_positions_is_refused():
    with pytest.raises(TaskError, match="a window needs at least 2 positions, got --lengths 1"):
        make_task("position-loss", lengths=(1, 64))


def test_without_data_the_task_says_to_give_it(data_dir, tmp_path):
    model = KnownLossModel(data_dir, context=128)
    model.checkpoint = tmp_path  # no trainer_state.json: the training data is unknown
    with pytest.raises(TaskError, match="give --data DIR"):
        _run(model, tmp_path / "pl", lengths=(64,))


def test_several_models_compare_in_one_table_and_plot(tmp_path):
    curve = {"starts": [0, 2], "ends": [2, 4], "loss": [3.0, 2.0], "windows": 1}
    models = {"a": {4: curve}, "b": {4: {**curve, "loss": [3.5, 2.5]}, 8: curve}}
    table = curves_markdown(models)
    assert "| positions | a | b |" in table and "| 2–3 | 2.000 | 2.500 |" in table
    assert "| **all** | **2.500** | **3.000** |" in table and "| positions | b |" in table  # 8: only b
    assert plot_curves(models, tmp_path / "p.png", marks={"original context": 2}).is_file()


def test_bucket_edges_cover_the_window():
    assert bucket_edges(64) == list(range(0, 65, 2))
    assert bucket_edges(5) == [0, 1, 2, 3, 4, 5]
    edges = bucket_edges(100, 32)
    assert edges[0] == 0 and edges[-1] == 100 and len(edges) == 33 and all(b > a for a, b in itertools.pairwise(edges))


@pytest.mark.parametrize("args, message", [
    (["--task", "position-loss", "--lengths", "1"], "a window needs at least 2 positions"),
    (["--task", "position-loss", "--lengths", "0"], "must be a whole number of tokens > 0"),
    (["--task", "position-loss", "--per-length", "0"], "expected an integer >= 1"),
])
def test_bad_arguments_get_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(tmp_path / "none"), *args)
    assert code in (1, 2)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_kunlun_eval_scores_positions_of_a_trained_checkpoint(trained_run, dataset, tmp_path, capsys):
    code, out, err = run_main(capsys, "eval", "--checkpoint", str(trained_run), "--task", "position-loss",
                              "--data", str(dataset), "--lengths", "16,32", "--per-length", "2", "--out",
                              str(tmp_path / "ev"), "--no-progress")
    assert code == 0, err
    assert "loss@16" in out and "loss@32 last bucket" in out and "loss by position, 32-token windows" in out
    folder = tmp_path / "ev" / "position-loss"
    lines = [json.loads(ln) for ln in (folder / "records.jsonl").read_text().splitlines()]
    assert [(ln["length"], ln["window"]) for ln in lines] == [(16, 0), (16, 1), (32, 0), (32, 1)]
    assert all(0 < v < 10 for ln in lines for v in ln["loss"]) and (folder / "position_loss.png").is_file()
    assert "loss by position" in (tmp_path / "ev" / "results.md").read_text()


def test_a_larger_per_length_adds_windows_to_a_smaller_run(data_dir, tmp_path):
    model = KnownLossModel(data_dir, context=512)
    _run(model, tmp_path / "pl", lengths=(128,), per_length=1, data=data_dir)
    summary = _run(model, tmp_path / "pl", lengths=(128,), per_length=3, data=data_dir)
    assert len(model.inputs) == 3 and summary["position_loss"]["curves"]["128"]["windows"] == 3
