"""Shared helpers: tiny configs covering every combination of the three ablation switches."""

from __future__ import annotations

import itertools
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from kunlunbaize import KunlunBaize, ModelConfig

# Under pytest-xdist (`scripts/test.sh` runs one worker per core) each worker gets its share of the cores, so
# the workers' intra-op threads do not fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

SWITCHES = list(itertools.product([True, False], [True, False], [0, 1, 3]))  # dense, transformerx, mtp_depth
KERNELS = [(1,), (2, 5), (3, 4, 9)]


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                max_seq_len=64, conv_kernel_sizes=(3, 7), mtp_depth=2)
    base.update(overrides)
    return ModelConfig(**base)


def switch_configs() -> list[ModelConfig]:
    """Every switch combination, cycling through several kernel-size lists and eSwish modes."""
    out = []
    for n, (dense, tx, mtp) in enumerate(SWITCHES):
        out.append(tiny(dense_residual=dense, transformerx=tx, mtp_depth=mtp,
                        conv_kernel_sizes=KERNELS[n % len(KERNELS)], eswish_per_channel=bool(n % 2),
                        mtp_share_head=n % 4 == 3, tie_embeddings=n % 5 == 4))
    return out


def config_id(cfg: ModelConfig) -> str:
    return (f"dense{int(cfg.dense_residual)}-tx{int(cfg.transformerx)}-mtp{cfg.mtp_depth}"
            f"-k{'_'.join(map(str, cfg.conv_kernel_sizes))}")


def build(cfg: ModelConfig, seed: int = 0) -> KunlunBaize:
    torch.manual_seed(seed)
    model = KunlunBaize(cfg).eval()
    # Random non-trivial switch parameters, so tests do not pass only at their initial values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("beta") or "dense.logits" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("beta") else 0.0))
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


TRAIN_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64,
               "conv_kernel_sizes": (3, 5), "mtp_depth": 2, "max_seq_len": 64}


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
