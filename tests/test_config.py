import pytest
import torch

from kunlunbaize import PRESETS, KunlunBaize, ModelConfig


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(d_model=30, n_heads=4), "n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(conv_kernel_sizes=(3, 0)), "conv_kernel_sizes"),
        (dict(conv_kernel_sizes=()), "conv_kernel_sizes"),
        (dict(mtp_depth=2, mtp_loss_weights=(0.1,)), "mtp_loss_weights"),
        (dict(mtp_depth=1, mtp_loss_weights=(-1.0,)), "mtp_loss_weights"),
        (dict(mtp_depth=-1), "mtp_depth"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layers=2.5), "n_layers"),
        (dict(dense_residual="yes"), "dense_residual"),
        (dict(init_std=0.0), "init_std"),
        (dict(norm_eps=float("nan")), "norm_eps"),
        (dict(scale_ffn_hidden=0), "scale_ffn_hidden"),
        (dict(d_model=12, n_heads=4), "n_heads"),  # odd head_dim: no rotary
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        ModelConfig.preset("tiny", **overrides)


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="no field 'd_modle'"):
        ModelConfig.preset("tiny", d_modle=3)


def test_dict_round_trip():
    cfg = ModelConfig.preset("small", mtp_depth=3, mtp_loss_weights=(0.1, 0.2, 0.3))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.gammas == (0.1, 0.2, 0.3)


def test_default_mtp_weights():
    assert ModelConfig.preset("tiny", mtp_depth=3).gammas == pytest.approx((0.1, 0.1, 0.1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_on_meta_with_exact_count(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = KunlunBaize(cfg)
    assert model.num_params() == cfg.num_params()
    assert cfg.flops_per_token(training=True) == pytest.approx(3 * cfg.flops_per_token())


def test_paper_preset_shape_and_size():
    cfg = ModelConfig.preset("paper")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.mtp_depth, cfg.init_std) == (
        126, 16384, 128, 128256, 6, 0.006)
    # With every switch off the preset is LLaMA-3.1-405B: 405,853,388,800 parameters.
    llama = ModelConfig.preset("paper", dense_residual=False, transformerx=False, mtp_depth=0)
    assert llama.num_params() == 405_853_388_800
    assert abs(cfg.num_params() - 450e9) / 450e9 < 0.01  # the paper's stated total


def test_flops_match_six_n_rule_for_plain_model():
    # For a plain decoder the matmul part must be 6 × (non-embedding params + head) per training token.
    cfg = ModelConfig.preset("125m", transformerx=False, dense_residual=False, mtp_depth=0)
    pb = cfg.param_breakdown()
    norms = cfg.d_model * (2 * cfg.n_layers)
    matmul_params = pb["blocks"] - norms + pb["head"]
    attn = cfg.n_layers * 4 * cfg.d_model * (cfg.max_seq_len + 1) / 2
    assert cfg.flops_per_token(training=True) == pytest.approx(3 * (2 * matmul_params + attn))
