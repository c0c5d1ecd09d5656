"""The short greedy sample ``kunlun train`` prints from the checkpoint it just wrote, with a prompt from its corpus."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_tokenizer
from ..data.format import load_meta, open_split
from .generator import load_for_generation
from .speculative import speculative_generate

STDLIB_PROMPT = "def main():"  # the embedded default corpus is Python code
MAX_PROMPT_CHARS = 40


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
    """Print a greedy continuation of ``prompt`` (None: :func:`corpus_prompt`) from ``checkpoint``: decoded
    MTP self-speculatively when the model has depths; a Llama baseline checkpoint decodes plainly."""
    loaded = load_for_generation(checkpoint)
    model, context, mtp_depth = loaded.model, loaded.context, loaded.mtp_depth
    tok, eot = load_tokenizer(loaded.checkpoint, loaded.vocab_size)
    if prompt is None:
        prompt = corpus_prompt(data, tok)
    ids = tok.encode(prompt).ids or ([eot] if eot is not None else [0])
    n = max(1, min(max_new_tokens, context - len(ids) - 1))
    if mtp_depth:
        out = speculative_generate(model, ids, n, eos_id=eot, truncate=True)
        how = (f"greedy, MTP self-speculative: {out.stats['tokens_per_trunk_forward']:.2f} tokens per trunk "
               f"forward, depth-1 acceptance {out.stats['acceptance_depth_1']:.2f}")
    else:
        out = loaded.generate(model, [ids], n, eos_id=eot, truncate=True)
        how = f"greedy, {loaded.arch.note}" if loaded.arch.note else "greedy"
    print(f"\nsample ({how}; `kunlun generate` for more):\n{prompt}{tok.decode(out.tokens[0])}")
