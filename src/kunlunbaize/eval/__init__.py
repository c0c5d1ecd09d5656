"""Evaluation (``kunlun eval``). Lightweight on import (no torch).

Torch-free parts: the sandbox for generated code (:mod:`.sandbox`), answer extraction and scoring
(:mod:`.scoring`), the built-in ``arith`` task (:mod:`.arith`), task files and public layouts (:mod:`.convert`),
task specs and prompts (:mod:`.tasks`), the long-context suite's samples at exact token lengths (:mod:`.ruler`,
:mod:`.ruler_words`). With torch: a checkpoint as the evaluator sees it (:mod:`.model`), the
per-task runner with records and resume (:mod:`.runner`), the command's orchestration and table
(:mod:`.evaluate`), bits per byte (:mod:`.bpb`), the long-context suite on a model (:mod:`.ruler_run`) and
lm-evaluation-harness (:mod:`.harness`).
"""

from __future__ import annotations

__all__ = ["arith", "bpb", "convert", "evaluate", "harness", "model", "ruler", "ruler_run", "ruler_words", "runner",
           "sandbox", "scoring", "tasks"]
