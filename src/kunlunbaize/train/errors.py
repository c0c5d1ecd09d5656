"""The errors the training loop raises for the CLI to report in one line."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row, or the run folder is in use)."""


class TrainingInterrupted(TrainingError):
    """Stopped by a repeated Ctrl-C without saving; the last complete checkpoint is untouched."""
