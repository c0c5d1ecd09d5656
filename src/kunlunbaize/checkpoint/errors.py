"""The one error type of reading and writing runs, checkpoints and exports."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, unreadable or unfit; the message says which file and what to do."""


class CheckpointDamaged(CheckpointError):
    """A complete-looking checkpoint has a file that cannot be read (an earlier checkpoint may still be good)."""
