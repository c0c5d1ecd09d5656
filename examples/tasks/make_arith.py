"""Write the example lm-eval task data: the 500 held-out arith problems in the gen and mc schemas.

    python examples/tasks/make_arith.py        # rewrites arith.jsonl and arith-mc.jsonl next to this file

The files are committed; tests/test_eval_harness.py checks they equal a fresh generation.
"""

from __future__ import annotations

from pathlib import Path

from kunlunbaize.eval.arith import arith_mc_problems, arith_problems, write_jsonl

HERE = Path(__file__).resolve().parent


def main() -> None:
    n = write_jsonl(HERE / "arith.jsonl", arith_problems("test"), fields=("id", "prompt", "answer"))
    m = write_jsonl(HERE / "arith-mc.jsonl", arith_mc_problems("test"), fields=("id", "question", "choices", "answer"))
    print(f"wrote {n} problems to {HERE / 'arith.jsonl'} and {m} to {HERE / 'arith-mc.jsonl'}")


if __name__ == "__main__":
    main()
