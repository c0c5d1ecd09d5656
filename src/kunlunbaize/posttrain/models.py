"""Models for post-training: a checkpoint as a transformers folder with the chat format, loading it for TRL, the
trainer settings for the machine, and writing a trained model back as a folder every command reads."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..arch import DEFAULT
from ..checkpoint import CheckpointError, checkpoint_arch, resolve_checkpoint
from ..progress import Progress

Log = Callable[[str], None]


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a transformers KunlunBaize folder (``kunlun export --hf`` or a post-trained model)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "kunlunbaize" and (
        path / "tokenizer.json").is_file()


def model_folder(checkpoint: str | Path, work: Path, log: Log = print) -> Path:
    """A transformers folder for ``checkpoint``: the folder itself when it is one, else ``work/base``, exported from
    a ``kunlun train`` run or checkpoint (reused when already there)."""
    path = Path(checkpoint)
    if is_hf_folder(path):
        return path
    ckpt = resolve_checkpoint(path)
    spec = checkpoint_arch(ckpt)
    if spec is not DEFAULT:
        raise CheckpointError(f"{ckpt} is a {spec.note} checkpoint: post-training here is for KunlunBaize models")
    base = work / "base"
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 exports; the others wait for it
        _wait_for(base / "source.txt", log)
    if is_hf_folder(base):
        recorded = (base / "source.txt").read_text(encoding="utf-8").strip() if (base / "source.txt").is_file() else ""
        if recorded == str(ckpt.resolve()):
            return base
        raise CheckpointError(f"{base} was exported from {recorded or 'another checkpoint'}, not {ckpt}: use "
                              "another --out or delete it")
    from ..hf.export import export_hf

    export_hf(ckpt, base, overwrite=True, log=log)
    (base / "source.txt").write_text(str(ckpt.resolve()) + "\n", encoding="utf-8")
    return base


def _wait_for(path: Path, log: Log, timeout: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise CheckpointError(f"waited {timeout:.0f}s for rank 0 to export the model ({path} never appeared)")
        time.sleep(0.5)


def load_chat_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer with the chat template (when it has the role tokens) and a pad token."""
    from transformers import AutoTokenizer

    from .chat import CHAT_TEMPLATE, missing_chat_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template and not missing_chat_tokens(tokenizer):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_policy(folder: Path, device: str = "cpu", log: Log = print) -> tuple[Any, Any]:
    """The causal LM of ``folder`` (float32, train mode) and its tokenizer, both with the chat format."""
    from transformers import AutoModelForCausalLM

    import kunlunbaize.hf  # noqa: F401  (registers the Auto classes)

    from .chat import add_chat_format

    tokenizer = load_chat_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
    added = add_chat_format(model, tokenizer)
    if added:
        log(f"added the chat tokens {', '.join(added)} to the tokenizer and the embeddings "
            f"(vocabulary now {len(tokenizer)})")
    return model, tokenizer


def trainer_settings(device: str, seed: int) -> dict[str, Any]:
    """TrainingArguments for this machine: bf16 only on a GPU that has it, no activation checkpointing (the
    models here are small; TRL turns it on by default), no remote reporting, the seed."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"use_cpu": not cuda, "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "fp16": False,
            "activation_checkpointing": False, "report_to": [], "seed": seed, "data_seed": seed,
            "dataloader_num_workers": 0, "save_only_model": True}


def plain_progress(trainer: Any, desc: str, tty: bool | None = None) -> Any:
    """Off a terminal, replace a transformers ``trainer``'s tqdm bars (carriage returns in a log file) with plain
    progress lines on stderr at a steady interval (:class:`kunlunbaize.progress.Progress`); return ``trainer``."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    if tty if tty is not None else sys.stderr.isatty():
        return trainer

    class ProgressLines(TrainerCallback):
        """Step count, the latest logged loss, elapsed time and ETA, on the main process."""

        bar: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = Progress(state.max_steps, desc=desc, unit="step", enabled=state.is_world_process_zero,
                                tty=False)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.set(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if self.bar is not None and logs and "loss" in logs:
                self.bar.postfix = {"loss": f"{logs['loss']:.4g}"}

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressLines())
    return trainer


def save_model(model: Any, tokenizer: Any, out: Path, log: Log = print) -> Path:
    """Write ``model`` and ``tokenizer`` as a transformers folder at ``out`` (complete or untouched), with
    ``chat_template.jinja``. A causal LM must load back with :func:`kunlunbaize.infer.load.load_model` (so every
    ``kunlun`` command reads it), a reward model with ``AutoModelForSequenceClassification``."""
    from ..hf.export import write_folder
    from ..infer.load import load_model

    def reload(folder: Path) -> None:
        if getattr(model, "score", None) is not None:
            from transformers import AutoModelForSequenceClassification

            AutoModelForSequenceClassification.from_pretrained(str(folder))
        else:
            load_model(folder)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if tokenizer.chat_template and not (tmp / "chat_template.jinja").is_file():
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        reload(tmp)

    write_folder(out, write)
    log(f"saved {out}")
    return out
