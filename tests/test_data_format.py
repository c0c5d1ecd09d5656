"""The on-disk token format: dtype choice, meta.json validation, shard memmaps, completeness checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kunlunbaize.data import FORMAT, DataError, choose_dtype, is_prepared, load_meta, open_split
from kunlunbaize.data.format import shard_name


def write_dataset(root: Path, splits: dict[str, list[np.ndarray]], dtype: str = "uint16", **meta_overrides) -> Path:
    """A minimal dataset folder written by hand (no tokenizer files), independent of the prepare pipeline."""
    root.mkdir(parents=True)
    meta_splits = {}
    for split, arrays in splits.items():
        shards = []
        for i, arr in enumerate(arrays):
            name = shard_name(split, i)
            np.asarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).tofile(root / name)
            shards.append({"file": name, "tokens": len(arr)})
        meta_splits[split] = {"shards": shards, "tokens": sum(len(a) for a in arrays), "documents": len(arrays)}
    meta = {"format": FORMAT, "dtype": dtype, "vocab_size": 70000 if dtype == "uint32" else 300, "eot_id": 0,
            "splits": meta_splits, **meta_overrides}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize(("vocab", "dtype"), [(1, "uint16"), (300, "uint16"), (8192, "uint16"), (65535, "uint16"),
                                              (65536, "uint32"), (151_936, "uint32"), (2**32 - 1, "uint32")])
def test_choose_dtype(vocab: int, dtype: str) -> None:
    chosen = choose_dtype(vocab)
    assert chosen == np.dtype(dtype)
    assert chosen.str.startswith("<")


def test_choose_dtype_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        choose_dtype(0)
    with pytest.raises(ValueError):
        choose_dtype(2**32)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_open_split_reads_shards_in_order(tmp_path: Path, dtype: str) -> None:
    big = 70_000 if dtype == "uint32" else 60_000
    root = write_dataset(tmp_path / "ds", {"train": [np.array([5, 6, 0, big]), np.array([7, 0])],
                                           "val": [np.array([9, 0])]}, dtype=dtype)
    assert is_prepared(root)
    train = open_split(root, "train")
    assert [m.tolist() for m in train] == [[5, 6, 0, big], [7, 0]]
    assert all(isinstance(m, np.memmap) and m.dtype == np.dtype(dtype) for m in train)
    with pytest.raises(ValueError):  # read-only
        train[0][0] = 1
    assert open_split(root, "val")[0].tolist() == [9, 0]
    with pytest.raises(DataError, match=r"no split 'test'"):
        open_split(root, "test")


def test_empty_split_is_an_empty_list(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", {"train": [np.array([1, 0])], "val": []})
    assert open_split(root, "val") == []


def test_missing_folder_and_meta(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*kunlun prepare"):
        load_meta(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"meta.json is missing.*kunlun prepare"):
        load_meta(tmp_path / "empty")
    assert not is_prepared(tmp_path / "nope") and not is_prepared(tmp_path / "empty")


def test_leftover_tmp_folder_is_not_a_dataset(tmp_path: Path) -> None:
    # What a killed run leaves: shards and tokenizer files, but no meta.json (it is written last).
    tmp = tmp_path / "stdlib.tmp-12345"
    tmp.mkdir()
    np.arange(10, dtype="<u2").tofile(tmp / "train_00000.bin")
    (tmp / "tokenizer.json").write_text("{}")
    assert not is_prepared(tmp)
    with pytest.raises(DataError, match=r"meta.json is missing"):
        open_split(tmp, "train")


def test_wrong_format_and_garbage_meta(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", {"train": [np.array([1, 0])]}, format="something-else")
    with pytest.raises(DataError, match=r"format 'something-else'.*kunlun prepare"):
        load_meta(root)
    (root / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot be read"):
        load_meta(root)
    root2 = write_dataset(tmp_path / "ds2", {"train": [np.array([1, 0])]}, dtype="uint16")
    meta = json.loads((root2 / "meta.json").read_text())
    meta["dtype"] = "float32"
    (root2 / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"unsupported token dtype"):
        load_meta(root2)


def test_truncated_or_missing_shard(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", {"train": [np.arange(100), np.arange(50)], "val": [np.arange(20)]})
    shard = root / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"train_00001\.bin has 97 bytes but meta.json says 50 uint16 tokens"):
        load_meta(root)
    assert not is_prepared(root)
    shard.unlink()
    with pytest.raises(DataError, match=r"train_00001\.bin listed in meta.json is missing"):
        load_meta(root)


def test_split_total_must_match_shards(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", {"train": [np.arange(10)]})
    meta = json.loads((root / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] = 11
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"shards hold 10 tokens"):
        load_meta(root)


def test_token_counts_count_every_train_token_and_refuse_another_vocabulary(dataset):
    from kunlunbaize.data.format import token_counts

    V = load_meta(dataset)["vocab_size"]
    counts = token_counts(dataset, V)
    tokens = np.concatenate([np.asarray(s) for s in open_split(dataset, "train")])
    assert counts.shape == (V,) and counts.sum() == len(tokens)
    assert np.array_equal(counts, np.bincount(tokens, minlength=V))
    with pytest.raises(DataError, match="beyond the model's vocabulary of 10"):
        token_counts(dataset, 10)
