"""RoPE scaling: the same frequencies and attention factors as transformers for every type, the same logits as
transformers' Llama (one-shot and cached, past the original context), export round trips, and clear errors."""

from __future__ import annotations

import pytest
import torch

from kunlunbaize import KunlunBaize, ModelConfig
from kunlunbaize.model.layers import RotaryEmbedding

from .helpers import tiny

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

ORIGINAL = 64
SCALINGS = [
    ("linear", {}), ("dynamic", {}), ("yarn", {}),
    ("yarn", {"beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5}),
    ("yarn", {"attention_factor": 0.9, "truncate": False}), ("llama3", {}),
    ("llama3", {"low_freq_factor": 2.0, "high_freq_factor": 8.0}),
]


def scaling(kind: str, factor: float, **extra) -> dict:
    return {"rope_type": kind, "factor": factor, "original_max_position_embeddings": ORIGINAL, **extra}


def hf_llama_config(cfg: ModelConfig, **kw):
    """transformers' LlamaConfig of ``cfg``'s shapes and RoPE (dynamic NTK: its threshold is
    max_position_embeddings, so that is the original context)."""
    params = dict(cfg.rope_parameters)
    kind = params["rope_type"]
    if kind in ("linear", "dynamic"):
        params.pop("original_max_position_embeddings")
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=ORIGINAL if kind == "dynamic" else cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters=params, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, **kw)


@pytest.mark.parametrize("kind,extra", SCALINGS, ids=lambda v: v if isinstance(v, str) else "-".join(v))
@pytest.mark.parametrize("factor", [2.0, 3.5, 16.0])
@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 500000.0)])
def test_frequencies_and_attention_factor_equal_transformers(kind, extra, factor, head_dim, theta):
    cfg = ModelConfig(d_model=4 * head_dim, n_heads=4, n_kv_heads=2, max_seq_len=ORIGINAL * 16, rope_theta=theta,
                      rope_scaling=scaling(kind, factor, **extra))
    hf = hf_llama_config(cfg)
    want, attention = ROPE_INIT_FUNCTIONS[kind](hf, None)
    rope = RotaryEmbedding(head_dim, theta, cfg.rope_scaling)
    assert torch.equal(rope.inv_freq, want)
    assert rope.attention_factor == attention
    if kind == "yarn" and "attention_factor" not in extra:
        assert attention > 1  # YaRN's mscale is in play
    for length in (ORIGINAL // 2, ORIGINAL, ORIGINAL + 1, 5 * ORIGINAL, 16 * ORIGINAL):
        positions = torch.arange(length)
        inv = want
        if kind == "dynamic" and length > ORIGINAL:  # transformers recomputes for the sequence length
            inv, _ = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=torch.tensor(length))
            assert not torch.equal(inv, want)
        emb = torch.cat([positions.float()[:, None] * inv] * 2, dim=-1)
        cos, sin = rope(positions)
        assert torch.equal(cos, emb.cos() * attention) and torch.equal(sin, emb.sin() * attention)


@pytest.mark.parametrize("value,message", [
    ({"rope_type": "ntk-by-parts", "factor": 4.0}, "unknown RoPE scaling type 'ntk-by-parts'; choose one of"),
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64}, "must be a number > 1"),
    ({"rope_type": "linear", "factor": 0.5}, "must be a number > 1"),
    ({"rope_type": "yarn", "factor": 4.0}, "needs original_max_position_embeddings"),
    ({"rope_type": "dynamic", "factor": 4.0}, "needs original_max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 64, "low_freq_factor": 4,
      "high_freq_factor": 1}, "high_freq_factor 1 must be greater than low_freq_factor 4"),
    ({"rope_type": "linear", "factor": 4.0, "beta_fast": 3}, "has no setting beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "exceeds max_seq_len 256"),
    ("yarn", "must be None (plain RoPE) or a dict"),
])
def test_bad_scaling_is_one_clear_line(value, message):
    with pytest.raises(ValueError, match=r"ModelConfig\.rope_scaling") as e:
        ModelConfig(max_seq_len=256, rope_scaling=value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_configs_without_scaling_still_load_and_default_means_none():
    old = ModelConfig().to_dict()
    del old["rope_scaling"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(old).rope_scaling is None
    assert ModelConfig(rope_scaling={"rope_type": "default"}).rope_scaling is None
    cfg = ModelConfig(max_seq_len=512, rope_scaling=scaling("llama3", 8.0))
    assert cfg.rope_scaling["low_freq_factor"] == 1.0 and cfg.rope_scaling["high_freq_factor"] == 4.0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.rope_parameters == {"rope_theta": cfg.rope_theta, **cfg.rope_scaling}


def _copy_into_llama(ours: KunlunBaize, hf) -> None:
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.head.weight}
    for i, b in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": b.attn_norm.weight, p + "post_attention_layernorm.weight":
               b.mlp_norm.weight, **{p + f"self_attn.{n}_proj.weight": getattr(b.attn, f"w{n}").weight for n in "qkvo"},
               **{p + f"mlp.{n}_proj.weight": getattr(b.mlp, n).weight for n in ("gate", "up", "down")}}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
@torch.no_grad()
def test_plain_decoder_equals_hf_llama_past_the_original_context(kind):
    """One-shot logits, and cached decoding token by token (dynamic NTK: each forward at its own length, keys
    cached with the frequencies of the forward that wrote them — what transformers' Llama does)."""
    torch.manual_seed(0)
    cfg = tiny(dense_residual=False, transformerx=False, mtp_depth=0, n_layers=2, max_seq_len=4 * ORIGINAL,
               rope_scaling=scaling(kind, 4.0))
    ours = KunlunBaize(cfg).eval()
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()
    _copy_into_llama(ours, hf)
    x = torch.randint(0, cfg.vocab_size, (2, 3 * ORIGINAL))
    assert (ours(x).logits - hf(x).logits).abs().max() < 1e-5
    prompt = ORIGINAL - 2  # decoding crosses the original context
    cache = ours.new_cache(2)
    got = [ours(x[:, :prompt], cache=cache).logits[:, -1]]
    got += [ours(x[:, t:t + 1], cache=cache).logits[:, -1] for t in range(prompt, prompt + 6)]
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()  # fresh: its dynamic state starts over
    _copy_into_llama(ours, hf)
    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else (
        "past_key_values")  # renamed after transformers 5.0
    out = hf(x[:, :prompt], use_cache=True)
    want = [out.logits[:, -1]]
    for t in range(prompt, prompt + 6):
        out = hf(x[:, t:t + 1], **{field: getattr(out, field)}, use_cache=True)
        want.append(out.logits[:, -1])
    assert max((g - w).abs().max() for g, w in zip(got, want, strict=True)) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
@torch.no_grad()
def test_full_model_loss_paths_and_cache_agree_under_scaling(kind):
    """The fused-loss path binds the MTP depths to the forward's length as the logits path does; with a static
    scaling, cached decoding equals one forward past the original context."""
    torch.manual_seed(0)
    cfg = tiny(max_seq_len=2 * ORIGINAL, rope_scaling=scaling(kind, 2.0))
    model = KunlunBaize(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, ORIGINAL + 20))
    full = model(x, labels=x)
    fused = model(x, labels=x, logits=False)
    assert torch.allclose(full.loss, fused.loss, atol=1e-5)
    if kind == "dynamic":
        return  # cached keys keep the frequencies of the forward that wrote them (as transformers)
    cache = model.new_cache(2)
    model(x[:, :ORIGINAL - 3], cache=cache)
    step = model(x[:, ORIGINAL - 3:], cache=cache)
    assert torch.allclose(step.logits, full.logits[:, ORIGINAL - 3:], atol=1e-5)
    for a, b in zip(step.mtp_logits, full.mtp_logits, strict=True):
        assert torch.allclose(a, b[:, ORIGINAL - 3:], atol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_hf_export_round_trip_past_the_original_context(kind, tmp_path):
    """KunlunBaizeForCausalLM's config.json carries rope_parameters; AutoModelForCausalLM gives our logits."""
    from kunlunbaize.hf import KunlunBaizeForCausalLM

    torch.manual_seed(0)
    cfg = tiny(max_seq_len=4 * ORIGINAL, rope_scaling=scaling(kind, 4.0))
    ours = KunlunBaize(cfg).eval()
    KunlunBaizeForCausalLM.from_kunlunbaize(ours).save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.rope_parameters == {"rope_theta": cfg.rope_theta, **cfg.rope_scaling}
    assert back.config.to_model_config() == cfg
    x = torch.randint(0, cfg.vocab_size, (1, 3 * ORIGINAL))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ours(x).logits)


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_llama_arch_carries_the_scaling_both_ways(kind):
    from kunlunbaize.arch.llama import as_kunlunbaize, matched_llama_config

    cfg = tiny(dense_residual=False, transformerx=False, mtp_depth=0, max_seq_len=4 * ORIGINAL,
               rope_scaling=scaling(kind, 4.0))
    llama = matched_llama_config(cfg)
    assert llama.rope_parameters["rope_type"] == kind and llama.rope_parameters["factor"] == 4.0
    back, _ = as_kunlunbaize({**llama.to_dict(), "model_type": "llama"}, {})
    want = cfg.rope_scaling if kind != "linear" else {"rope_type": "linear", "factor": 4.0}
    assert back.rope_scaling == want and back.rope_theta == cfg.rope_theta


def test_llama_arch_refuses_dynamic_ntk():
    from kunlunbaize.arch.llama import matched_llama_config

    with pytest.raises(ValueError, match="cannot use dynamic NTK"):
        matched_llama_config(tiny(max_seq_len=4 * ORIGINAL, rope_scaling=scaling("dynamic", 4.0)))
