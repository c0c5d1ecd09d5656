"""Fixtures shared by the tests (prepared data, trained runs); plain helpers live in :mod:`tests.helpers`."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch

from .helpers import TRAIN_MODEL

# Under pytest-xdist (`scripts/test.sh` runs one worker per core) each worker gets its share of the cores, so
# the workers' intra-op threads do not fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small prepared dataset: a few real standard-library modules, BPE vocabulary 320."""
    pytest.importorskip("tokenizers")
    from kunlunbaize.data.prepare import prepare

    src = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "colorsys.py", "fnmatch.py", "bisect.py", "heapq.py"):
        (src / name).write_bytes((stdlib / name).read_bytes())
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(sources=[str(src)], out=out, vocab_size=320, workers=1, val_fraction=0.2, progress=False, log=None)
    return out


@pytest.fixture(scope="session")
def trained_run(dataset, tmp_path_factory) -> Path:
    """A run folder of ``kunlun train`` on :func:`dataset`: a tiny model trained for 20 steps."""
    from kunlunbaize.train.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("gen") / "run"
    train(TrainConfig(data=str(dataset), out=str(out), preset="tiny", model_overrides=dict(TRAIN_MODEL), seq_len=32,
                      tokens=32 * 8 * 20, batch_size=8, lr=3e-3, eval_every=1000, progress=False))
    return out


@pytest.fixture(scope="session")
def llama_run(dataset, tmp_path_factory) -> Path:
    """A run folder of ``kunlun train --arch llama``: a tiny LlamaForCausalLM trained for a few steps."""
    pytest.importorskip("transformers")
    from kunlunbaize.train.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("llama") / "run"
    train(TrainConfig(data=str(dataset), out=str(out), preset="tiny", model_overrides=dict(TRAIN_MODEL), seq_len=32,
                      tokens=32 * 8 * 4, batch_size=8, lr=3e-3, eval_every=1000, progress=False, arch="llama"))
    return out
