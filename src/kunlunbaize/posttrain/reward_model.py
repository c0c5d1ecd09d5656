"""The learned "narrative" reward model (§4): a KunlunBaize backbone with a scalar head, trained on preference
pairs with TRL's ``RewardTrainer`` (Bradley–Terry loss), and used as a reward function.

The backbone starts from a causal-LM folder (its ``model.*`` weights; the LM head and MTP depths are dropped) and
``score`` starts fresh. A share of the pairs is held out; the pairwise accuracy on them (the chosen reply scored
above the rejected one) is reported before and after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import split_heldout
from .dpo import check_pair_lengths
from .models import Log, load_chat_tokenizer, plain_progress, save_model, trainer_settings
from .rewards import completion_text


@dataclass
class RMSettings:
    epochs: float = 3.0
    lr: float = 1e-4
    batch_size: int = 16
    eval_fraction: float = 0.1
    max_length: int | None = None
    seed: int = 0
    device: str = "cpu"
    logging_steps: int = 10


def load_reward_model(folder: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """A sequence-classification model (``num_labels=1``) and tokenizer from ``folder``: a trained reward model, or a
    causal-LM folder whose backbone it starts from. The tokenizer gets the chat format (resizing the model)."""
    from transformers import AutoModelForSequenceClassification

    import kunlunbaize.hf  # noqa: F401

    from .chat import add_chat_format

    tokenizer = load_chat_tokenizer(Path(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    add_chat_format(model, tokenizer)
    return model.to(device), tokenizer


@torch.no_grad()
def pairwise_accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int = 16) -> float:
    """The share of ``pairs`` whose chosen reply the model scores above the rejected one."""
    scorer = ModelReward.from_loaded(model, tokenizer, batch_size)
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs])
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def run_reward_model(folder: Path, pairs: list[dict[str, Any]], out: Path, settings: RMSettings,
                     log: Log = print) -> dict[str, Any]:
    """Train a reward model from the backbone of ``folder`` on ``pairs``; save it at ``out/model``. Returns the
    held-out pairwise accuracy before and after, the trainer's metrics and ``model``."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(settings.seed)  # the fresh score head: the same start for the same seed
    model, tokenizer = load_reward_model(folder, settings.device)
    context = model.config.max_seq_len
    max_length = min(settings.max_length or context, context)
    check_pair_lengths(tokenizer, pairs, max_length)
    train, held = split_heldout(pairs, settings.eval_fraction, settings.seed)
    before = pairwise_accuracy(model.eval(), tokenizer, held)
    args = RewardConfig(output_dir=str(out / "trainer"), num_train_epochs=settings.epochs, learning_rate=settings.lr,
                        per_device_train_batch_size=settings.batch_size,
                        per_device_eval_batch_size=settings.batch_size, max_length=max_length,
                        eval_strategy="epoch", save_strategy="no", logging_steps=settings.logging_steps,
                        lr_scheduler_type="cosine", warmup_steps=0.05, **trainer_settings(settings.device,
                                                                                          settings.seed))
    trainer = RewardTrainer(model=model.train(), args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(held))
    plain_progress(trainer, "reward model")
    result = trainer.train()
    final = trainer.evaluate()
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "pairs": len(train),
               "heldout_pairs": len(held), "heldout_accuracy_before": before,
               "heldout_accuracy": pairwise_accuracy(trained, tokenizer, held),
               "eval_loss": final.get("eval_loss"), "eval_accuracy": final.get("eval_accuracy")}
    if trainer.is_world_process_zero():
        save_model(trained, tokenizer, out / "model", log)
    trainer.accelerator.wait_for_everyone()
    metrics["model"] = str(out / "model")
    return metrics


class ModelReward:
    """A trained reward model as a reward function (TRL's signature): the scalar score of prompt + completion
    rendered with the chat template, in batches."""

    __name__ = "rm"

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        model, tokenizer = load_reward_model(folder, device)
        self._setup(model.eval(), tokenizer, batch_size)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, batch_size: int = 16) -> ModelReward:
        self = cls.__new__(cls)
        self._setup(model, tokenizer, batch_size)
        return self

    def _setup(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.context = model.config.max_seq_len

    def _ids(self, prompt: Any, completion: Any) -> list[int]:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        reply = completion if isinstance(completion, list) else [{"role": "assistant",
                                                                    "content": completion_text(completion)}]
        ids = self.tokenizer.apply_chat_template(turns + reply, tokenize=True, return_dict=True)["input_ids"]
        return ids[-self.context:]  # a conversation longer than the context is scored on its end

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        device = self.model.score.weight.device
        rows = [self._ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        out: list[float | None] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for b, r in enumerate(batch):  # right padding: the score is read at the last real token
                ids[b, :len(r)] = torch.tensor(r)
                mask[b, :len(r)] = 1
            out += self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].tolist()
        return out
