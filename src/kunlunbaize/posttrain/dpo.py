"""Offline preference optimisation (§4): TRL's ``DPOTrainer`` with the paper's settings and early stopping.

Defaults are the paper's: learning rate 1e-5 and a global batch of 256 pairs (per-device batch × gradient
accumulation × ranks; the accumulation is derived). A frozen reference model is either loaded beside the policy
(``reference="model"``, the default) or replaced by log-probabilities computed once before training
(``reference="precompute"``: half the memory). A share of the pairs is held out; the trainer evaluates every
``eval_steps`` optimiser steps, stops when the held-out metric (reward accuracy by default, or the loss) has not
improved for ``patience`` evaluations, and restores the best checkpoint before saving.

TRL computes the DPO loss through its fused LM head on the trunk, so the MTP depths get no gradient: they keep their
SFT state (docs/guide-posttrain.md#mtp-depths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import split_heldout
from .models import Log, load_policy, plain_progress, save_model, trainer_settings
from .sample import rank_and_world

METRICS = ("rewards/accuracies", "rewards/margins", "loss")


@dataclass
class DPOSettings:
    beta: float = 0.1
    lr: float = 1e-5  # the paper's
    batch_size: int = 256  # global: per_device_batch_size x accumulation x ranks (the paper's)
    per_device_batch_size: int = 8
    epochs: float = 1.0  # at most; early stopping may end sooner
    eval_fraction: float = 0.1
    eval_steps: int = 10
    patience: int = 3
    metric: str = "rewards/accuracies"
    reference: str = "model"  # "model" (a frozen copy) or "precompute" (log-probs computed once)
    loss_type: str = "sigmoid"
    max_length: int | None = None  # None: the model's context
    seed: int = 0
    device: str = "cpu"
    logging_steps: int = 5

    def accumulation(self, world: int) -> int:
        """Gradient-accumulation steps that make the global batch ``batch_size`` on ``world`` ranks."""
        per_step = self.per_device_batch_size * world
        if self.batch_size % per_step:
            raise ValueError(f"the global batch {self.batch_size} is not a multiple of per-device batch "
                             f"{self.per_device_batch_size} x {world} rank(s); change --batch-size or "
                             "--per-device-batch-size")
        return self.batch_size // per_step

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown early-stopping metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.reference not in ("model", "precompute"):
            raise ValueError(f"reference must be 'model' or 'precompute', not {self.reference!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1) to hold out pairs for early stopping, got "
                             f"{self.eval_fraction}")
        if self.beta <= 0 or not math.isfinite(self.beta):
            raise ValueError(f"beta must be a positive number, got {self.beta}")


def check_pair_lengths(tokenizer: Any, pairs: list[dict[str, Any]], max_length: int, source: str = "pairs") -> None:
    """A ValueError naming the first pair whose prompt + reply exceeds ``max_length`` tokens (TRL would cut it)."""
    for i, p in enumerate(pairs):
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=True, return_dict=True)["input_ids"]
            if len(ids) > max_length:
                raise ValueError(f"{source}, record {i + 1}: prompt + {side} take {len(ids)} tokens with the chat "
                                 f"format, more than the {max_length} the model takes; shorten or drop the pair")


def run_dpo(folder: Path, pairs: list[dict[str, Any]], out: Path, settings: DPOSettings, log: Log = print,
            heldout: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """DPO from the model of ``folder`` on preference ``pairs`` (conversational); the best model by the held-out
    metric is saved at ``out/model``. ``heldout`` pairs, when given, are the validation set (else a share of
    ``pairs``). Returns the held-out metrics of that model, the step it came from, whether training stopped early,
    the training log and ``model``."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import DPOConfig, DPOTrainer

    settings.validate()
    _, world = rank_and_world()
    model, tokenizer = load_policy(folder, settings.device, log)
    ref = None
    if settings.reference == "model":
        ref, _ = load_policy(folder, settings.device, log=lambda _: None)
        ref.eval().requires_grad_(False)
    context = model.config.max_seq_len
    max_length = min(settings.max_length or context, context)
    check_pair_lengths(tokenizer, pairs + (heldout or []), max_length)
    train, held = (pairs, heldout) if heldout else split_heldout(pairs, settings.eval_fraction, settings.seed)
    accumulation = settings.accumulation(world)
    args = DPOConfig(output_dir=str(out / "trainer"), learning_rate=settings.lr, beta=settings.beta,
                     loss_type=[settings.loss_type], per_device_train_batch_size=settings.per_device_batch_size,
                     per_device_eval_batch_size=settings.per_device_batch_size,
                     gradient_accumulation_steps=accumulation, num_train_epochs=settings.epochs,
                     max_length=max_length, precompute_ref_log_probs=settings.reference == "precompute",
                     eval_strategy="steps", eval_steps=settings.eval_steps, save_strategy="steps",
                     save_steps=settings.eval_steps, save_total_limit=2, load_best_model_at_end=True,
                     metric_for_best_model=settings.metric, greater_is_better=settings.metric != "loss",
                     logging_steps=settings.logging_steps, lr_scheduler_type="linear", warmup_steps=0.1,
                     **trainer_settings(settings.device, settings.seed))
    stopper = EarlyStoppingCallback(early_stopping_patience=settings.patience)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(held),
                         callbacks=[stopper])
    plain_progress(trainer, "dpo")
    result = trainer.train()
    final = trainer.evaluate()  # the restored best model
    state = trainer.state
    metrics = {k.removeprefix("eval_"): v for k, v in final.items()
               if k.startswith("eval_") and ("rewards/" in k or k == "eval_loss")}
    metrics.update({"train_loss": result.training_loss, "steps": state.global_step,
                    "best_step": _best_step(state), "best_metric": state.best_metric, "metric": settings.metric,
                    "stopped_early": stopper.early_stopping_patience_counter >= settings.patience,
                    "pairs": len(train), "heldout_pairs": len(held), "accumulation": accumulation,
                    "log": trainer.state.log_history})
    if trainer.is_world_process_zero():
        save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out / "model", log)
    trainer.accelerator.wait_for_everyone()
    metrics["model"] = str(out / "model")
    return metrics


def _best_step(state: Any) -> int | None:
    """The global step of the best checkpoint (from its folder name ``checkpoint-N``)."""
    path = state.best_model_checkpoint
    if not path:
        return None
    try:
        return int(Path(path).name.rsplit("-", 1)[-1])
    except ValueError:
        return None
