"""``kunlun generate``: stream text from a trained checkpoint (plain, batched, or MTP self-speculative decoding)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .args import SEED, UsageError, add_prefill_chunk_arg, float_in, int_at_least, new_command, resolve_device
from .output import output_closed


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``kunlun generate``: the arguments, ``--prompt-file`` (not both) or stdin."""
    if args.prompt_file and args.prompt:
        raise UsageError("a prompt was given both as an argument and with --prompt-file — give only one of them")
    if args.prompt_file:
        try:
            prompts = [Path(args.prompt_file).read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"kunlun generate: cannot read prompt file {args.prompt_file}: {e}") from None
    elif args.prompt == ["-"] or (not args.prompt and not sys.stdin.isatty()):
        prompts = [sys.stdin.read()]
    else:
        prompts = args.prompt
    if not prompts or any(p == "" for p in prompts):
        raise SystemExit("kunlun generate: empty prompt — give text as an argument, --prompt-file or on stdin")
    return prompts


def _load_for_generation(args: argparse.Namespace, device: str):
    """The :class:`kunlunbaize.infer.generator.Generator` of ``--checkpoint`` (a checkpoint without MTP depths with
    --speculative is refused before anything is loaded)."""
    from ..checkpoint import CheckpointError, checkpoint_arch, resolve_checkpoint
    from ..infer.generator import load_for_generation

    ckpt = resolve_checkpoint(args.checkpoint)
    spec = checkpoint_arch(ckpt)
    if args.speculative and not spec.mtp:
        raise CheckpointError(f"{ckpt} is a {spec.note} checkpoint (`kunlun train --arch {spec.name}`): it has no "
                              "MTP depths to draft with — drop --speculative")
    return load_for_generation(ckpt, device)


def _draft_vocab(args: argparse.Namespace, ckpt, vocab_size: int):
    """The ``--draft-vocab`` most frequent token ids of ``--draft-data`` (default: the checkpoint's training data)."""
    from ..checkpoint import training_data
    from ..data.format import token_counts
    from ..infer import frequent_tokens

    data = args.draft_data or training_data(ckpt)
    if data is None:
        raise ValueError(f"--draft-vocab needs token frequencies and {ckpt} does not say what data it was trained "
                         "on: give --draft-data DIR (a folder from `kunlun prepare`)")
    if args.draft_vocab > vocab_size:
        raise ValueError(f"--draft-vocab {args.draft_vocab} exceeds the vocabulary of {vocab_size}")
    try:
        counts = token_counts(data, vocab_size)
    except (OSError, ValueError) as e:
        raise ValueError(f"--draft-vocab: cannot count tokens of {data}: {e} — give --draft-data DIR") from None
    return frequent_tokens(counts, args.draft_vocab)


def _check_options(args: argparse.Namespace, prompts: list[str]) -> None:
    """Options that make no sense together are a UsageError."""
    if not args.speculative and (args.draft_len is not None or args.adaptive or args.draft_vocab):
        raise UsageError("--draft-len, --adaptive and --draft-vocab apply to --speculative decoding — add "
                         "--speculative or drop them")
    if args.speculative and len(prompts) > 1:
        raise UsageError("--speculative decodes one prompt at a time — give a single prompt")


@dataclass
class _Ready:
    """What generation needs, loaded and checked."""

    loaded: Any  # kunlunbaize.infer.generator.Generator
    sampling: Any  # SamplingParams
    tokenizer: Any
    eot: int | None
    ids: list[list[int]]  # the prompts' tokens
    fitted: list[list[int]]  # … fitted to the context
    max_new: int
    draft_vocab: Any


def _load(args: argparse.Namespace, prompts: list[str], device: str) -> _Ready:
    """Everything generation needs, checked before anything is written to stdout: the model and its tokenizer,
    the prompts fitted to the context, sampling settings and the draft vocabulary."""
    from ..checkpoint import CheckpointError, load_tokenizer
    from ..infer import SamplingParams
    from ..infer.generate import fit_prompts
    from ..model import KunlunBaize

    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty)
        loaded = _load_for_generation(args, device)
        model, ckpt, depth = loaded.model, loaded.checkpoint, loaded.mtp_depth
        if args.speculative and depth == 0:
            raise CheckpointError(f"{ckpt} has no MTP depths (mtp_depth=0) to draft with — drop --speculative")
        if args.speculative and args.draft_len is not None and args.draft_len > depth:
            raise CheckpointError(f"--draft-len {args.draft_len} exceeds the model's mtp_depth={depth} — "
                            f"use 1 … {depth}")
        tokenizer, eot = load_tokenizer(ckpt, model.config.vocab_size)
        ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        fitted, max_new = fit_prompts(ids, args.max_new_tokens, loaded.context, args.truncate)
        draft_vocab = _draft_vocab(args, ckpt, model.config.vocab_size) if args.draft_vocab else None
        if (args.compile or args.compile_mode) and not isinstance(model, KunlunBaize):
            raise CheckpointError(f"{ckpt} is a {loaded.arch.note} checkpoint: --compile compiles KunlunBaize's "
                                  "static decoding step — drop --compile/--compile-mode")
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"kunlun generate: {e}") from None
    return _Ready(loaded, sampling, tokenizer, eot, ids, fitted, max_new, draft_vocab)


def _warn_clipped(args: argparse.Namespace, ids: list[list[int]], fitted: list[list[int]], max_new: int,
                  context: int) -> None:
    many = len(ids) > 1
    for row, (full, kept) in enumerate(zip(ids, fitted, strict=True)):
        if len(kept) < len(full):
            print(f"kunlun generate: warning: prompt{f' {row}' if many else ''} truncated to its last {len(kept)} "
                  f"of {len(full)} tokens (--truncate)", file=sys.stderr)
    if max_new < args.max_new_tokens:
        print(f"kunlun generate: warning: --max-new-tokens {args.max_new_tokens} clipped to {max_new}: the context "
              f"holds {context} tokens and the {'longest ' if many else ''}prompt takes {context - max_new}",
              file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    """Check everything, then stream the continuation of one prompt (or print each row of a batch at the end)."""
    prompts = _read_prompts(args)
    _check_options(args, prompts)
    device = resolve_device(args.device)
    ready = _load(args, prompts, device)
    _warn_clipped(args, ready.ids, ready.fitted, ready.max_new, ready.loaded.context)
    _generate(args, prompts, ready)


def _generate(args: argparse.Namespace, prompts: list[str], ready: _Ready) -> None:
    from ..infer import speculative_generate
    from ..infer.text import TextStream

    many, model, ckpt, decode = len(prompts) > 1, ready.loaded.model, ready.loaded.checkpoint, ready.loaded.generate
    fitted, max_new, sampling, eot = ready.fitted, ready.max_new, ready.sampling, ready.eot

    def write(row: int, text: str) -> None:
        if not many:
            sys.stdout.write(text)
            sys.stdout.flush()

    stream = TextStream(ready.tokenizer, len(prompts), args.stop, write)

    def should_stop(row: int, tokens: list[int]) -> bool:  # nobody reads a closed stdout: stop generating
        return stream.update(row, tokens) or (not many and output_closed())

    print(f"[{ckpt}]", file=sys.stderr)
    decoder = None
    if args.compile or args.compile_mode:
        from ..infer import StaticDecoder

        print("[compiling the decoding step: the first use of a shape takes a while (tens of seconds on a small "
              "CPU, minutes with max-autotune); inductor caches it on disk for later runs]", file=sys.stderr)
        decoder = StaticDecoder(model, len(prompts), static_cache_len(fitted, max_new, ready.loaded.context),
                                mtp=args.speculative, mode=args.compile_mode)
    if not many:
        sys.stdout.write(prompts[0])
    try:
        if args.speculative:
            result = speculative_generate(model, fitted[0], max_new, sampling, args.draft_len, args.adaptive, eot,
                                          args.seed, should_stop=should_stop, draft_vocab=ready.draft_vocab,
                                          decoder=decoder, prefill_chunk=args.prefill_chunk)
        elif decoder is not None:
            result = decode(model, fitted, max_new, sampling, eot, args.seed, should_stop=should_stop, decoder=decoder,
                            prefill_chunk=args.prefill_chunk)
        else:
            result = decode(model, fitted, max_new, sampling, eot, args.seed, should_stop=should_stop,
                            prefill_chunk=args.prefill_chunk)
    except ValueError as e:
        raise SystemExit(f"\nkunlun generate: {e}") from None
    except KeyboardInterrupt:  # keep what was generated: the held-back text, and each row of a batch
        for row in range(len(prompts)):
            stream.flush(row)
            if many:
                print(f"--- [{row}] (interrupted)\n{prompts[row]}{stream.texts[row]}")
        if not many:
            print()
        raise
    for row in range(len(prompts)):
        text = stream.finish(row, result.tokens[row])
        if many:
            print(f"--- [{row}] ({result.finish_reasons[row]})\n{prompts[row]}{text}")
    if not many:
        print()
    print(f"[finished: {', '.join(result.finish_reasons)}]", file=sys.stderr)
    if result.stats:
        print("[" + "  ".join(f"{k} {v:.3g}" for k, v in result.stats.items()) + "]", file=sys.stderr)


def static_cache_len(prompts: list[list[int]], max_new: int, context: int) -> int:
    """Slots of a compiled decoder's cache: the longest prompt plus the tokens to generate, rounded up to a power of
    two (a compiled step is traced for its cache's length: nearby lengths share one trace), at most ``context``."""
    needed = max(len(p) for p in prompts) + max_new
    return min(context, 1 << (needed - 1).bit_length())


def add_parser(sub: Any) -> None:
    """Add ``generate`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    g = new_command(sub, "generate", help="generate text from a trained checkpoint (streamed)")
    g.add_argument("prompt", nargs="*", help="prompt text (several: a batch, left-padded); '-' or none: stdin")
    g.add_argument("--checkpoint", default="runs/small", help="run folder (newest checkpoint) or checkpoint folder")
    g.add_argument("--prompt-file", help="read the prompt from this file (instead of arguments or stdin)")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=200,
                   help="at most this many tokens (clipped, with a warning, to the room the context leaves)")
    g.add_argument("--temperature", type=float_in(0), default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int_at_least(0), default=0, help="0: no top-k filter")
    g.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0, help="in (0, 1]; 1: no nucleus filter")
    g.add_argument("--repetition-penalty", dest="repetition_penalty", type=float_in(0, low_open=True), default=1.0,
                   help="> 1 discourages tokens already in the prompt or the reply (transformers' rule); 1: none")
    g.add_argument("--seed", type=SEED, default=None, help="for sampling (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--truncate", action="store_true",
                   help="keep the end of a long prompt: its last max(context − max-new-tokens, context/2) tokens")
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    g.add_argument("--draft-len", type=int_at_least(1), default=None, help="drafts per round, 1 … mtp_depth")
    g.add_argument("--adaptive", action="store_true", help="adapt the draft length to acceptance")
    g.add_argument("--draft-vocab", type=int_at_least(1), default=None, metavar="N",
                   help="draft from the N most frequent training tokens only (cheaper drafts, same output)")
    g.add_argument("--draft-data", default=None, metavar="DIR",
                   help="prepared data whose token frequencies choose --draft-vocab (default: the training data)")
    g.add_argument("--compile", action="store_true",
                   help="decode through a StaticDecoder: the step compiled once at fixed shapes (faster per token, "
                        "after a one-time compile; same output)")
    g.add_argument("--compile-mode", choices=["default", "max-autotune", "reduce-overhead"], default=None,
                   help="torch.compile mode of --compile (implies it): max-autotune on a CPU picks C++ GEMM kernels "
                        "per matrix shape (minutes to compile, a faster step); reduce-overhead: CUDA graphs")
    add_prefill_chunk_arg(g)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N, mps")

