"""Evaluation helpers. Lightweight on import (no torch): the sandbox lives in :mod:`kunlunbaize.eval.sandbox`,
answer extraction and scoring in :mod:`kunlunbaize.eval.scoring`, the built-in ``arith`` task in
:mod:`kunlunbaize.eval.arith`, reading task files and converting public layouts (MMLU, GSM8K, HumanEval, …) to the
canonical schemas in :mod:`kunlunbaize.eval.convert`."""

from __future__ import annotations

__all__ = ["arith", "convert", "sandbox", "scoring"]
