"""Published training runs the planner is checked against: each run's model, GPUs, layout and published
throughput, and the planner's prediction for the same model and layout.

Sources (read 2026-12):
- torchtitan, ``benchmarks/llama3_h100_202412_torchtitan.md`` (pytorch/torchtitan, torchtitan commit 9dec370,
  December 2024; ``train_configs/llama3_8b.toml`` and ``llama3_405b.toml`` there: sequence length 8192; pipeline
  micro-batches default to pp; interleaved 1F1B runs two stages per rank). H100 SXM with 96 GB HBM2e at 500 W.
- Megatron-LM, ``README.md`` and ``images/model_table.png`` (NVIDIA/Megatron-LM): GPT models, vocabulary 131,072,
  sequence length 4,096, H100, with DP/TP/PP overlap; per-GPU TFLOP/s by Megatron's formula
  ``72·l·h²·(1 + s/(6h) + V/(12·h·l))`` FLOPs per token (full attention), turned into tokens/s here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch import BASELINE, ArchSpec
from ..config import ModelConfig
from .estimate import Estimate, estimate
from .hardware import get_gpu
from .layout import Job, Layout
from .shape import shape_of

TOLERANCE = 0.30
"""Predicted ÷ published must lie within 1 ± this."""
ASYNC_TP_OVERLAP = 0.75
"""The share of tensor-parallel traffic hidden by async TP (torchtitan) or ``--tp-comm-overlap`` (Megatron)."""


@dataclass(frozen=True)
class Reference:
    """One published run and what it reached."""

    name: str
    source: str
    cfg: ModelConfig
    gpu: str
    layout: Layout
    seq_len: int
    batch: int  # global batch, sequences
    tokens_per_gpu: float  # published tokens/s per GPU
    precision: str = "bf16"
    tp_overlap: float = 0.0
    memory_gib: float | None = None  # published peak memory per GPU
    published_mfu: float | None = None


def _llama(d: int, layers: int, heads: int, kv: int, ffn: int, vocab: int = 128256) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_hidden=ffn,
                       max_seq_len=8192, dense_residual=False, transformerx=False, mtp_depth=0)


def _gpt(d: int, layers: int, heads: int) -> ModelConfig:
    """Megatron's GPT with a 4h GELU MLP, as a SwiGLU of the same parameters and FLOPs (hidden 8h/3)."""
    return _llama(d, layers, heads, heads, round(8 * d / 3), vocab=131072)


def megatron_tokens(tflops: float, d: int, layers: int, seq: int = 4096, vocab: int = 131072) -> float:
    """Tokens/s per GPU of a Megatron table row: its per-GPU TFLOP/s ÷ Megatron's FLOPs per token."""
    per_token = 72 * layers * d * d * (1 + seq / (6 * d) + vocab / (12 * d * layers))
    return tflops * 1e12 / per_token


LLAMA3_8B = _llama(4096, 32, 32, 8, 14336)
LLAMA3_405B = _llama(16384, 126, 128, 8, 53248)
TITAN = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md"
MEGATRON = "Megatron-LM README, images/model_table.png"

REFERENCES: tuple[Reference, ...] = (
    Reference("Llama 3.1 8B, FSDP 8, selective AC (torchtitan Table 1)", TITAN, LLAMA3_8B, "H100",
              Layout(dp_shard=8, micro_batch=2, ac="selective"), 8192, 16, 5762, memory_gib=82.4),
    Reference("Llama 3.1 8B, FSDP 128, selective AC (torchtitan Table 3)", TITAN, LLAMA3_8B, "H100",
              Layout(dp_shard=128, micro_batch=2, ac="selective"), 8192, 256, 5605, memory_gib=67.0),
    Reference("Llama 3.1 405B, FSDP 8 × TP 8 × PP 8, 1F1B, fp8, full AC (torchtitan Table 5)", TITAN, LLAMA3_405B,
              "H100", Layout(dp_shard=8, tp=8, pp=8, schedule="1f1b", micro_batch=4, ac="full"), 8192, 256, 100,
              precision="fp8", tp_overlap=ASYNC_TP_OVERLAP, memory_gib=82.5),
    Reference("Llama 3.1 405B, FSDP 8 × TP 8 × PP 8, interleaved 1F1B, fp8, full AC (torchtitan Table 5)", TITAN,
              LLAMA3_405B, "H100", Layout(dp_shard=8, tp=8, pp=8, schedule="interleaved", micro_batch=4, ac="full"),
              8192, 256, 128, precision="fp8", tp_overlap=ASYNC_TP_OVERLAP, memory_gib=72.7),
    # DP with Megatron's distributed optimizer (states sharded, gradients reduce-scattered and weights gathered once a
    # step) planned as dp_shard; its selective recompute (the attention core only) as no checkpointing (the planner
    # counts flash attention's memory and recomputes nothing there); interleaving as the layers divide evenly.
    *(Reference(f"GPT {name}, TP {tp} × PP {pp} × DP 48 on {48 * tp * pp:,} GPUs (Megatron-LM)", MEGATRON,
                _gpt(d, layers, heads), "H100",
                Layout(dp_shard=48, tp=tp, pp=pp, schedule="interleaved", micro_batch=1, ac="off",
                       stages_per_rank=v),
                4096, batch, megatron_tokens(tflops, d, layers), tp_overlap=ASYNC_TP_OVERLAP, published_mfu=mfu)
      for name, heads, d, layers, tp, pp, v, batch, tflops, mfu in (
          ("177B", 96, 12288, 96, 8, 6, 2, 1152, 432.8, 0.44),
          ("314B", 128, 16384, 96, 8, 8, 2, 1536, 474.4, 0.48),
          ("462B", 144, 18432, 112, 8, 16, 7, 3072, 459.9, 0.47))),
)


def predict(ref: Reference, spec: ArchSpec = BASELINE) -> Estimate:
    """The planner's estimate of ``ref``'s model and layout (``spec``: the plain decoder's architecture)."""
    job = Job(cfg=ref.cfg, spec=spec, gpu=get_gpu(ref.gpu), n_gpus=ref.layout.world, seq_len=ref.seq_len,
              batch=ref.batch, precision=ref.precision, tp_overlap=ref.tp_overlap)
    return estimate(job, shape_of(spec, ref.cfg, ref.seq_len), ref.layout)
