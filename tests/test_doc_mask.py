"""Packed documents (``kunlun train --doc-mask``): a window holding documents A|B|… computes each as if alone."""

from __future__ import annotations

import pytest
import torch

from kunlunbaize.model import documents as documents_module
from kunlunbaize.model.documents import Documents, document_ids
from kunlunbaize.model.layers import CausalDSConv
from kunlunbaize.model.loss import IGNORE_INDEX

from .helpers import build, tiny

SWITCHES = {  # the full model, each switch alone, and none
    "full": dict(dense_residual=True, transformerx=True, mtp_depth=2),
    "dense": dict(dense_residual=True, transformerx=False, mtp_depth=0),
    "transformerx": dict(dense_residual=False, transformerx=True, mtp_depth=0, conv_kernel_sizes=(2, 5)),
    "mtp": dict(dense_residual=False, transformerx=False, mtp_depth=3),
    "none": dict(dense_residual=False, transformerx=False, mtp_depth=0),
}
LAYOUTS = [(9, 13, 2, 6), (1, 17, 3, 9)]  # document lengths of each row; some shorter than an MTP depth


def packed(layouts: list[tuple[int, ...]], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = sum(layouts[0])
    ids = torch.randint(0, vocab, (len(layouts), T), generator=g)
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in layouts])
    return ids, docs


def spans(row: tuple[int, ...]) -> list[slice]:
    out, at = [], 0
    for n in row:
        out.append(slice(at, at + n))
        at += n
    return out


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_document_of_a_window_equals_the_document_alone(name: str) -> None:
    model = build(tiny(**SWITCHES[name]))
    ids, docs = packed(LAYOUTS, model.config.vocab_size)
    with torch.no_grad():
        out = model(ids, document_ids=docs)
        for b, row in enumerate(LAYOUTS):
            for span in spans(row):
                alone = model(ids[b:b + 1, span])
                torch.testing.assert_close(out.logits[b:b + 1, span], alone.logits, atol=2e-5, rtol=1e-4)
                assert len(out.mtp_logits) == len(alone.mtp_logits) == model.config.mtp_depth
                for packed_j, alone_j in zip(out.mtp_logits, alone.mtp_logits, strict=True):
                    torch.testing.assert_close(packed_j[b:b + 1, span], alone_j, atol=2e-5, rtol=1e-4)


def summed_losses(model, ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Main and per-depth losses times their number of targets (sums, comparable across windows)."""
    out = model(ids, labels=ids, **kwargs)
    docs = Documents(kwargs["document_ids"]) if "document_ids" in kwargs else None
    sums = []
    for shift, loss in enumerate([out.main_loss, *out.mtp_losses], start=1):
        labels = ids if docs is None else docs.labels(ids, shift, IGNORE_INDEX)
        sums.append(loss * (labels[:, shift:] != IGNORE_INDEX).sum())
    return sums


@pytest.mark.parametrize("chunked", [False, True])
def test_window_loss_is_the_sum_of_the_documents_losses(chunked: bool) -> None:
    model = build(tiny(**SWITCHES["full"]))
    ids, docs = packed(LAYOUTS[:1], model.config.vocab_size, seed=1)
    with torch.no_grad():
        window = summed_losses(model, ids, document_ids=docs, logits=not chunked)
        alone = [summed_losses(model, ids[:, span]) for span in spans(LAYOUTS[0])]
    for depth, total in enumerate(window):
        torch.testing.assert_close(total, sum(doc[depth] for doc in alone), atol=1e-4, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    model = build(tiny(**SWITCHES["full"])).train()
    ids, docs = packed(LAYOUTS, model.config.vocab_size)
    grads = []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        model.zero_grad()
        loss = model(ids, labels=ids, document_ids=docs, logits=False).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_default_path_builds_no_document_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(tiny(**SWITCHES["full"]))
    ids, docs = packed(LAYOUTS, model.config.vocab_size)
    with torch.no_grad():
        one_document = model(ids, document_ids=torch.zeros_like(docs))
        monkeypatch.setattr(documents_module.Documents, "__init__", lambda *a: pytest.fail("masks built"))
        plain = model(ids)
        masked = model(ids, labels=ids)
    torch.testing.assert_close(plain.logits, one_document.logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(plain.logits, masked.logits)
    # across documents the default path mixes them: the second document's logits differ from it alone
    assert not torch.allclose(plain.logits[:1, 9:22], model(ids[:1, 9:22]).logits, atol=1e-3)


def test_document_ids_from_end_of_text_tokens() -> None:
    tokens = torch.tensor([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 6]])
    assert document_ids(tokens, 0).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    docs = Documents(document_ids(tokens, 0))
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    labels = docs.labels(tokens, 1, IGNORE_INDEX)
    assert labels.tolist()[0] == [5, 6, 0, IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX]


def test_the_masks_of_some_queries_are_those_rows_of_the_whole_masks() -> None:
    """What a context-parallel rank takes (its tokens' global positions, in any order): the same rows as the whole
    window's attention mask and each MTP depth's mask and kept queries."""
    docs = Documents(packed(LAYOUTS, 8)[1])
    T = docs.shape[1]  # 30
    rows = torch.cat((torch.arange(0, 8), torch.arange(T - 8, T)))  # two chunks, as a cp rank holds them
    assert torch.equal(docs.mask, docs.rows_mask()) and docs.mask.shape == (2, 1, T, T)
    assert torch.equal(docs.rows_mask(rows), docs.mask[:, :, rows])
    for depth in (1, 2, 3, T):
        (mask, keep), (part, kept) = docs.mtp_mask(depth), docs.mtp_mask(depth, rows)
        assert torch.equal(part, mask[:, :, rows]) and torch.equal(kept, keep[:, rows]), depth


def test_convolution_restarts_at_each_document() -> None:
    torch.manual_seed(0)
    conv = CausalDSConv(8, 4)
    x = torch.randn(1, 11, 8)
    positions = Documents(torch.tensor([[0] * 3 + [1] * 6 + [2] * 2])).positions
    with torch.no_grad():
        joint = conv(x, doc_positions=positions)
        parts = torch.cat([conv(x[:, :3]), conv(x[:, 3:9]), conv(x[:, 9:])], dim=1)
    torch.testing.assert_close(joint, parts, atol=1e-6, rtol=1e-5)


def test_bad_document_ids_are_refused() -> None:
    model = build(tiny(**SWITCHES["full"]))
    ids, docs = packed(LAYOUTS, model.config.vocab_size)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(ids, document_ids=docs[:, :-1])
    with pytest.raises(ValueError, match="no cache and no attention_mask"):
        model(ids, document_ids=docs, attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids, document_ids=docs.float())
