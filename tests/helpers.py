"""Shared test helpers: tiny configs covering every combination of the three ablation switches, a model built with
non-trivial switch parameters, and the tiny training model of the fixtures."""

from __future__ import annotations

import itertools

import torch

from kunlunbaize import KunlunBaize, ModelConfig

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


TRAIN_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64,
               "conv_kernel_sizes": (3, 5), "mtp_depth": 2, "max_seq_len": 64}
