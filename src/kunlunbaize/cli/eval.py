"""``kunlun eval``: evaluate a checkpoint on built-in, file and lm-evaluation-harness tasks (the work is in
:mod:`kunlunbaize.eval.evaluate`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .args import SEED, UsageError, add_prefill_chunk_arg, float_in, int_at_least, new_command, resolve_device

DEFAULT_TASKS = ("bpb", "arith")


def task_spec(spec: str) -> str:
    """An argparse ``type`` for ``--task``: NAME of a built-in task, or KIND=PATH / LAYOUT=PATH (the file is read
    later, when the task is made)."""
    from ..eval.convert import LAYOUTS
    from ..eval.tasks import BUILTINS, KINDS, TaskError, parse_spec

    try:
        name, path = parse_spec(spec)
    except TaskError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--task {spec!r}: ")) from None
    if name == "ruler":
        from ..eval.ruler import RulerError, parse_tasks

        try:
            parse_tasks(path)
        except RulerError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return spec
    if name == "position-loss":  # position-loss=DIR: a prepared dataset, checked when the task is made
        return spec
    if path is None and name in KINDS and name != "bpb":
        raise argparse.ArgumentTypeError(f"{name} needs a file: {name}=PATH (or {name}=arith, {name}=humaneval for "
                                         "a built-in set)")
    if path is None and name not in BUILTINS:
        raise argparse.ArgumentTypeError(f"unknown task {name!r}: built in are {', '.join(BUILTINS)}; evaluate a "
                                         f"file with KIND=PATH (KIND: {', '.join(KINDS)}) or LAYOUT=PATH (e.g. "
                                         "gsm8k=test.jsonl)")
    if path is not None and name not in KINDS and (name not in LAYOUTS or name == "canonical"):
        raise argparse.ArgumentTypeError(f"{name}={path}: {name!r} is neither a task kind ({', '.join(KINDS)}) nor "
                                         f"a known layout ({', '.join(LAYOUTS)})")
    return spec


def lengths_list(text: str) -> tuple[int, ...]:
    """An argparse ``type`` for ``--lengths``: comma-separated token counts (``1k,2k,4k``)."""
    from ..eval.ruler import RulerError, parse_lengths

    try:
        return parse_lengths(text)
    except RulerError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--lengths ")) from None


def json_object(text: str) -> dict[str, Any]:
    """An argparse ``type`` for ``--lm-eval-metadata``: a JSON object."""
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): write e.g. '{{\"max_seq_lengths\": [4096]}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"max_seq_lengths\": [4096]}'")
    return value


def run(args: argparse.Namespace) -> None:
    """Evaluate, print the results table, and say where the records are."""
    specs = args.task or ([] if args.lm_eval else list(DEFAULT_TASKS))
    if args.include_path and not args.lm_eval:
        raise UsageError("--include-path applies to --lm-eval tasks — add --lm-eval TASKS or drop it")
    if args.lm_eval_metadata is not None and not args.lm_eval:
        raise UsageError("--lm-eval-metadata applies to --lm-eval tasks — add --lm-eval TASKS or drop it")
    device = resolve_device(args.device)
    import torch

    from ..checkpoint import CheckpointError
    from ..data.format import DataError
    from ..eval.evaluate import evaluate, format_table
    from ..eval.tasks import TaskError, make_task

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        tasks = [make_task(s, data=args.data, few_shot=args.few_shot, samples=args.samples,
                           temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           stop=args.stop, split=args.split, lengths=args.lengths, per_length=args.per_length)
                 for s in specs]
        for task in tasks:
            if task.kind == "bpb":
                task.max_tokens = args.bpb_tokens
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise UsageError(f"--task: the same task is given twice ({', '.join(names)})")
        lm_tasks = [t for t in (args.lm_eval or "").split(",") if t]
        summary = evaluate(args.checkpoint, tasks, out=args.out, lm_eval_tasks=lm_tasks,
                           include_path=args.include_path, lm_eval_few_shot=args.few_shot,
                           lm_eval_metadata=args.lm_eval_metadata,
                           batch_size=args.batch_size, limit=args.limit,
                           seed=args.seed, chat=args.chat_template, fresh=args.fresh, device=device, dtype=dtype,
                           progress=not args.no_progress, workers=args.workers, timeout=args.timeout, data=args.data,
                           prefill_chunk=args.prefill_chunk)
    except (TaskError, CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"kunlun eval: {e}") from None
    except KeyboardInterrupt:
        print("kunlun eval: the records scored so far are kept; run the same command to resume", file=sys.stderr)
        raise
    print(format_table(summary["rows"]))
    for task in summary["tasks"]:
        if "ruler" in task:
            print(f"\n{task['task']}: score by length\n{task['ruler']['table']}")
        if "position_loss" in task:
            print(f"\n{task['task']}: {task['position_loss']['table']}")
    print(f"\nrecords and summary: {summary['out']}", file=sys.stderr)


def add_parser(sub: Any) -> None:
    """Add ``eval`` to ``sub`` (from ``ArgumentParser.add_subparsers``)."""
    e = new_command(sub, "eval", help="evaluate a checkpoint: multiple choice, exact match, math averaged over "
                                      "samples, code pass@k (sandboxed), bits per byte; lm-evaluation-harness tasks")
    e.add_argument("--checkpoint", default="runs/small", help="run folder (newest checkpoint), checkpoint folder or "
                                                              "`kunlun export --hf` folder")
    e.add_argument("--task", action="append", type=task_spec, metavar="NAME[=PATH]",
                   help="built in: bpb, arith, arith-mc, humaneval, ruler (the long-context suite; ruler=TASK,… "
                        "some of its tasks), position-loss (loss by position on validation windows of each "
                        "--lengths; position-loss=DIR another prepared dataset); a file: KIND=PATH (KIND: mc, "
                        "gen, math-avg, code, bpb) or LAYOUT=PATH (gsm8k, mmlu, …); repeatable (default: "
                        f"{' and '.join(DEFAULT_TASKS)})")
    e.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks, run through the "
                                                     "transformers integration")
    e.add_argument("--lm-eval-metadata", type=json_object, metavar="JSON",
                   help="metadata for every --lm-eval task, as lm-eval's --metadata: e.g. "
                        "'{\"max_seq_lengths\": [1024, 2048]}' for its RULER tasks")
    e.add_argument("--include-path", metavar="DIR", help="folder of extra lm-eval task YAMLs (e.g. examples/tasks)")
    e.add_argument("--out", help="results folder (default: RUN/eval/<checkpoint>, or evals/<folder> for an export);"
                                 " an interrupted evaluation resumes there")
    e.add_argument("--limit", type=int_at_least(1), help="evaluate only the first N problems of each task")
    e.add_argument("--batch-size", type=int_at_least(1), default=16, help="sequences per forward (default 16)")
    e.add_argument("--few-shot", type=int_at_least(0), help="solved examples before each prompt (default: 0; "
                                                            "arith: 3; lm-eval: the task's own)")
    e.add_argument("--samples", type=int_at_least(1), help="generations per problem (math-avg: 16; code: 1)")
    e.add_argument("--temperature", type=float_in(0), help="math-avg: 0.7; code: 0 for one sample, 0.8 for more")
    e.add_argument("--top-p", type=float_in(0, 1, low_open=True), help="nucleus sampling (default 1)")
    e.add_argument("--max-new-tokens", type=int_at_least(1),
                   help="default 8192 (arith: 16; ruler: each task's answer budget, RULER's), clipped with a warning "
                        "to the room the context leaves")
    e.add_argument("--stop", action="append", help="stop string, repeatable (replaces the kind's defaults)")
    e.add_argument("--seed", type=SEED, default=0, help="few-shot draws and sampling (default 0)")
    e.add_argument("--data", help="bpb, position-loss: a `kunlun prepare` folder (default: the data the checkpoint "
                                  "was trained on)")
    e.add_argument("--split", default="val", choices=["val", "train"],
                   help="bpb, position-loss: the split (default val)")
    e.add_argument("--bpb-tokens", type=int_at_least(1), help="bpb: score only the split's first N tokens")
    e.add_argument("--lengths", type=lengths_list, metavar="L,L,…",
                   help="ruler: total tokens per sample, e.g. 1k,2k,4k (k = 1024; default 4k,8k,16k,32k,64k,128k), "
                        "clipped with a warning to the model's context; position-loss: window lengths (default: the "
                        "model's context), those beyond the context read through a sliding window of it")
    e.add_argument("--per-length", type=int_at_least(1), metavar="N",
                   help="ruler: samples per task and length (default 25; --limit caps it too); position-loss: "
                        "windows per length (default: every whole window of the split)")
    e.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                   help="wrap prompts in the checkpoint's chat template (auto: when it has one)")
    e.add_argument("--workers", type=int_at_least(1), help="code: programs run in parallel (default: CPU count)")
    e.add_argument("--timeout", type=float_in(0, low_open=True), default=10.0,
                   help="code: seconds per program (default 10)")
    e.add_argument("--fresh", action="store_true", help="discard the records in --out and start over")
    add_prefill_chunk_arg(e)
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
