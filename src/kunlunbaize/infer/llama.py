"""The Llama baseline of ``kunlun train --arch llama`` at inference: its checkpoint as a transformers
``LlamaForCausalLM``, and cached generation from it with the same sampling, streaming and stop rules."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from .generate import GenerationResult, StopCallback, TokenCallback, decode_loop, fit_prompts, left_pad
from .load import LoadError, _read_safetensors, check_keys, checkpoint_arch, read_config, resolve_checkpoint
from .sampling import GREEDY, SamplingParams

TRAINING_PREFIX = "hf."  # weight names in a training checkpoint: the LlamaBaseline wrapper's attribute


def load_llama(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The ``LlamaForCausalLM`` of a Llama baseline checkpoint (or of its ``kunlun export --hf`` folder), in eval
    mode, and the checkpoint folder. Needs transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..train.llama_baseline import LLAMA_CONFIG_KEY, matched_llama_config, model_config_dict

    ckpt = resolve_checkpoint(path)
    raw = read_config(ckpt)
    if checkpoint_arch(ckpt, raw) != "llama":
        raise LoadError(f"{ckpt} is a KunlunBaize checkpoint, not a Llama baseline one — load it with "
                        "kunlunbaize.infer.load.load_model")
    try:
        if raw.get("model_type") == "llama":  # an export: a plain transformers folder
            config, prefix = LlamaConfig.from_dict(raw), ""
        elif LLAMA_CONFIG_KEY in raw:
            config, prefix = LlamaConfig.from_dict(raw[LLAMA_CONFIG_KEY]), TRAINING_PREFIX
        else:  # written before checkpoints recorded their LlamaConfig: rebuild it as training did
            config, prefix = matched_llama_config(ModelConfig.from_dict(model_config_dict(raw))), TRAINING_PREFIX
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise LoadError(f"{ckpt / 'config.json'} does not describe a Llama model ({e}) — use a checkpoint "
                        "written by `kunlun train --arch llama`") from None
    config._attn_implementation = "sdpa"
    state = {k.removeprefix(prefix): v for k, v in _read_safetensors(ckpt, "cpu").items()}
    model = LlamaForCausalLM(config)
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    check_keys(ckpt, model.state_dict().keys(), state.keys(), optional=tied)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise LoadError(f"the weights in {ckpt} do not match its config.json ({detail})") from None
    if tied:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval(), ckpt


@torch.inference_mode()
def generate_llama(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    eos_id: int | None = None,
    seed: int | None = None,
    truncate: bool = False,
    on_token: TokenCallback | None = None,
    should_stop: StopCallback | None = None,
) -> GenerationResult:
    """:func:`kunlunbaize.infer.generate` for a transformers causal LM (left-padded batch, key/value cache):
    same context fitting, sampling, callbacks and finish reasons."""
    model.eval()
    device = model.device
    prompts, max_new_tokens = fit_prompts(prompts, max_new_tokens, model.config.max_position_embeddings, truncate)
    pad = eos_id if eos_id is not None else 0
    ids, mask = left_pad(prompts, pad, device)
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: each row's first real token is position 0
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    state = {"cache": out.cache, "mask": mask, "pos": positions[:, -1:]}

    def step(feed: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(feed)], dim=-1)
        state["pos"] = state["pos"] + 1
        o = model(input_ids=feed, attention_mask=state["mask"], position_ids=state["pos"],
                  cache=state["cache"], use_cache=True)
        state["cache"] = o.cache
        return o.logits[:, -1]

    return decode_loop(out.logits[:, -1], step, max_new_tokens, sampling, eos_id, pad, gen, on_token, should_stop)
