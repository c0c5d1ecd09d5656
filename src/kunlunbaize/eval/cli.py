"""The ``kunlun eval`` command line (parser and command; the work is in :mod:`kunlunbaize.eval.evaluate`)."""

from __future__ import annotations

import argparse
import sys

DEFAULT_TASKS = ("bpb", "arith")


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoint import CheckpointError
    from ..cli import resolve_device
    from ..data.format import DataError
    from .evaluate import evaluate, format_table
    from .tasks import TaskError, make_task

    specs = args.task or ([] if args.lm_eval else list(DEFAULT_TASKS))
    if args.include_path and not args.lm_eval:
        raise SystemExit("kunlun eval: --include-path applies to --lm-eval tasks — add --lm-eval TASKS or drop it")
    device = resolve_device(args.device, "eval")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        tasks = [make_task(s, data=args.data, few_shot=args.few_shot, samples=args.samples,
                           temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           stop=args.stop, split=args.split) for s in specs]
        for task in tasks:
            if task.kind == "bpb":
                task.max_tokens = args.bpb_tokens
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise TaskError(f"the same task is given twice ({', '.join(names)})")
        lm_tasks = [t for t in (args.lm_eval or "").split(",") if t]
        summary = evaluate(args.checkpoint, tasks, out=args.out, lm_eval_tasks=lm_tasks,
                           include_path=args.include_path, lm_eval_few_shot=args.few_shot,
                           batch_size=args.batch_size, limit=args.limit,
                           seed=args.seed, chat=args.chat_template, fresh=args.fresh, device=device, dtype=dtype,
                           progress=not args.no_progress, workers=args.workers, timeout=args.timeout, data=args.data)
    except (TaskError, CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"kunlun eval: {e}") from None
    except KeyboardInterrupt:
        print("kunlun eval: the records scored so far are kept; run the same command to resume", file=sys.stderr)
        raise
    print(format_table(summary["rows"]))
    print(f"\nrecords and summary: {summary['out']}", file=sys.stderr)


def add_eval_parser(sub) -> None:
    from ..cli import SEED, float_in, int_at_least

    e = sub.add_parser("eval", help="evaluate a checkpoint: multiple choice, exact match, math averaged over "
                                    "samples, code pass@k (sandboxed), bits per byte; lm-evaluation-harness tasks")
    e.add_argument("--checkpoint", default="runs/small", help="run folder (newest checkpoint), checkpoint folder or "
                                                              "`kunlun export --hf` folder")
    e.add_argument("--task", action="append", metavar="NAME[=PATH]",
                   help="built in: bpb, arith, arith-mc, humaneval; a file: KIND=PATH (KIND: mc, gen, math-avg, "
                        "code, bpb) or LAYOUT=PATH (gsm8k, mmlu, …); repeatable (default: "
                        f"{' and '.join(DEFAULT_TASKS)})")
    e.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks, run through the "
                                                     "transformers integration")
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
                   help="default 8192 (arith: 16), clipped with a warning to the room the context leaves")
    e.add_argument("--stop", action="append", help="stop string, repeatable (replaces the kind's defaults)")
    e.add_argument("--seed", type=SEED, default=0, help="few-shot draws and sampling (default 0)")
    e.add_argument("--data", help="bpb: a `kunlun prepare` folder (default: the data the checkpoint was trained on)")
    e.add_argument("--split", default="val", choices=["val", "train"], help="bpb: the split (default val)")
    e.add_argument("--bpb-tokens", type=int_at_least(1), help="bpb: score only the split's first N tokens")
    e.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                   help="wrap prompts in the checkpoint's chat template (auto: when it has one)")
    e.add_argument("--workers", type=int_at_least(1), help="code: programs run in parallel (default: CPU count)")
    e.add_argument("--timeout", type=float_in(0, low_open=True), default=10.0,
                   help="code: seconds per program (default 10)")
    e.add_argument("--fresh", action="store_true", help="discard the records in --out and start over")
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
