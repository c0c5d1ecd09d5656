"""``kunlun curate``: data curation on datatrove (format fixes, language identification, code and prose quality
filters, MinHash near-duplicate removal), domain mixing to token proportions, then ``kunlun prepare``'s
tokenize-and-shard step. Needs ``pip install 'kunlunbaize[curate]'``."""

from .mix import parse_mix, plan_mixture
from .pipeline import EXECUTORS, ExecutorOptions
from .run import curate

__all__ = ["EXECUTORS", "ExecutorOptions", "curate", "parse_mix", "plan_mixture"]
