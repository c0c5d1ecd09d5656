"""Near-duplicate recall and precision of ``kunlun curate``'s MinHash settings by --similarity (issue 32).

For 200 English word-salad documents, a copy with a fraction of its words replaced is a duplicate pair; recall is
the share of pairs whose signatures share a bucket, by the pair's measured 5-gram Jaccard similarity; a false
positive is two unrelated documents sharing a bucket (checked over all unrelated pairs).

    PYTHONPATH=src python benchmarks/curate_minhash.py
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_curate import _essay, _mutate

from kunlunbaize.data.curate.pipeline import minhash_config

BANDS = ((0.9, 1.01), (0.8, 0.9), (0.7, 0.8), (0.6, 0.7), (0.5, 0.6), (0.0, 0.5))


def main() -> None:
    rng = random.Random(0)
    originals = [_essay(rng, 3) for _ in range(200)]
    copies = [_mutate(rng, o, rng.choice((0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15))) for o in originals]
    base = MinhashDedupSignature("/tmp/unused", config=minhash_config(0.7))
    shingles = [set(base.get_shingles(t).ravel().tolist()) for t in originals + copies]
    jac = [len(shingles[i] & shingles[i + 200]) / len(shingles[i] | shingles[i + 200]) for i in range(200)]
    print("| --similarity | buckets x hashes | " + " | ".join(f"recall J {lo:.1f}-{min(hi, 1):.1f}" for lo, hi in BANDS)
          + " | unrelated pairs flagged |")
    for similarity in (0.5, 0.6, 0.7, 0.8, 0.9):
        config = minhash_config(similarity)
        sig = MinhashDedupSignature("/tmp/unused", config=config)
        sigs = [sig.get_signature(sig.get_shingles(t)) for t in originals + copies]
        hit = [any(a == b for a, b in zip(sigs[i], sigs[i + 200], strict=True)) for i in range(200)]
        cells = []
        for lo, hi in BANDS:
            band = [h for h, j in zip(hit, jac, strict=True) if lo <= j < hi]
            cells.append(f"{sum(band)}/{len(band)}" if band else "-")
        false = sum(any(a == b for a, b in zip(sigs[i], sigs[k], strict=True))
                    for i, k in itertools.combinations(range(200), 2))
        print(f"| {similarity} | {config.num_buckets} x {config.hashes_per_bucket} | " + " | ".join(cells)
              + f" | {false}/19900 |")


if __name__ == "__main__":
    main()
