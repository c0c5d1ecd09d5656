"""The Llama baseline's training module: ``LlamaForCausalLM`` behind KunlunBaize's forward signature."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model import ModelOutput
from .llama import matched_llama_config


class LlamaBaseline(nn.Module):
    """``LlamaForCausalLM`` behind KunlunBaize's forward signature, so one training loop runs both."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.hf_config = matched_llama_config(cfg)
        self.hf_config._attn_implementation = "sdpa"
        self.hf = LlamaForCausalLM(self.hf_config)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.hf.model.layers)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_activation_checkpointing(self, on: bool) -> None:
        # transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
        if hasattr(self.hf, "activation_checkpointing_enable"):
            if on:
                self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.hf.activation_checkpointing_disable()
        elif on:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.hf.gradient_checkpointing_disable()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        out = self.hf(input_ids=input_ids, labels=labels, use_cache=False)
        return ModelOutput(logits=out.logits, loss=out.loss, main_loss=out.loss)
