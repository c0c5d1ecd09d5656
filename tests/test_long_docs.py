"""The document index of ``kunlun prepare`` and the long-document windows of ``kunlun train --long-docs``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kunlunbaize.data import DataError, load_index, load_meta, open_split
from kunlunbaize.data.pack import split_documents
from kunlunbaize.data.prepare import prepare
from kunlunbaize.train.data import LongDocWindows, TokenWindows, TrainSampler

QUIET = dict(progress=False, log=None, vocab_size=300, workers=1)
WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "\n", "    ", "昆仑", "🙂"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of documents from a few tokens to a few hundred, prepared once."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("long")
    src = root / "corpus"
    src.mkdir()
    for i in range(30):
        n = rng.choice([2, 5, 20, 60, 200, 400])
        (src / f"doc{i:03d}.txt").write_text(f"doc {i} " + " ".join(rng.choice(WORDS) for _ in range(n)))
    return prepare([src], root / "ds", shard_tokens=500, **QUIET)  # small shards: documents span shards


def stream(path: Path, split: str) -> np.ndarray:
    return np.concatenate(open_split(path, split))


@pytest.mark.parametrize("split", ["train", "val"])
def test_index_matches_the_end_of_text_positions(dataset: Path, split: str) -> None:
    meta = load_meta(dataset)
    offsets = load_index(dataset, split)
    tokens = stream(dataset, split)
    ends = np.flatnonzero(tokens == meta["eot_id"]) + 1
    assert offsets.tolist() == [0, *ends.tolist()]
    assert len(offsets) - 1 == meta["splits"][split]["documents"] == meta["splits"][split]["index"]["documents"]
    assert len(meta["splits"][split]["shards"]) > 1 or split == "val"


def test_split_documents_cuts_ranges_at_document_boundaries() -> None:
    lengths = np.array([3, 4, 5, 6])
    assert split_documents(lengths, [(0, 7), (12, 18)]).tolist() == [3, 4, 6]
    assert split_documents(np.array([5000]), [(0, 3976)]).tolist() == [3976]  # a one-document corpus's part
    assert split_documents(lengths, []).tolist() == []


def test_old_dataset_without_index_loads_and_says_to_prepare_again(dataset: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((dataset / "meta.json").read_text())
    for info in meta["splits"].values():
        info.pop("index")
        for shard in info["shards"]:
            (old / shard["file"]).write_bytes((dataset / shard["file"]).read_bytes())
    (old / "meta.json").write_text(json.dumps(meta))
    assert TokenWindows(old, "train", 32).n == meta["splits"]["train"]["tokens"] // 32  # still trains as before
    with pytest.raises(DataError, match=r"no document index .*re-run `kunlun prepare`"):
        LongDocWindows(old, "train", 32)


def test_damaged_index_is_refused(dataset: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    index = broken / "train_documents.bin"
    index.write_bytes(index.read_bytes()[:-8])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_meta(broken)
    offsets = load_index(dataset, "train")
    index.write_bytes(offsets[::-1].astype("<i8").tobytes())
    with pytest.raises(DataError, match="does not fit"):
        load_index(broken, "train")


def test_long_doc_windows_lie_inside_long_documents(dataset: Path) -> None:
    seq = 64
    offsets = load_index(dataset, "train")
    tokens = stream(dataset, "train")
    lengths = np.diff(offsets)
    win = LongDocWindows(dataset, "train", seq)
    assert win.n == int((lengths // seq)[lengths >= seq].sum()) > 0
    assert win.long_documents == int((lengths >= seq).sum()) < len(lengths)
    assert win.long_tokens == int(lengths[lengths >= seq].sum())
    assert "long documents:" in win.describe()
    for i in range(win.n):
        start = win.start(i)
        doc = int(np.searchsorted(offsets, start, side="right")) - 1
        assert lengths[doc] >= seq and start + seq <= offsets[doc + 1]
        assert (start - offsets[doc]) % seq == 0
        assert np.array_equal(win.window(i), tokens[start:start + seq])
    assert len(set(win.starts.tolist())) == win.n


def test_long_doc_sampling_is_deterministic_and_resumes_exactly(dataset: Path) -> None:
    win = LongDocWindows(dataset, "train", 64)
    a, b = TrainSampler(win, seed=3), TrainSampler(LongDocWindows(dataset, "train", 64), seed=3)
    whole = a.batch(0, 3 * win.n)  # three epochs
    resumed = torch.cat([b.batch(k, min(5, 3 * win.n - k)) for k in range(7, 3 * win.n, 5)])
    assert np.array_equal(whole[7:].numpy(), resumed.numpy())
    epoch = sorted(a.indices(0, win.n))
    assert epoch == list(range(win.n)) and a.indices(0, win.n) != a.indices(win.n, win.n)
    assert not np.array_equal(TrainSampler(win, seed=4).batch(0, win.n).numpy(), whole[:win.n].numpy())


def test_no_long_document_is_a_clear_error(dataset: Path) -> None:
    longest = int(np.diff(load_index(dataset, "train")).max())
    with pytest.raises(DataError, match=rf"no train document .* has {longest + 1:,} tokens or more .*--seq-len"):
        LongDocWindows(dataset, "train", longest + 1)
    assert LongDocWindows(dataset, "train", longest).n >= 1


def train_config(dataset: Path, out: Path, **kw):
    from kunlunbaize.train.trainer import TrainConfig

    from .helpers import TRAIN_MODEL

    base = dict(data=str(dataset), out=str(out), preset="tiny", model_overrides=dict(TRAIN_MODEL), seq_len=48,
                tokens=48 * 4 * 4, batch_size=4, batch_size_start=4, lr=3e-3, log_every=1, eval_every=2,
                eval_batches=1,
                ckpt_every=1000, progress=False, warmup_steps=1, long_docs=True, doc_mask=True)
    base.update(kw)
    return TrainConfig(**base)


def step_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_training_with_long_docs_and_doc_mask_resumes_exactly(dataset: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kunlunbaize.model import KunlunBaize
    from kunlunbaize.train.trainer import train

    seen: list[torch.Tensor] = []
    forward = KunlunBaize.forward

    def spy(self, input_ids, *args, **kwargs):
        seen.append(kwargs.get("document_ids"))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(KunlunBaize, "forward", spy)
    straight = train(train_config(dataset, tmp_path / "a"))
    assert "long documents:" in capsys.readouterr().err
    assert seen and all(d is not None for d in seen) and any(int(d.max()) > 0 for d in seen)  # windows mixed docs
    train(train_config(dataset, tmp_path / "b", stop_at_step=2))
    resumed = train(train_config(dataset, tmp_path / "b"))
    assert resumed["step"] == straight["step"] == 4
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")  # bitwise equal
    capsys.readouterr()
    train(train_config(dataset, tmp_path / "b", tokens=48 * 4 * 5, long_docs=False))
    assert "was trained with --long-docs, this run is without it" in capsys.readouterr().err


def test_train_options_parse_and_conflicts_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from kunlunbaize.cli import build_parser
    from kunlunbaize.cli.args import UsageError
    from kunlunbaize.cli.train import _train_config

    parser = build_parser()
    cfg = _train_config(parser.parse_args(["train", "--long-docs", "--doc-mask"]))
    assert cfg.long_docs and cfg.doc_mask
    plain = _train_config(parser.parse_args(["train"]))
    assert not plain.long_docs and not plain.doc_mask
    with pytest.raises(UsageError, match=r"--doc-mask .* left out with arch llama"):
        _train_config(parser.parse_args(["train", "--doc-mask", "--arch", "llama"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # the layout is checked against the ranks too
    for flag in ("--tp", "--pp", "--cp"):  # packed documents compose with each of them
        assert _train_config(parser.parse_args(["train", "--doc-mask", flag, "2"])).doc_mask
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _train_config(parser.parse_args(["train", "--doc-mask", "--cp", "2", "--pp", "2"])).doc_mask
