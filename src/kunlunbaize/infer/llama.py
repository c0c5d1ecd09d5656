"""The Llama baseline of ``kunlun train --arch llama`` at inference: its checkpoint as a transformers
``LlamaForCausalLM``, and cached generation from it with the same sampling, streaming and stop rules."""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch.llama import LLAMA, LLAMA_CONFIG_KEY, WEIGHT_PREFIX, matched_llama_config, model_config_dict
from ..checkpoint import CheckpointError, check_keys, checkpoint_arch, read_config, read_weights, resolve_checkpoint
from ..config import ModelConfig
from ..model import DEFAULT_PREFILL_CHUNK, check_prefill_chunk
from .generate import GenerationResult, StopCallback, TokenCallback, decode_loop, fit_prompts, left_pad
from .generator import Generator
from .sampling import GREEDY, SamplingParams


def load_llama(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The ``LlamaForCausalLM`` of a Llama baseline checkpoint (or of its ``kunlun export --hf`` folder), in eval
    mode, and the checkpoint folder. Needs transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = resolve_checkpoint(path)
    raw = read_config(ckpt)
    if checkpoint_arch(ckpt, raw) is not LLAMA:
        raise CheckpointError(f"{ckpt} is a KunlunBaize checkpoint, not a Llama baseline one — load it with "
                              "kunlunbaize.infer.load.load_model")
    try:
        if raw.get("model_type") == LLAMA.hf_model_type:  # an export: a plain transformers folder
            config, prefix = LlamaConfig.from_dict(raw), ""
        elif LLAMA_CONFIG_KEY in raw:
            config, prefix = LlamaConfig.from_dict(raw[LLAMA_CONFIG_KEY]), WEIGHT_PREFIX
        else:  # written before checkpoints recorded their LlamaConfig: rebuild it as training did
            config, prefix = matched_llama_config(ModelConfig.from_dict(model_config_dict(raw))), WEIGHT_PREFIX
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'} does not describe a Llama model ({e}) — use a checkpoint "
                              f"written by `kunlun train --arch {LLAMA.name}`") from None
    config._attn_implementation = "sdpa"
    state = {k.removeprefix(prefix): v for k, v in read_weights(ckpt, "cpu").items()}
    model = LlamaForCausalLM(config)
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    check_keys(ckpt, model.state_dict().keys(), state.keys(), optional=tied)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(f"the weights in {ckpt} do not match its config.json ({detail})") from None
    if tied:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval(), ckpt


def llama_generator(ckpt: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Generator:
    """The :class:`Generator` of a Llama baseline checkpoint or export (the spec's ``generator`` hook); a
    CheckpointError that says what to install when transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"{ckpt} is a Llama baseline checkpoint, which needs transformers ({e}) — "
                              "pip install 'kunlunbaize[hf]'") from None
    model, ckpt = load_llama(ckpt, device, dtype)
    return Generator(model, ckpt, LLAMA, generate_llama, int(model.config.max_position_embeddings),
                     int(model.config.vocab_size), 0)


def llama_prefill(model, ids: torch.Tensor, mask: torch.Tensor | None = None,
                  chunk: int | None = DEFAULT_PREFILL_CHUNK, keep: int | None = 1):
    """Feed ``ids`` [B, T] (left-padded as ``mask`` [B, T] says; None: no padding) through a transformers causal
    LM's key/value cache ``chunk`` tokens at a time (None: in one forward), as
    :func:`kunlunbaize.model.prefill` does for KunlunBaize. Returns the final (normed) hidden states of the last
    ``keep`` positions (None: all), the cache and the mask; the logits are ``model.lm_head(hidden)``."""
    check_prefill_chunk(chunk)
    T = ids.shape[1]
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: each row's first real token is position 0
    step, first_kept = chunk or T, 0 if keep is None else max(0, T - keep)
    cache, kept = None, []
    for a in range(0, T, step):
        b = min(T, a + step)
        out = model.model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], position_ids=positions[:, a:b],
                          cache=cache, use_cache=True)
        cache = out.cache
        if b > first_kept:
            kept.append(out.last_hidden_state[:, max(0, first_kept - a):])
    return torch.cat(kept, 1), cache, mask


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
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> GenerationResult:
    """:func:`kunlunbaize.infer.generate` for a transformers causal LM (left-padded batch, key/value cache):
    same context fitting, sampling, callbacks, finish reasons and chunked prefill."""
    check_prefill_chunk(prefill_chunk)
    model.eval()
    device = model.device
    prompts, max_new_tokens = fit_prompts(prompts, max_new_tokens, model.config.max_position_embeddings, truncate)
    pad = eos_id if eos_id is not None else 0
    ids, mask = left_pad(prompts, pad, device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    hidden, cache, mask = llama_prefill(model, ids, mask, prefill_chunk)
    state = {"cache": cache, "mask": mask, "pos": mask.sum(-1, keepdim=True) - 1}

    def step(feed: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(feed)], dim=-1)
        state["pos"] = state["pos"] + 1
        o = model(input_ids=feed, attention_mask=state["mask"], position_ids=state["pos"],
                  cache=state["cache"], use_cache=True)
        state["cache"] = o.cache
        return o.logits[:, -1]

    return decode_loop(model.lm_head(hidden)[:, -1], step, max_new_tokens, sampling, eos_id, pad, gen, on_token,
                       should_stop, prompts)
