"""The tokenizer saved with a checkpoint or an export."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError
from .folder import TOKENIZER_FILE

EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def load_tokenizer(ckpt: Path, vocab_size: int):
    """The ``tokenizers.Tokenizer`` saved with a checkpoint, and its end-of-text id (None if it has none)."""
    from tokenizers import Tokenizer

    file = ckpt / TOKENIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{ckpt} has no {TOKENIZER_FILE}; copy the tokenizer of the training data "
                              "(the `kunlun prepare` folder) next to model.safetensors")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on damaged files
        raise CheckpointError(f"{file} is unreadable or truncated ({e}) — copy {TOKENIZER_FILE} from the training "
                              "data (the `kunlun prepare` folder) or another checkpoint of the run") from None
    if tok.get_vocab_size() != vocab_size:
        raise CheckpointError(f"tokenizer {file} has {tok.get_vocab_size()} tokens but the model has {vocab_size}: "
                              "they were not trained together")
    eot = next((tok.token_to_id(t) for t in EOT_CANDIDATES if tok.token_to_id(t) is not None), None)
    return tok, eot
