"""The short sample ``kunlun train`` prints from the checkpoint it just wrote, with a prompt from its corpus.

Sampled, not greedy: a model after a short run has a flat distribution whose argmax loops (greedy decoding of the
main job's 130 steps repeats ``n'n'xxxx…``), so the sample draws at temperature 0.8 from the top-p 0.95 nucleus
with transformers' repetition penalty 1.3 and a fixed seed: the same command prints the same sample, and
``kunlun generate`` with the options the header names reproduces it.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_tokenizer
from ..data.format import load_meta, open_split
from .generator import load_for_generation
from .sampling import SamplingParams
from .speculative import speculative_generate

STDLIB_PROMPT = "def main():"  # the embedded default corpus is Python code
MAX_PROMPT_CHARS = 40
SAMPLING = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.3)
SEED = 0


def corpus_prompt(data: str | Path, tokenizer) -> str:
    """A prompt in the corpus's own language: ``def main():`` for the embedded Python corpus, else the start of the
    first line of the first validation (or, with no validation split, training) document, cut at a word boundary."""
    meta = load_meta(data)
    if all(str(s).startswith("python-stdlib:") for s in meta.get("sources") or ["?"]):
        return STDLIB_PROMPT
    eot = meta.get("eot_id")
    for split in ("val", "train"):
        shards = open_split(data, split) if split in meta["splits"] else []
        if not shards:
            continue
        head = [int(t) for t in shards[0][:256]]
        doc = head[:head.index(eot)] if eot in head else head
        line = next((x.strip() for x in tokenizer.decode(doc).splitlines() if x.strip()), "")
        if len(line) > MAX_PROMPT_CHARS:
            cut = line[:MAX_PROMPT_CHARS]
            line = cut.rsplit(" ", 1)[0] if " " in cut else cut
        return line
    return ""


def print_sample(checkpoint: str | Path, prompt: str | None, data: str | Path, max_new_tokens: int) -> None:
    """Print a sampled continuation of ``prompt`` (None: :func:`corpus_prompt`) from ``checkpoint`` (:data:`SAMPLING`,
    seed :data:`SEED`): decoded MTP self-speculatively when the model has depths (the same distribution as plain
    decoding), plainly otherwise. The header says how, and the command that generates more the same way."""
    loaded = load_for_generation(checkpoint)
    model, context, mtp_depth = loaded.model, loaded.context, loaded.mtp_depth
    tok, eot = load_tokenizer(loaded.checkpoint, loaded.vocab_size)
    if prompt is None:
        prompt = corpus_prompt(data, tok)
    ids = tok.encode(prompt).ids or ([eot] if eot is not None else [0])
    n = max(1, min(max_new_tokens, context - len(ids) - 1))
    if mtp_depth:
        out = speculative_generate(model, ids, n, sampling=SAMPLING, eos_id=eot, seed=SEED, truncate=True)
        how = (f"MTP self-speculative: {out.stats['tokens_per_trunk_forward']:.2f} tokens per trunk forward, depth-1 "
               f"acceptance {out.stats['acceptance_depth_1']:.2f}")
    else:
        out = loaded.generate(model, [ids], n, sampling=SAMPLING, eos_id=eot, seed=SEED, truncate=True)
        how = f"plain decoding, {loaded.arch.note}" if loaded.arch.note else "plain decoding"
    s = SAMPLING
    print(f"\nsample (temperature {s.temperature}, top-p {s.top_p}, repetition penalty {s.repetition_penalty}, seed "
          f"{SEED}; {how}):\n{prompt}{tok.decode(out.tokens[0])}\n(a short run writes text shaped like its corpus, "
          f"not yet sensible; `kunlun generate --temperature {s.temperature} --top-p {s.top_p} --repetition-penalty "
          f"{s.repetition_penalty}` for more)")
