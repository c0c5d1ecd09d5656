"""Joint loss (eq. 22–23): hand-computed cross-entropies and the MTP target shift."""

import math

import pytest
import torch

from kunlunbaize import KunlunBaize
from kunlunbaize.model.loss import multi_token_loss

from .helpers import tiny


def hand_ce(logits, tokens, shift):
    """Mean over positions i with i + shift < T of −log softmax(logits[i])[tokens[i + shift]], by loops."""
    terms = []
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1] - shift):
            row = logits[b, i].tolist()
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            terms.append(lse - row[tokens[b, i + shift].item()])
    return sum(terms) / len(terms)


def test_joint_loss_matches_hand_computation():
    torch.manual_seed(0)
    B, T, V = 2, 6, 5
    tokens = torch.randint(0, V, (B, T))
    logits = torch.randn(B, T, V)
    mtp = [torch.randn(B, T, V), torch.randn(B, T, V)]
    terms = multi_token_loss(logits, mtp, tokens, gammas=(0.5, 0.25))
    main, l1, l2 = hand_ce(logits, tokens, 1), hand_ce(mtp[0], tokens, 2), hand_ce(mtp[1], tokens, 3)
    assert terms.main.item() == pytest.approx(main, rel=1e-6)
    assert [t.item() for t in terms.mtp] == pytest.approx([l1, l2], rel=1e-6)
    assert terms.total.item() == pytest.approx(main + 0.5 * l1 + 0.25 * l2, rel=1e-6)


def test_mtp_targets_are_the_right_shifted_tokens():
    # Logits that put all mass on token t_{i+j+1} give ~0 loss for depth j; one position off gives a big one.
    B, T, V, D = 1, 9, 11, 3
    tokens = torch.randint(0, V, (B, T))

    def oracle(shift):
        lg = torch.full((B, T, V), -30.0)
        for i in range(T - shift):
            lg[0, i, tokens[0, i + shift]] = 30.0
        return lg

    terms = multi_token_loss(oracle(1), [oracle(j + 1) for j in range(1, D + 1)], tokens, gammas=(1.0,) * D)
    assert terms.total.item() < 1e-6
    wrong = multi_token_loss(oracle(1), [oracle(j) for j in range(1, D + 1)], tokens, gammas=(1.0,) * D)
    assert all(t.item() > 1.0 for t in wrong.mtp[1:])


def test_model_loss_is_main_plus_weighted_depths_and_ignores_padding():
    cfg = tiny(mtp_depth=2, mtp_loss_weights=(0.7, 0.2))
    model = KunlunBaize(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(x, labels=x)
    assert out.loss.item() == pytest.approx(
        out.main_loss.item() + 0.7 * out.mtp_losses[0].item() + 0.2 * out.mtp_losses[1].item(), rel=1e-6)
    assert out.main_loss.item() == pytest.approx(hand_ce(out.logits.detach(), x, 1), rel=1e-5)
    assert out.mtp_losses[1].item() == pytest.approx(hand_ce(out.mtp_logits[1].detach(), x, 3), rel=1e-5)

    labels = x.clone()
    labels[:, 8:] = -100
    masked = model(x, labels=labels)
    assert masked.main_loss.item() == pytest.approx(hand_ce(out.logits[:, :7].detach(), x[:, :8], 1), rel=1e-5)
