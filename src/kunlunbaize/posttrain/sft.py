"""Supervised fine-tuning on chat data with TRL's ``SFTTrainer``: loss on the assistant tokens only.

Why TRL rather than the project's pre-training loop: SFT data are conversations, and TRL already renders them
with the chat template, masks everything but the assistant turns (``assistant_only_loss`` with the template's
``{% generation %}`` markers), batches, evaluates, checkpoints and runs under ``accelerate launch`` (DDP/FSDP);
the pre-training loop is built for packed token streams.

One change to TRL: its loss runs a fused LM head over the trunk only, so the MTP depths would get no gradient and
fall behind the fine-tuned trunk (self-speculative decoding would accept fewer drafts). :class:`KunlunSFTTrainer`
trains with the paper's joint loss instead (eq. 22: L_main + Σ_j γ_j L^j, every term on assistant tokens only),
unless ``mtp=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.loss import IGNORE_INDEX, shifted_cross_entropy
from .models import Log, plain_progress, save_model, trainer_settings


def _trainer_class():
    from trl import SFTTrainer

    class KunlunSFTTrainer(SFTTrainer):
        """``SFTTrainer`` whose loss is eq. 22 (main + γ-weighted MTP depths) when the model has MTP depths."""

        def __init__(self, *args: Any, mtp: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.mtp = mtp

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            core = self.accelerator.unwrap_model(model)
            if not self.mtp or getattr(core, "mtp", None) is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if model.training else "eval"
            labels = inputs["labels"]
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False,
                        mtp=True)
            logits, targets = out.logits[:, :-1].float(), labels[:, 1:]
            valid = targets != IGNORE_INDEX
            count = valid.sum() if num_items_in_batch is None else num_items_in_batch
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            main = nll / torch.as_tensor(count, device=nll.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                main = main * self.accelerator.num_processes  # as TRL: DDP averages the ranks' gradients
            mtp_terms = [shifted_cross_entropy(lg, labels, j + 1) for j, lg in enumerate(out.mtp_logits, start=1)]
            # The trainer divides the loss by the accumulation steps only when it was not normalised by
            # num_items_in_batch; the main term was, the depths' per-micro-batch means were not: divide them here.
            scaled = (self.loss_is_scaled_for_ga if getattr(self, "loss_is_scaled_for_ga", None) is not None
                      else self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            accumulation = self.current_gradient_accumulation_steps if scaled and model.training else 1
            loss = main + sum(g * t for g, t in zip(core.model.arch.gammas, mtp_terms, strict=True)) / accumulation
            with torch.no_grad():
                hits = (logits.argmax(-1) == targets) & valid
                n = self.accelerator.gather_for_metrics(valid.sum()).sum()
                self._metrics[mode]["mean_token_accuracy"].append(
                    (self.accelerator.gather_for_metrics(hits.sum()).sum() / n.clamp(min=1)).item())
                for j, t in enumerate(mtp_terms, start=1):
                    self._metrics[mode][f"mtp_loss_{j}"].append(self.accelerator.gather_for_metrics(t.detach()).mean()
                                                                .item())
                if mode == "train":
                    self._total_train_tokens += self.accelerator.gather_for_metrics(
                        inputs["attention_mask"].sum()).sum().item()
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, out) if return_outputs else loss

    return KunlunSFTTrainer


@dataclass
class SFTSettings:
    """What ``kunlun posttrain sft`` (and each rejection-sampling round) trains with."""

    epochs: float = 3.0
    lr: float = 1e-4
    batch_size: int = 16  # per device
    grad_accum: int = 1
    max_length: int | None = None  # None: the model's context
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    eval_fraction: float = 0.0  # > 0: hold out examples and report their loss each epoch
    mtp: bool = True  # keep the MTP depths trained (eq. 22); False: TRL's loss on the trunk only
    seed: int = 0
    device: str = "cpu"
    logging_steps: int = 10


def run_sft(folder: Path, examples: list[dict[str, Any]], out: Path, settings: SFTSettings, log: Log = print,
            callbacks: list[Callable] | None = None) -> dict[str, Any]:
    """Fine-tune the model of ``folder`` on ``examples`` (``{"messages": …}``) and save it at ``out/model``.

    Returns the trainer's final metrics (``train_loss``, ``eval_loss`` when examples were held out) and ``model``,
    the saved folder. Checkpoints go to ``out/trainer``."""
    from datasets import Dataset
    from trl import SFTConfig

    from .data import split_heldout
    from .models import load_policy

    model, tokenizer = load_policy(folder, settings.device, log)
    context = model.config.max_seq_len
    max_length = min(settings.max_length or context, context)
    check_lengths(tokenizer, examples, max_length)
    train, held = (split_heldout(examples, settings.eval_fraction, settings.seed) if settings.eval_fraction > 0
                   else (examples, []))
    args = SFTConfig(output_dir=str(out / "trainer"), num_train_epochs=settings.epochs, learning_rate=settings.lr,
                     per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=settings.batch_size,
                     gradient_accumulation_steps=settings.grad_accum, warmup_steps=settings.warmup_ratio,
                     weight_decay=settings.weight_decay, lr_scheduler_type="cosine", max_length=max_length,
                     assistant_only_loss=True, packing=False, padding_free=False,
                     logging_steps=settings.logging_steps, save_strategy="no",
                     eval_strategy="epoch" if held else "no", **trainer_settings(settings.device, settings.seed))
    trainer = _trainer_class()(model=model, args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(train),
                               eval_dataset=Dataset.from_list(held) if held else None, mtp=settings.mtp,
                               callbacks=callbacks)
    plain_progress(trainer, "sft")
    result = trainer.train()
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "examples": len(train),
               "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    if held:
        metrics.update({k: v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_mean_token_accuracy")})
    if trainer.is_world_process_zero():
        save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out / "model", log)
    trainer.accelerator.wait_for_everyone()
    metrics["model"] = str(out / "model")
    return metrics


def check_lengths(tokenizer: Any, examples: list[dict[str, Any]], max_length: int, source: str = "sft data") -> None:
    """A ValueError naming the first conversation longer than ``max_length`` tokens (TRL would cut it silently,
    perhaps removing the reply)."""
    for i, ex in enumerate(examples):
        n = len(tokenizer.apply_chat_template(ex["messages"], tokenize=True, return_dict=True)["input_ids"])
        if n > max_length:
            raise ValueError(f"{source}, record {i + 1}: the conversation takes {n} tokens with the chat format, more "
                             f"than the {max_length} the model takes; shorten it or leave it out")
