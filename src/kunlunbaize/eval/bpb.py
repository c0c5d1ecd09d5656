"""Bits per byte (bpb) and perplexity of a language model on held-out token streams.

bpb = (sum of next-token cross-entropy in nats over the scored tokens) / (ln 2 · UTF-8 bytes of those tokens).
Dividing by bytes rather than tokens makes the number independent of the tokenizer, so models with different
vocabularies can be compared on the same text.

The stream is scored in windows of ``seq_len + 1`` tokens (``seq_len`` inputs, ``seq_len`` shifted targets). With
the default ``stride = seq_len`` the windows do not overlap: every token after the first is scored exactly once, the
first target of a window seeing no context inside it. A smaller ``stride`` slides the window and scores only the
last ``stride`` targets of each window after the first, so every scored token sees at least ``seq_len - stride``
tokens of context (more exact, ``seq_len / stride`` times the cost).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.format import DataError, load_meta, open_split
from ..progress import Progress

__all__ = ["BpbResult", "TokenStream", "bits_per_byte", "bpb_of_split", "byte_length_table", "evaluate_bpb"]


@dataclass(frozen=True)
class BpbResult:
    """What :func:`bits_per_byte` measured: totals over the scored (target) tokens and the derived metrics."""

    tokens: int  # target tokens scored
    bytes: int  # UTF-8 bytes those tokens decode to (special tokens count 0)
    nats: float  # summed next-token cross-entropy, natural log
    seq_len: int
    stride: int
    windows: int

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte: ``nats / (ln 2 · bytes)``."""
        return self.nats / (math.log(2) * self.bytes)

    @property
    def nats_per_token(self) -> float:
        """Mean cross-entropy per scored token, in nats."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        """Token-level perplexity: ``exp(nats_per_token)`` (depends on the tokenizer, unlike bpb)."""
        return math.exp(self.nats_per_token)

    @property
    def bytes_per_token(self) -> float:
        """Mean UTF-8 bytes per scored token (the tokenizer's compression on this text)."""
        return self.bytes / self.tokens

    def to_dict(self) -> dict[str, Any]:
        """The totals and the derived metrics as a JSON-able dict."""
        return {**asdict(self), "bpb": self.bpb, "nats_per_token": self.nats_per_token,
                "perplexity": self.perplexity, "bytes_per_token": self.bytes_per_token}


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: ByteLevel alphabet character → the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _token_byte_length(token: str) -> int:
    """UTF-8 bytes a byte-level BPE token string stands for (characters outside the alphabet count as UTF-8)."""
    table = _unicode_to_byte()
    return sum(1 if ch in table else len(ch.encode("utf-8")) for ch in token)


def byte_length_table(tokenizer: Any) -> np.ndarray:
    """Bytes of text each id of a byte-level BPE ``tokenizers.Tokenizer`` decodes to, as an int64 array [V].

    Built from the token strings through the ByteLevel alphabet (decoding one id alone would turn part of a
    multi-byte character into U+FFFD). Special tokens (end-of-text, …) count 0 bytes; other added tokens count
    the UTF-8 bytes of their content.
    """
    added = tokenizer.get_added_tokens_decoder()
    out = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i >= len(out):
            raise ValueError(f"token id {i} ({token!r}) is not below the vocabulary size {len(out)}")
        if i in added:
            out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        else:
            out[i] = _token_byte_length(token)
    return out


class TokenStream:
    """One token sequence over several arrays (the shards of a split), sliced without concatenating them all."""

    def __init__(self, parts: np.ndarray | Sequence[np.ndarray]) -> None:
        if isinstance(parts, (np.ndarray, torch.Tensor)) or (len(parts) and np.isscalar(parts[0])):
            parts = [np.asarray(parts)]
        self.parts = [np.asarray(p).reshape(-1) for p in parts if len(p)]
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, end: int) -> np.ndarray:
        """Tokens ``start … end-1`` as an int64 array (may span parts)."""
        out = []
        part = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            lo = start - int(self.offsets[part])
            take = min(end - start, len(self.parts[part]) - lo)
            out.append(np.asarray(self.parts[part][lo:lo + take], dtype=np.int64))
            start += take
            part += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, scored)`` of each window over ``n`` tokens: tokens ``start … end-1``, the last ``scored`` of
    its ``end - start - 1`` targets being scored (each stream position 1 … n-1 is scored exactly once)."""
    done = 1  # stream positions < done are scored (position 0 is never a target)
    start = 0
    while done < n:
        end = min(start + seq_len + 1, n)
        yield start, end, end - done
        done = end
        start += stride


def _batches(windows: list[tuple[int, int, int]], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows grouped into batches of equal window length."""
    batch: list[tuple[int, int, int]] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch




def _model_device(model: torch.nn.Module) -> torch.device:
    if isinstance(getattr(model, "device", None), torch.device):
        return model.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _score_batch(model: torch.nn.Module, ids: torch.Tensor, scored: list[int]) -> float:
    """Summed cross-entropy (nats) of the last ``scored[r]`` targets of each row ``r`` of ``ids`` [B, L+1]."""
    logits = model(ids[:, :-1], mtp=False).logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L]
    length = nll.shape[1]
    keep = torch.arange(length, device=nll.device)[None, :] >= (
        length - torch.tensor(scored, device=nll.device))[:, None]
    return float(nll.double()[keep].sum())


def bits_per_byte(model: torch.nn.Module, tokens: np.ndarray | Sequence[np.ndarray] | TokenStream,
                  byte_lengths: np.ndarray | Sequence[int], *, seq_len: int, stride: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None, progress: bool = False) -> BpbResult:
    """Bits per byte of ``model`` on the token stream ``tokens`` (an id array, or a list of arrays read as one).

    ``byte_lengths[i]`` is the UTF-8 byte count of id ``i`` (:func:`byte_length_table`). The model is called as
    ``model(ids, mtp=False)`` and must return an object with ``.logits`` [B, T, V]. Windows of ``seq_len + 1``
    tokens, ``stride`` apart (default ``seq_len``: no overlap; see the module docstring). ``max_tokens`` scores only
    the first ``max_tokens`` targets. A stream shorter than one window is scored as one shorter window.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len or batch_size < 1:
        raise ValueError(f"need seq_len >= 1, 1 <= stride <= seq_len and batch_size >= 1 "
                         f"(got seq_len={seq_len}, stride={stride}, batch_size={batch_size})")
    stream = tokens if isinstance(tokens, TokenStream) else TokenStream(tokens)
    n = len(stream) if max_tokens is None else min(len(stream), max_tokens + 1)
    if n < 2:
        raise DataError(f"the token stream has {len(stream)} tokens (max_tokens={max_tokens}): at least 2 are needed "
                        "to score one next-token prediction")
    table = torch.as_tensor(np.asarray(byte_lengths, dtype=np.int64))
    windows = list(_windows(n, seq_len, stride))
    device = _model_device(model)
    nats, n_bytes, n_tokens = 0.0, 0, 0
    bar = Progress(len(windows), desc="bpb", unit="window", enabled=progress)
    with torch.inference_mode():
        for batch in _batches(windows, batch_size):
            rows = [stream.slice(s, e) for s, e, _ in batch]
            ids = torch.from_numpy(np.stack(rows))
            scored = [k for _, _, k in batch]
            nats += _score_batch(model, ids.to(device), scored)
            targets = torch.cat([torch.from_numpy(r[len(r) - k:]) for r, k in zip(rows, scored, strict=True)])
            n_bytes += int(table[targets].sum())
            n_tokens += len(targets)
            bar.update(len(batch))
    bar.close()
    if n_bytes == 0:
        raise DataError(f"the {n_tokens} scored tokens decode to 0 bytes (only special tokens): bits per byte is "
                        "undefined; evaluate on a split with text")
    return BpbResult(tokens=n_tokens, bytes=n_bytes, nats=nats, seq_len=seq_len, stride=stride,
                     windows=len(windows))


def _trained_seq_len(ckpt: Path) -> int | None:
    """The ``seq_len`` the checkpoint was trained with (from ``trainer_state.json``), or None if unknown."""
    try:
        value = json.loads((ckpt / "trainer_state.json").read_text())["train_config"]["seq_len"]
        return int(value) if int(value) >= 1 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_tokenizers(ckpt: Path, data: Path, meta: dict[str, Any], vocab_size: int) -> None:
    """DataError when the dataset's token ids do not mean what the checkpoint's tokenizer says."""
    from ..checkpoint import tokenizer_digest

    if int(meta.get("vocab_size", vocab_size)) != vocab_size:
        raise DataError(f"dataset {data} has a vocabulary of {meta['vocab_size']:,} tokens but the model in {ckpt} has "
                        f"{vocab_size:,}: evaluate on data prepared with the model's tokenizer "
                        f"(`kunlun prepare --tokenizer {ckpt / 'tokenizer.json'}`)")
    ours, theirs = tokenizer_digest(ckpt), tokenizer_digest(data)
    if ours is not None and theirs is not None and ours != theirs:
        raise DataError(f"dataset {data} was tokenized with another tokenizer than the model in {ckpt} (the "
                        f"tokenizer.json files differ in vocabulary, merges or special tokens): evaluate on data "
                        f"prepared with the model's tokenizer (`kunlun prepare --tokenizer {ckpt / 'tokenizer.json'}`)")


def evaluate_bpb(checkpoint: str | Path, data_dir: str | Path, split: str = "val", *, seq_len: int | None = None,
                 stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                 device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Bits per byte and perplexity of a checkpoint (run or checkpoint folder) on a split of a prepared dataset.

    ``seq_len`` defaults to the checkpoint's training sequence length (else the model's ``max_seq_len``). Returns a
    JSON-able dict: ``checkpoint``, ``data``, ``split``, ``tokens``, ``bytes``, ``nats``, ``bpb``,
    ``nats_per_token``, ``perplexity``, ``bytes_per_token``, ``seq_len``, ``stride``, ``windows`` and
    ``split_tokens`` (the split's size; ``tokens`` is one less, or ``max_tokens``). Raises DataError for an empty
    split or a dataset tokenized differently from the checkpoint, CheckpointError for an unusable checkpoint.
    """
    from ..checkpoint import load_tokenizer
    from ..infer.load import load_model

    model, ckpt = load_model(checkpoint, device=device)
    tokenizer, _ = load_tokenizer(ckpt, model.config.vocab_size)
    return bpb_of_split(model, ckpt, tokenizer, model.config.max_seq_len, data_dir, split, seq_len=seq_len,
                        stride=stride, max_tokens=max_tokens, batch_size=batch_size, progress=progress)


def bpb_of_split(model, ckpt: Path, tokenizer, max_seq_len: int, data_dir: str | Path, split: str = "val", *,
                 seq_len: int | None = None, stride: int | None = None, max_tokens: int | None = None,
                 batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """:func:`evaluate_bpb` for a model already loaded from checkpoint folder ``ckpt`` (called as
    ``model(ids, mtp=False)``; ``tokenizer`` is its ``tokenizers.Tokenizer``, ``max_seq_len`` its context)."""
    data = Path(data_dir)
    meta = load_meta(data)
    _check_tokenizers(ckpt, data, meta, tokenizer.get_vocab_size())
    stream = TokenStream(open_split(data, split))
    if len(stream) < 2:
        raise DataError(f"the {split} split of {data} has {len(stream)} tokens: nothing to evaluate (was it prepared "
                        f"with --val-fraction 0?); prepare again with e.g. `--val-fraction 0.01`, or evaluate "
                        f"split='train'")
    if seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={max_seq_len}; pass seq_len <= "
                         f"{max_seq_len}")
    seq_len = seq_len or min(_trained_seq_len(ckpt) or max_seq_len, max_seq_len)
    result = bits_per_byte(model, stream, byte_length_table(tokenizer), seq_len=seq_len, stride=stride,
                           batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    return {"checkpoint": str(ckpt), "data": str(data), "split": split, "split_tokens": len(stream),
            **result.to_dict()}
