"""Wall time of the long-context suite (``kunlun eval --task ruler``) per length, split into making the samples
(tokenizer work: exact-length fitting) and the model (prefill and generation).

    .venv/bin/python benchmarks/ruler_walltime.py --checkpoint runs/ctx4k --lengths 1k,2k,4k --per-length 5
    .venv/bin/python benchmarks/ruler_walltime.py --make-tiny /tmp/ruler-tiny --lengths 512,1k,2k

``--make-tiny DIR`` first trains the test suite's tiny model (83K parameters, BPE vocabulary 320, a few Python
standard-library modules, 22 steps) with a 2,048-token context and evaluates that. Prints a Markdown table and the
suite's Table-3 table; the records stay in ``--out`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "conv_kernel_sizes": (3, 5),
        "mtp_depth": 2, "max_seq_len": 2048}  # tests/helpers.py's TRAIN_MODEL with a longer context


def make_tiny(root: Path) -> Path:
    """Prepare six standard-library modules and train the tiny model on them; the run folder."""
    from kunlunbaize.data.prepare import prepare
    from kunlunbaize.train.trainer import TrainConfig, train

    src = root / "corpus"
    src.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "colorsys.py", "fnmatch.py", "bisect.py", "heapq.py"):
        (src / name).write_bytes((stdlib / name).read_bytes())
    prepare(sources=[str(src)], out=root / "ds", vocab_size=320, workers=1, val_fraction=0.2, progress=False, log=None,
            overwrite=True)
    train(TrainConfig(data=str(root / "ds"), out=str(root / "run"), preset="tiny", model_overrides=dict(TINY),
                      seq_len=32, tokens=32 * 8 * 20, batch_size=8, lr=3e-3, eval_every=1000, progress=False))
    return root / "run"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="run, checkpoint or export folder")
    p.add_argument("--make-tiny", metavar="DIR", help="train the tiny model into DIR first and evaluate it")
    p.add_argument("--tasks", help="ruler=TASKS (default: the whole suite)")
    p.add_argument("--lengths", default="512,1k,2k")
    p.add_argument("--per-length", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, help="every task's answer budget (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="results folder (default: temporary)")
    args = p.parse_args()
    if not args.checkpoint and not args.make_tiny:
        p.error("give --checkpoint or --make-tiny DIR")
    from kunlunbaize.eval.evaluate import evaluate
    from kunlunbaize.eval.ruler import length_label, parse_lengths
    from kunlunbaize.eval.tasks import make_task

    checkpoint = make_tiny(Path(args.make_tiny)) if args.make_tiny else args.checkpoint
    task = make_task("ruler" + (f"={args.tasks}" if args.tasks else ""), lengths=parse_lengths(args.lengths),
                     per_length=args.per_length, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = evaluate(checkpoint, [task], out=args.out or tmp, batch_size=args.batch_size, device=args.device,
                           progress=False, fresh=True)
        total = time.perf_counter() - start
    ruler = summary["tasks"][0]["ruler"]
    print("| length | samples | seconds | making the samples | model | s / sample | score |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    scores = {r["metric"]: r for r in summary["rows"]}
    for n in ruler["lengths"]:
        wall, making = ruler["wall_s"][str(n)], ruler["making_s"][str(n)]
        row = scores.get(f"score@{length_label(n)}")
        count = row["n"] if row else 0
        print(f"| {length_label(n)} | {count} | {wall:.1f} | {making:.1f} | {wall - making:.1f} | "
              f"{wall / max(count, 1):.2f} | {row['value']:.3f} |" if row else f"| {length_label(n)} | 0 | — |")
    print(f"\ntotal (with loading the model): {total:.1f} s; skipped: {', '.join(ruler['skipped']) or 'none'}\n")
    print(ruler["table"])
    print(json.dumps({"lengths": ruler["lengths"], "wall_s": ruler["wall_s"], "making_s": ruler["making_s"]}))


if __name__ == "__main__":
    main()
