"""Defaults shown by the command line's help, kept free of heavy imports: ``kunlun --help`` imports no torch or numpy.

The library takes :data:`DEFAULT_DATA` and :data:`DECODE_ERRORS` from here. :data:`TRAIN` repeats the defaults of
:class:`kunlunbaize.train.trainer.TrainConfig` that ``kunlun train --help`` shows (a test keeps them equal); the
parser leaves those options unset, so the run itself takes TrainConfig's.
"""

from __future__ import annotations

DEFAULT_DATA = "data/stdlib"
"""Where ``kunlun prepare`` writes by default, and what ``kunlun train`` trains on (the embedded corpus)."""

DECODE_ERRORS = ("replace", "skip")
"""What ``kunlun prepare`` does with non-UTF-8 text: replace bad bytes with U+FFFD, or skip the file."""

TRAIN = {"tokens": 500_000, "seq_len": 256, "batch_size": 16, "lr": 2e-3}
"""The TrainConfig defaults named in ``kunlun train --help``."""
