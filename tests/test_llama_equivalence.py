"""All three switches off is a standard LLaMA decoder: same logits as transformers' LlamaForCausalLM."""

import pytest
import torch

from kunlunbaize import KunlunBaize

from .helpers import tiny

transformers = pytest.importorskip("transformers")


def test_all_off_equals_hf_llama():
    cfg = tiny(dense_residual=False, transformerx=False, mtp_depth=0, n_layers=2)
    ours = KunlunBaize(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.head.weight}
    for i, b in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": b.attn_norm.weight,
               p + "post_attention_layernorm.weight": b.mlp_norm.weight,
               p + "self_attn.q_proj.weight": b.attn.wq.weight, p + "self_attn.k_proj.weight": b.attn.wk.weight,
               p + "self_attn.v_proj.weight": b.attn.wv.weight, p + "self_attn.o_proj.weight": b.attn.wo.weight,
               p + "mlp.gate_proj.weight": b.mlp.gate.weight, p + "mlp.up_proj.weight": b.mlp.up.weight,
               p + "mlp.down_proj.weight": b.mlp.down.weight}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max() < 1e-5
