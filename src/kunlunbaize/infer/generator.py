"""A checkpoint of any architecture, loaded with the generate function that decodes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import DEFAULT, ArchSpec
from ..checkpoint import checkpoint_arch, resolve_checkpoint
from .generate import generate
from .load import load_model


@dataclass
class Generator:
    """A checkpoint ready to generate from."""

    model: torch.nn.Module  # KunlunBaize, or transformers' LlamaForCausalLM for the Llama baseline
    checkpoint: Path
    arch: ArchSpec
    generate: Callable  # kunlunbaize.infer.generate or kunlunbaize.infer.llama.generate_llama (same signature)
    context: int  # the model's maximum sequence length
    vocab_size: int
    mtp_depth: int  # MTP depths to draft with (0 for an architecture without them)


def kunlunbaize_generator(ckpt: Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> Generator:
    """The :class:`Generator` of a KunlunBaize checkpoint (the spec's ``generator`` hook)."""
    model, ckpt = load_model(ckpt, device, dtype)
    cfg = model.config
    return Generator(model, ckpt, DEFAULT, generate, cfg.max_seq_len, cfg.vocab_size, cfg.mtp_depth)


def load_for_generation(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Generator:
    """The model of a run, checkpoint or export folder, of whichever architecture, with its generate function."""
    ckpt = resolve_checkpoint(path)
    return checkpoint_arch(ckpt).hook("generator")(ckpt, device, dtype)
