"""Defaults shown by the command line's help, kept free of heavy imports: ``kunlun --help`` imports no torch or numpy.

The library takes :data:`DEFAULT_DATA` and :data:`DECODE_ERRORS` from here. :data:`TRAIN` holds the defaults of
:class:`kunlunbaize.train.config.TrainConfig` that ``kunlun train --help`` shows (TrainConfig takes them from here).
"""

from __future__ import annotations

DEFAULT_DATA = "data/stdlib"
"""Where ``kunlun prepare`` writes by default, and what ``kunlun train`` trains on (the embedded corpus)."""

DECODE_ERRORS = ("replace", "skip")
"""What ``kunlun prepare`` does with non-UTF-8 text: replace bad bytes with U+FFFD, or skip the file."""

TRAIN = {"tokens": 500_000, "seq_len": 256, "batch_size": 16, "lr": 2e-3}
"""TrainConfig's defaults that ``kunlun train --help`` names."""

PREFILL_CHUNK = 512
"""Tokens per prefill chunk (``kunlun generate/eval/serve --prefill-chunk``): a prompt up to this long is read in one
forward, a longer one a chunk at a time through the cache (the same outputs, a working memory that does not grow with
the prompt; docs/guide-generate.md, "Long prompts")."""
