"""``kunlun export``: a training checkpoint as a Hugging Face transformers folder (a Llama baseline checkpoint: a
plain LlamaForCausalLM folder)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .args import new_command


def add_parser(sub: Any) -> None:
    """Add ``export`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    e = new_command(sub, "export", help="convert a training checkpoint to a Hugging Face transformers folder "
                                        "(a Llama baseline checkpoint: a plain LlamaForCausalLM folder)")
    e.add_argument("--hf", required=True, metavar="OUT", help="folder to write (config, safetensors, tokenizer)")
    e.add_argument("--checkpoint", default="runs/small", help="run folder (newest checkpoint) or checkpoint folder")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    e.add_argument("--max-shard-size", dest="max_shard_size", type=_shard_size, metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB, 500MB or bytes (default: 5GB when the checkpoint has no "
                        "model.safetensors and is streamed from its DCP shards; else transformers' own)")
    e.add_argument("--chat-template", action="store_true",
                   help="add KunlunBaize's chat template (chat_template.jinja) for chat use; off for a base model")


def _shard_size(text: str) -> int | str:
    """A ``--max-shard-size``: bytes, or a size with a unit huggingface_hub reads (KB, MB, GB, TB)."""
    if text.strip().isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text} bytes: give at least 1 byte, e.g. 5GB")
        return int(text)
    from huggingface_hub import split_torch_state_dict_into_shards

    try:
        split_torch_state_dict_into_shards({}, max_shard_size=text)  # the library's own reading of the size
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes or a number with KB, MB, GB or TB "
                                         "(e.g. 5GB)") from None
    return text


def run(args: argparse.Namespace) -> None:
    """Export ``--checkpoint`` into ``--hf``, reload it and compare logits (unless ``--no-verify``)."""
    import torch

    from ..arch import DEFAULT
    from ..checkpoint import CheckpointError, checkpoint_arch, resolve_checkpoint

    try:
        from ..hf.export import ExportError
    except ImportError as e:
        raise SystemExit(f"kunlun export: needs transformers ({e}) — pip install 'kunlunbaize[hf]'") from None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        out = Path(args.hf).resolve()
        if out == ckpt.resolve() or out in ckpt.resolve().parents:
            raise ExportError(f"--hf {args.hf} holds the checkpoint being exported ({ckpt}) and would be replaced "
                              "— choose another folder")
        spec = checkpoint_arch(ckpt)
        export = spec.hook("export")
        extra = {"chat_template": True} if args.chat_template else {}
        if args.max_shard_size is not None:
            extra["max_shard_size"] = args.max_shard_size
        if args.chat_template and spec is not DEFAULT:
            raise ExportError(f"--chat-template is for KunlunBaize checkpoints (the {spec.note} has no role tokens)")
        export(ckpt, args.hf, dtype=dtype, overwrite=args.overwrite, verify=not args.no_verify,
               log=lambda m: print(m, file=sys.stderr), **extra)
    except (CheckpointError, ExportError) as e:
        raise SystemExit(f"kunlun export: {e}") from None
    except OSError as e:  # the temporary folder is removed by the export itself: OUT is complete or untouched
        raise SystemExit(f"kunlun export: cannot write {args.hf} ({e.strerror or e}: {e.filename or ''}) — "
                         "choose a folder you can write to") from None

