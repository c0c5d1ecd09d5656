"""``kunlun info``'s memory figures equal what the model really holds: the inference state equals the bytes of the
cache tensors a model allocates, and the activation count equals the tensors a block saves for its backward pass."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kunlunbaize.memory import block_activations, checkpointed_block_activations, inference_state
from kunlunbaize.model.block import make_block
from kunlunbaize.model.layers import RotaryEmbedding

from .helpers import build, config_id, switch_configs, tiny

CONFIGS = switch_configs()


@pytest.mark.parametrize("cfg", CONFIGS, ids=[config_id(c) for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_state_is_the_bytes_the_cache_allocates(cfg, dtype):
    model = build(cfg)
    n = 37
    cache = model.new_cache(1, n, dtype=dtype)
    tensors = [t for t, _ in cache.slot_tensors()]
    parts = inference_state(cfg, torch.finfo(dtype).bits // 8)
    assert sum(p.per_token for p in parts) * n == sum(t.numel() * t.element_size() for t in tensors)
    assert sum(p.tensors for p in parts) == len(tensors)


def saved_elements(cfg, T: int) -> int:
    """Elements of the tensors (each storage once, parameters and rotary tables aside) a block saves for backward."""
    block = make_block(cfg).train()
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(T))
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()} | {
        t.untyped_storage().data_ptr() for t in rope}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    x = torch.randn(1, T, cfg.d_model, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope, 0, None, None, None)
    return sum(saved.values())


@pytest.mark.parametrize("kw", [dict(transformerx=False), dict(conv_kernel_sizes=(3,)),
                                dict(conv_kernel_sizes=(2, 5, 9), scale_ffn_hidden=40, eswish_per_channel=True)])
def test_activation_count_is_what_a_block_saves(kw):
    cfg = tiny(**kw)
    assert block_activations(cfg, 29) == saved_elements(cfg, 29)
    assert checkpointed_block_activations(cfg, 29) == 29 * cfg.d_model


def test_kunlun_info_prints_the_memory_of_the_paper_preset_at_128k():
    out = subprocess.run([sys.executable, "-m", "kunlunbaize.cli", "info", "--preset", "paper", "--seq-len", "131072"],
                         capture_output=True, text=True, check=True).stdout
    assert "inference state in bfloat16" in out and "T=131,072" in out
    assert "cross-attention K/V of conv scale k=31 (126 layers)" in out and "MTP depth 6 K/V" in out
    # 126 layers × 2 × 8 KV heads × 128 dims × 2 bytes = 504 KiB per token, 63 GiB at 128K
    assert "self-attention K/V (126 layers)                           504 KiB/token      63 GiB" in out
    assert "with activation checkpointing" in out
    f32 = subprocess.run([sys.executable, "-m", "kunlunbaize.cli", "info", "--preset", "tiny", "--dtype", "float32"],
                         capture_output=True, text=True, check=True).stdout
    assert "inference state in float32" in f32
