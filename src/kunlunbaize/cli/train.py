"""``kunlun train``: pre-train on a prepared dataset (the work is :func:`kunlunbaize.train.trainer.train`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

from ..config import PRESETS
from ..defaults import TRAIN
from ..rope_scaling import ROPE_TYPES
from .args import UsageError, add_model_args, float_in, int_at_least, model_config, new_command

POSITIVE, NONNEGATIVE, ABOVE_ZERO = int_at_least(1), int_at_least(0), float_in(0, low_open=True)


def add_parser(sub: Any) -> None:
    """Add ``train`` to ``sub``. Options left out stay None, and the run takes TrainConfig's default."""
    tr = new_command(sub, "train", help="pre-train on a prepared dataset (default: prepares and trains on the "
                                        "Python standard library)")
    tr.add_argument("--data", help="folder written by `kunlun prepare`")
    tr.add_argument("--out", help="run folder (checkpoints, metrics, plots)")
    add_model_args(tr, None, "model config overrides")
    tr.add_argument("--arch", choices=["kunlunbaize", "llama"],
                    help="llama: transformers' LlamaForCausalLM of matched width/depth/params, same loop")
    tr.add_argument("--init-from", dest="init_from", metavar="RUN_OR_CKPT",
                    help="context extension: a new run starting from this run's (newest) or checkpoint's weights, "
                         "with its model config at --seq-len (docs/guide-train.md, 'Extending the context')")
    tr.add_argument("--rope", choices=["none", *ROPE_TYPES],
                    help="RoPE scaling of the extension (default: the parent's own)")
    tr.add_argument("--rope-factor", dest="rope_factor", type=float_in(1, low_open=True),
                    help="scaling factor (default: the new context / the original one)")
    tr.add_argument("--long-docs", dest="long_docs", action="store_true", default=None,
                    help="train windows only inside documents of at least --seq-len tokens (needs a dataset "
                         "prepared with a document index; docs/guide-train.md, 'Long documents and document masking')")
    tr.add_argument("--doc-mask", dest="doc_mask", action="store_true", default=None,
                    help="no attention, conv history or MTP target across documents inside a window: each "
                         "document computed as if alone (--arch kunlunbaize; docs/guide-train.md)")
    tr.add_argument("--tokens", type=POSITIVE, help=f"token budget (default {TRAIN['tokens']:,})")
    tr.add_argument("--seq-len", dest="seq_len", type=int_at_least(2), help=f"default {TRAIN['seq_len']}")
    tr.add_argument("--batch-size", dest="batch_size", type=POSITIVE,
                    help=f"global sequences per step (default {TRAIN['batch_size']}) after the ramp")
    tr.add_argument("--batch-size-start", dest="batch_size_start", type=POSITIVE)
    tr.add_argument("--micro-batch-size", dest="micro_batch_size", type=POSITIVE, help="per rank; the rest is "
                                                                                      "gradient accumulation")
    tr.add_argument("--lr", type=ABOVE_ZERO, help=f"peak learning rate (default {TRAIN['lr']})")
    tr.add_argument("--dense-lr-mult", dest="dense_lr_mult", type=ABOVE_ZERO,
                    help="learning rate of the dense-residual logits / --lr (default 1)")
    tr.add_argument("--warmup-steps", dest="warmup_steps", type=NONNEGATIVE)
    tr.add_argument("--weight-decay", dest="weight_decay", type=float_in(0))
    tr.add_argument("--grad-clip", dest="grad_clip", type=ABOVE_ZERO)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--log-every", dest="log_every", type=POSITIVE)
    tr.add_argument("--eval-every", dest="eval_every", type=POSITIVE)
    tr.add_argument("--eval-batches", dest="eval_batches", type=NONNEGATIVE)
    tr.add_argument("--ckpt-every", dest="ckpt_every", type=POSITIVE)
    tr.add_argument("--keep-last", dest="keep_last", type=NONNEGATIVE)
    tr.add_argument("--full-weights", dest="full_weights", choices=["auto", "always", "never"],
                    help="write model.safetensors (the whole model, gathered on rank 0) into each checkpoint: auto "
                         "(default) up to 2B parameters; without it readers take the weights from the DCP shards "
                         "(docs/guide-train.md, 'Checkpoints and their full weights')")
    tr.add_argument("--resume", help="auto (default): newest checkpoint in --out; none; or a checkpoint folder")
    tr.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"],
                    help="every rank data-parallel: ddp (auto under torchrun) = --dp-replicate N, fsdp = --dp-shard N")
    tr.add_argument("--dp-replicate", dest="dp_replicate", type=POSITIVE,
                    help="data-parallel replicas of the mesh (default 1; HSDP with --dp-shard)")
    tr.add_argument("--dp-shard", dest="dp_shard", type=POSITIVE,
                    help="data-parallel FSDP2 shards of the mesh (default: the ranks left over)")
    tr.add_argument("--tp", type=POSITIVE, help="tensor + sequence parallel ranks (default 1); "
                                                "see docs/guide-parallel.md")
    tr.add_argument("--cp", type=POSITIVE, help="context-parallel ranks: each sequence split over them (default 1); "
                                                "see docs/guide-parallel.md")
    tr.add_argument("--pp", type=POSITIVE, help="pipeline-parallel ranks (default 1): the trunk cut into stages; "
                                                "a step's micro-batches are its gradient-accumulation micro-batches")
    tr.add_argument("--pp-schedule", dest="pp_schedule", choices=["gpipe", "1f1b", "interleaved1f1b"],
                    help="pipeline schedule (default 1f1b)")
    tr.add_argument("--pp-stages-per-rank", dest="pp_stages_per_rank", type=POSITIVE,
                    help="stages per pipeline rank (default 1; more: interleaved1f1b)")
    tr.add_argument("--pp-layers", dest="pp_layers", type=_layer_counts, metavar="N,N,...",
                    help="trunk layers of each stage, in order (default: an even split)")
    tr.add_argument("--device", help="auto, cpu, cuda")
    tr.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    tr.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_true",
                    default=None)
    tr.add_argument("--compile", action="store_true", default=None,
                    help="torch.compile each block (under --pp each stage's blocks)")
    tr.add_argument("--max-bad-steps", dest="max_bad_steps", type=POSITIVE)
    tr.add_argument("--peak-tflops", dest="peak_tflops", type=ABOVE_ZERO, help="device peak for MFU")
    tr.add_argument("--stop-at-step", dest="stop_at_step", type=POSITIVE, help="save and stop after this step")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--sample-prompt", default=None, help="prompt of the sample generated after training (default: "
                    "'def main():' on the embedded Python corpus, else the start of a validation document)")
    tr.add_argument("--sample-tokens", type=NONNEGATIVE, default=80, help="tokens of that sample (0: none)")


def _layer_counts(text: str) -> list[int]:
    """``--pp-layers 3,1`` → [3, 1]."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer counts, e.g. 3,1") \
            from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every stage needs at least one layer")
    return counts


def _train_config(args: argparse.Namespace):
    """The TrainConfig of the arguments; settings that contradict each other are a UsageError naming the option."""
    from ..train.parallel.layout import check_pipeline, check_sequence, resolve_layout
    from ..train.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["model_overrides"] = dict(args.set)
    values["progress"] = not args.no_progress
    if args.init_from is not None:  # the parent's architecture and preset, unless given
        values = {**_parent_defaults(args.init_from), **values}
    cfg = TrainConfig(**values)
    mcfg = model_config(cfg.preset, args.set, ignore=("vocab_size",))  # the vocabulary is the data's
    try:
        cfg.validate()
        # the layout against the ranks torchrun launched, before any process group exists
        layout = resolve_layout(int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel, cfg.dp_replicate, cfg.dp_shard,
                                cfg.tp, cfg.cp, cfg.pp)
        check_sequence(layout, cfg.seq_len)
        if cfg.init_from is None:  # an extension's layers are its parent's: the trainer checks them
            check_pipeline(layout, mcfg.n_layers, cfg.pp_schedule, cfg.pp_stages_per_rank, cfg.pp_layers)
    except ValueError as e:
        raise UsageError(re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(e))) from None
    return cfg


def _parent_defaults(init_from: str) -> dict[str, str]:
    """The ``arch`` and ``preset`` of the checkpoint ``--init-from`` names (a UsageError when there is none)."""
    from ..checkpoint import CheckpointError, checkpoint_arch, read_config, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(init_from)
        saved = read_config(ckpt)
        out = {"arch": checkpoint_arch(ckpt, saved).name}
    except CheckpointError as e:
        raise UsageError(f"--init-from: {e}") from None
    preset = (saved.get("extra") or {}).get("preset")
    return {**out, "preset": preset} if preset in PRESETS else out


def run(args: argparse.Namespace) -> None:
    """Train, then print where everything went and a short greedy sample."""
    from ..checkpoint import CheckpointError
    from ..data.format import DataError
    from ..train.distributed import shutdown
    from ..train.trainer import TrainingError, train

    cfg = _train_config(args)
    try:
        summary = train(cfg)
    except (ValueError, DataError, CheckpointError, TrainingError) as e:
        raise SystemExit(f"kunlun train: {e}") from None
    finally:
        shutdown()  # a process group left to interpreter teardown can abort the process (gloo threads)
    if "loss_plot" not in summary:  # not rank 0
        return
    _print_summary(summary)
    if args.sample_tokens > 0 and summary["checkpoint"] and not summary["interrupted"]:
        from ..infer.sample import print_sample

        try:
            print_sample(summary["checkpoint"], args.sample_prompt, cfg.data, args.sample_tokens)
        except (CheckpointError, DataError, ValueError) as e:
            raise SystemExit(f"kunlun train: training finished, but the sample could not be generated: {e}") from None


def _print_summary(summary: dict[str, Any]) -> None:
    if summary["steps_now"] == 0 and summary["finished"]:  # the trainer said "nothing to train"
        print(f"\nthe run as it stands: {summary['step']} steps, {summary['tokens']:,} tokens")
    else:
        print(f"\ntrained {summary['step']} steps, {summary['tokens']:,} tokens"
              + ("" if summary["finished"] else " (stopped early; run the same command to resume)"))
    if "first_val_loss" in summary:
        print(f"validation loss {summary['first_val_loss']:.3f} -> {summary['val_loss']:.3f}")
    print(f"checkpoint:   {summary['checkpoint']}")
    print(f"loss curve:   {summary['loss_plot']}")
    if "dense_plot" in summary:
        print(f"dense-residual weights: {summary['dense_plot']}")
    print(f"metrics:      {summary['run_dir']}/metrics.jsonl (TensorBoard: {summary['run_dir']}/tensorboard)")
