"""MinHash locality-sensitive hashing parameters derived from a user-facing similarity threshold.

Two documents whose word 5-gram Jaccard similarity is ``s`` share at least one of ``b`` buckets of ``r`` hashes with
probability ``1 - (1 - s**r) ** b``. :func:`lsh_params` picks ``(b, r)`` so that pairs at the threshold are caught
with probability at least :data:`TARGET_RECALL`, while pairs well below it are caught as rarely as the hash budget
allows.
"""

from __future__ import annotations

from ..format import DataError

MAX_HASHES = 128  # signature length: compute and disk grow linearly with it
TARGET_RECALL = 0.95  # probability of catching a pair exactly at the threshold
MARGIN = 0.15  # the false-positive probability minimised is the one at threshold - MARGIN


def catch_probability(similarity: float, buckets: int, hashes_per_bucket: int) -> float:
    """Probability that a pair of documents with Jaccard ``similarity`` collides in at least one bucket."""
    return 1.0 - (1.0 - similarity**hashes_per_bucket) ** buckets


def lsh_params(similarity: float, max_hashes: int = MAX_HASHES) -> tuple[int, int]:
    """``(buckets, hashes_per_bucket)`` for a duplicate threshold ``similarity`` in (0, 1).

    Among all ``b * r <= max_hashes`` that catch a pair at ``similarity`` with probability >= TARGET_RECALL, the one
    that least often catches a pair at ``similarity - MARGIN``; ties go to fewer hashes.
    """
    if not 0 < similarity < 1:
        raise DataError(f"--similarity must be between 0 and 1 (exclusive), got {similarity}")
    best: tuple[float, int, int, int] | None = None
    for r in range(1, max_hashes + 1):
        for b in range(1, max_hashes // r + 1):
            if catch_probability(similarity, b, r) < TARGET_RECALL:
                continue
            false_pos = catch_probability(max(similarity - MARGIN, 0.0), b, r)
            key = (round(false_pos, 6), b * r, b, r)
            if best is None or key < best:
                best = key
            break  # more buckets at this r only raise the false positives
    if best is None:  # a threshold so low that nothing meets the target: as many single-hash buckets as allowed
        return max_hashes, 1
    return best[2], best[3]
