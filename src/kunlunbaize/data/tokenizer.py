"""Byte-level BPE tokenizer: train one on a corpus, load an existing one, save it as a Hugging Face tokenizer folder.

A trained tokenizer encodes any byte sequence (its initial alphabet is all 256 bytes), has no normalizer (so
``decode(encode(text)) == text`` exactly), and has the special tokens :data:`SPECIAL_TOKENS` with ``<|endoftext|>``
as id 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .format import DataError

EOT_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (EOT_TOKEN, *CHAT_TOKENS)
EOT_CANDIDATES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *, length: int | None = None,
                    show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts``, with at most ``vocab_size`` entries including special tokens.

    The result is deterministic for the same texts in the same order. On a small corpus the vocabulary can end up
    smaller than ``vocab_size`` (no pair left to merge).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def _tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}: give a tokenizer.json file or a folder containing one "
                        f"(e.g. a saved Hugging Face tokenizer)")
    return path


def find_eot_token(tok: Tokenizer, preferred: str | None = None) -> str:
    """The end-of-text token of ``tok``: ``preferred`` if in the vocabulary, else the first known candidate found."""
    for candidate in ((preferred,) if preferred else ()) + EOT_CANDIDATES:
        if tok.token_to_id(candidate) is not None:
            return candidate
    raise DataError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}); add one, "
                    f"e.g. `tok.add_special_tokens(['{EOT_TOKEN}'])` and save it, or let `kunlun prepare` train a "
                    f"tokenizer (omit --tokenizer)")


def load_tokenizer(path: str | os.PathLike[str]) -> tuple[Tokenizer, str]:
    """An existing tokenizer (a ``tokenizer.json`` or a folder with one) and its end-of-text token.

    In a folder, the ``eos_token`` of ``tokenizer_config.json`` is preferred when present.
    """
    file = _tokenizer_file(Path(path))
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a generic Exception for malformed files
        raise DataError(f"cannot load the tokenizer {file}: {e}") from None
    preferred = None
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError):
            eos = None
        preferred = eos.get("content") if isinstance(eos, dict) else eos
    return tok, find_eot_token(tok, preferred)


def special_tokens(tok: Tokenizer) -> dict[str, int]:
    """Special tokens of ``tok`` and their ids, by id."""
    decoder = tok.get_added_tokens_decoder()
    return {t.content: i for i, t in sorted(decoder.items()) if t.special}


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike[str], eot_token: str) -> None:
    """Write ``tok`` to ``out_dir`` as a folder that ``PreTrainedTokenizerFast.from_pretrained`` loads as is.

    Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json, with ``eot_token`` as the EOS token,
    no BOS token, and the other special tokens registered as extra special tokens.
    """
    import transformers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    extra = [t for t in special_tokens(tok) if t != eot_token]
    key = "extra_special_tokens" if int(transformers.__version__.split(".")[0]) >= 5 else "additional_special_tokens"
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot_token, bos_token=None, **{key: extra})
    hf.save_pretrained(str(out))
    special_map = out / "special_tokens_map.json"
    if not special_map.exists():  # transformers >= 5 no longer writes it; older tools still read it
        special_map.write_text(json.dumps({"eos_token": eot_token, "additional_special_tokens": extra}, indent=2)
                               + "\n", encoding="utf-8")
