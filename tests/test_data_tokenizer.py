"""Byte-level BPE: training, exact round trips, the saved Hugging Face folder, loading existing tokenizers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from kunlunbaize.data import DataError
from kunlunbaize.data.tokenizer import (
    EOT_TOKEN,
    SPECIAL_TOKENS,
    find_eot_token,
    load_tokenizer,
    save_tokenizer,
    special_tokens,
    train_tokenizer,
)

ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "def f(x):\n\treturn {'a': [x, 2 ** 10]}  # comment\r\n",
    "昆仑白泽 — 大型语言模型。日本語のテキスト、한국어 텍스트",
    "emoji 🙂👍🏽👨‍👩‍👧 and flags 🇨🇳🇫🇷",
    "combining e\u0301 vs \u00e9, zero width\u200bjoiner\u200d, RTL \u05e9\u05dc\u05d5\u05dd",
    "control \x00\x01\x7f chars, tabs\t\tand\n\n\nnewlines\r",
    "\ufffd replacement char and \U0010ffff max code point",
    "   \n\t  ",
    "x" * 5000,
]


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    """Varied small documents: prose, code, CJK, emoji."""
    rng = random.Random(seed)
    words = ["the", "model", "learns", "tokens", "from", "data", "昆仑", "白泽", "café", "naïve", "🙂", "x", "=",
             "def", "return", "(", ")", ":", "self", "0", "42", "\n", "    ", "\t", "import", "numpy", "as", "np"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 200))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=400)


def test_trained_tokenizer_layout(trained: Tokenizer) -> None:
    assert special_tokens(trained) == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert trained.token_to_id(EOT_TOKEN) == 0
    assert 256 + len(SPECIAL_TOKENS) < trained.get_vocab_size() <= 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(trained: Tokenizer, text: str) -> None:
    ids = trained.encode(text, add_special_tokens=False).ids
    assert trained.decode(ids, skip_special_tokens=False) == text


def test_round_trip_of_arbitrary_unicode(trained: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(50):  # random code points from all planes, surrogates excluded
        text = "".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randint(1, 80)))
        assert trained.decode(trained.encode(text).ids, skip_special_tokens=False) == text


def test_training_is_deterministic() -> None:
    texts = corpus(seed=3)
    assert train_tokenizer(texts, 350).to_str() == train_tokenizer(texts, 350).to_str()


def test_vocab_size_too_small() -> None:
    with pytest.raises(DataError, match=r"too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_saved_folder_loads_with_transformers(trained: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    save_tokenizer(trained, tmp_path, EOT_TOKEN)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in
                                                                                       tmp_path.iterdir()}
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert hf.eos_token == EOT_TOKEN and hf.eos_token_id == 0 and hf.bos_token is None
    assert set(SPECIAL_TOKENS) <= set(hf.all_special_tokens)
    for text in ROUND_TRIP:
        ids = trained.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
    chat = "<|user|>hi<|end|><|assistant|>hello<|end|>"
    assert hf.encode(chat)[0] == trained.token_to_id("<|user|>")
    assert hf.decode(hf.encode(chat), skip_special_tokens=True) == "hihello"


def test_load_existing_tokenizer_file_and_folder(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        tok, eot = load_tokenizer(path)
        assert eot == EOT_TOKEN and tok.to_str() == trained.to_str()
    with pytest.raises(DataError, match=r"no tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")


def bare_tokenizer(tokens: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(tokens, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_eot_token_discovery(tmp_path: Path) -> None:
    llama_like = bare_tokenizer({"[UNK]": 0, "<s>": 1, "</s>": 2, "a": 3})
    assert find_eot_token(llama_like) == "</s>"
    # tokenizer_config.json's eos_token wins over the built-in candidates
    both = bare_tokenizer({"[UNK]": 0, "</s>": 1, "<my_eos>": 2})
    both.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_eos>"}}))
    assert load_tokenizer(tmp_path)[1] == "<my_eos>"
    with pytest.raises(DataError, match=r"no end-of-text token.*add one"):
        find_eot_token(bare_tokenizer({"[UNK]": 0, "a": 1}))
