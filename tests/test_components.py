"""Defining properties of LDRSCM, eSwish and the ablation switches' parameter ownership."""

import pytest
import torch
import torch.nn.functional as F

from kunlunbaize import KunlunBaize
from kunlunbaize.model.layers import CausalDSConv, ESwish

from .helpers import tiny


def test_dense_residual_weights_uniform_at_init_and_learn():
    cfg = tiny(n_layers=4)
    model = KunlunBaize(cfg)
    W = model.dense_residual_weights()
    assert W.shape == (4, 4)
    for layer in range(4):
        assert torch.allclose(W[layer, : layer + 1], torch.full((layer + 1,), 1.0 / (layer + 1)))
        assert torch.all(W[layer, layer + 1:] == 0)
    assert torch.allclose(W.sum(1), torch.ones(4))

    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model(x, labels=x).loss.backward()
    for layer, p in enumerate(model.dense.logits):
        assert p.grad is not None
        if layer > 0:  # a single logit has zero softmax gradient by construction
            assert p.grad.abs().sum() > 0

    with torch.no_grad():
        for p in model.dense.logits:
            p.copy_(torch.randn_like(p) * 3)
    W = model.dense_residual_weights()
    assert torch.allclose(W.sum(1), torch.ones(4), atol=1e-6)
    assert torch.all(W >= 0)


def test_dense_residual_first_layer_is_identity_skip():
    # Layer 0 mixes only H_0 with weight 1: the same as an identity skip, so the layer-0 outputs agree.
    cfg_on, cfg_off = tiny(n_layers=1, mtp_depth=0), tiny(n_layers=1, mtp_depth=0, dense_residual=False)
    torch.manual_seed(0)
    on = KunlunBaize(cfg_on)
    off = KunlunBaize(cfg_off)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("dense.")})
    x = torch.randint(0, cfg_on.vocab_size, (1, 9))
    assert torch.allclose(on(x).logits, off(x).logits, atol=1e-6)


def test_eswish_is_silu_at_beta_one_and_learns_beta():
    x = torch.randn(4, 10, 16)
    for per_channel in (False, True):
        act = ESwish(16, per_channel)
        assert act.beta.shape == ((16,) if per_channel else (1,))
        assert torch.allclose(act(x), F.silu(x), atol=1e-7)
        act(x).pow(2).sum().backward()
        assert act.beta.grad is not None and act.beta.grad.abs().sum() > 0
    act = ESwish(1)
    with torch.no_grad():
        act.beta.fill_(2.0)
    assert torch.allclose(act(x), x * torch.sigmoid(2 * x))


def test_causal_conv_reads_only_the_past():
    conv = CausalDSConv(8, kernel_size=4)
    x = torch.randn(1, 12, 8)
    y = conv(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2 = conv(x2)
    assert torch.equal(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:10], y2[:, 6:10])  # positions 6 … 9 see input 6 (kernel 4)
    assert torch.allclose(y[:, 10:], y2[:, 10:])  # … and 10+ no longer do


@pytest.mark.parametrize("new_tokens", [1, 3, 8])
def test_direct_short_convolution_equals_the_library_convolution(new_tokens, monkeypatch):
    """The decoding path (unfolded windows, a few new tokens after a history) computes eq. 6 as Conv1d does,
    values and gradients."""
    import kunlunbaize.model.layers as layers

    torch.manual_seed(0)
    conv = CausalDSConv(16, kernel_size=5)
    x = torch.randn(2, new_tokens, 16, requires_grad=True)
    history = torch.randn(2, 9, 16)
    direct = conv(x, history)
    (gd,) = torch.autograd.grad(direct.square().sum(), x)
    monkeypatch.setattr(layers, "DIRECT_CONV_MAX_TOKENS", 0)
    library = conv(x, history)
    (gl,) = torch.autograd.grad(library.square().sum(), x)
    assert torch.allclose(direct, library, atol=1e-6)
    assert torch.allclose(gd, gl, atol=1e-5)
    monkeypatch.setattr(layers, "DIRECT_CONV_MAX_TOKENS", 8)
    zeros_before = torch.cat((torch.zeros(2, 4, 16), x[:, :1]), 1)  # no history reads as zeros
    assert torch.allclose(conv(x[:, :1], None), conv(zeros_before)[:, -1:], atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 16), (1, 1, 16), (1, 3, 16), (2, 4, 16), (8, 16), (3, 5, 16)])
def test_small_row_linear_is_f_linear_and_streams_the_weight(shape):
    """``linear`` equals ``F.linear`` (values and gradients) at every row count, and from 2 to ``SMALL_ROWS`` rows
    on a CPU it multiplies ``weight @ x.T``: the weight is the product's first operand (one row: ``F.linear``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kunlunbaize.model.layers import SMALL_ROWS, Linear

    class FirstOperands(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                seen.append(tuple(args[-2].shape))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = Linear(16, 24, bias=False)
    x = torch.randn(*shape, requires_grad=True)
    seen: list[tuple[int, ...]] = []
    with FirstOperands():
        y = layer(x)
    ref = F.linear(x, layer.weight)
    assert y.shape == ref.shape and y.is_contiguous()
    assert torch.allclose(y, ref, atol=1e-6)
    g = torch.randn_like(ref)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(torch.autograd.grad(y, (x, layer.weight), g),
                                                                torch.autograd.grad(ref, (x, layer.weight), g),
                                                                strict=True))
    rows = x.numel() // 16
    assert seen == ([(24, 16)] if 1 < rows <= SMALL_ROWS else [(rows, 16)])
    with pytest.raises(ValueError, match="no bias"):
        Linear(16, 24)(x)


def _names(model):
    return {n: p.numel() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("switch", "off_value", "owned"), [
    ("dense_residual", False, lambda n: n.startswith("dense.")),
    ("mtp_depth", 0, lambda n: n.startswith("mtp.")),
])
def test_switch_removes_exactly_its_parameters(switch, off_value, owned):
    cfg = tiny()
    full = _names(KunlunBaize(cfg))
    ablated = _names(KunlunBaize(tiny(**{switch: off_value})))
    removed = {n: c for n, c in full.items() if n not in ablated}
    assert removed and all(owned(n) for n in removed)
    assert {n: c for n, c in full.items() if n in ablated} == ablated  # nothing else changed
    assert sum(full.values()) - sum(ablated.values()) == sum(removed.values())
    if switch == "dense_residual":
        assert sum(removed.values()) == cfg.n_layers * (cfg.n_layers + 1) // 2
    else:
        d, V = cfg.d_model, cfg.vocab_size
        assert sum(removed.values()) == cfg.mtp_depth * (3 * d + 2 * d * d + 2 * d * cfg.kv_dim + V * d)


def test_transformerx_switch_swaps_only_block_internals():
    cfg = tiny()
    full, plain = _names(KunlunBaize(cfg)), _names(KunlunBaize(tiny(transformerx=False)))
    outside = [n for n in full if not n.startswith("blocks.")]
    assert all(full[n] == plain[n] for n in outside)
    tx_only = {n for n in full if n not in plain}
    assert all(n.startswith("blocks.") for n in tx_only)
    assert any(".convs." in n for n in tx_only) and any(".cross_attns." in n for n in tx_only)
    assert sum(n.endswith("beta") for n in full) == cfg.n_layers * 2 * cfg.n_scales  # conv + MLP gates
    assert not any(n.endswith("beta") for n in plain)  # plain Swish has no β
    assert sum(full.values()) - sum(plain.values()) == cfg.n_layers * (
        cfg.param_breakdown()["blocks"] // cfg.n_layers
        - (2 * cfg.d_model + 2 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.kv_dim + 3 * cfg.d_model * cfg.ffn_hidden))


def test_bad_inputs_are_rejected():
    cfg = tiny()
    model = KunlunBaize(cfg)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[0, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="exceed the context"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(3))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))


def test_identity_dense_init_starts_as_a_plain_residual():
    """dense_init="identity": every layer puts weight 0.95 on its latest output, the rest spread evenly — close to
    H_{l+1} = F_l(H_l) + H_l; reset_parameters, the HF class and the config keep it; "uniform" is the paper's."""
    cfg = tiny(n_layers=5, dense_init="identity")
    model = KunlunBaize(cfg)
    W = model.dense_residual_weights()
    for layer in range(5):
        assert W[layer, layer] == pytest.approx(1.0 if layer == 0 else 0.95, abs=1e-6)
        if layer:
            assert torch.allclose(W[layer, :layer], torch.full((layer,), 0.05 / layer), atol=1e-6)
    with torch.no_grad():
        for p in model.dense.logits:
            p.zero_()
    model.reset_parameters()
    assert torch.allclose(model.dense_residual_weights(), W)
    assert KunlunBaize(tiny(n_layers=5)).dense_residual_weights()[4, 0] == pytest.approx(0.2)  # uniform
    pytest.importorskip("transformers")
    from kunlunbaize.hf import KunlunBaizeConfig, KunlunBaizeForCausalLM

    hf = KunlunBaizeForCausalLM(KunlunBaizeConfig.from_model_config(cfg))
    assert torch.allclose(hf.model.dense.weight_matrix(), W)
    with pytest.raises(ValueError, match="dense_init"):
        tiny(dense_init="diagonal")


def test_eswish_beta_init_is_configurable():
    cfg = tiny(eswish_beta_init=2.5, eswish_per_channel=True)
    model = KunlunBaize(cfg)
    betas = [m.beta for m in model.modules() if isinstance(m, ESwish)]
    assert betas and all(torch.all(b == 2.5) for b in betas)
    x = torch.randn(3, 8)
    assert torch.allclose(ESwish(8, beta_init=2.5)(x), x * torch.sigmoid(2.5 * x))
    with pytest.raises(ValueError, match="eswish_beta_init"):
        tiny(eswish_beta_init=float("nan"))


def test_fan_in_conv_init_keeps_the_feature_scale():
    """conv_init="fan_in": depthwise ~ N(0, 1/k) and pointwise ~ N(0, 1/d) variance, so the conv features start at
    their input's scale; "normal" (the paper: N(0, init_std)) leaves them at a few percent of it. Other weights
    keep init_std; the HF class initialises the same way."""
    import math

    torch.manual_seed(0)
    cfg = tiny(d_model=64, conv_kernel_sizes=(3, 15), conv_init="fan_in")
    model = KunlunBaize(cfg)
    conv = [m for m in model.modules() if isinstance(m, CausalDSConv)]
    assert len(conv) == 2 * cfg.n_layers
    for c in conv:
        assert c.depthwise.weight.std().item() == pytest.approx(1 / math.sqrt(c.kernel_size), rel=0.2)
        assert c.pointwise.weight.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.1)
    assert model.blocks[0].attn.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    x = torch.randn(4, 64, 64)
    paper = CausalDSConv(64, 15)
    for p in paper.parameters():
        torch.nn.init.normal_(p, std=0.02)
    assert paper(x).pow(2).mean().sqrt() < 0.05 < conv[1](x).pow(2).mean().sqrt()
    pytest.importorskip("transformers")
    from kunlunbaize.hf import KunlunBaizeConfig, KunlunBaizeForCausalLM

    hf = KunlunBaizeForCausalLM(KunlunBaizeConfig.from_model_config(cfg))
    dw = [m.depthwise.weight.std().item() for m in hf.modules() if isinstance(m, CausalDSConv)]
    assert dw[1] == pytest.approx(1 / math.sqrt(15), rel=0.2)
    with pytest.raises(ValueError, match="conv_init"):
        tiny(conv_init="kaiming")
