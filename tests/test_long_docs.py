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
