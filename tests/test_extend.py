"""The context-extension stage (``kunlun train --init-from``): a new run at a longer context with a RoPE scaling,
starting exactly from the parent's weights, refusing parents that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kunlunbaize.checkpoint import CheckpointError, latest_checkpoint, read_config, read_weights
from kunlunbaize.infer.load import load_as_kunlunbaize
from kunlunbaize.train.distributed import init_distributed
from kunlunbaize.train.trainer import TrainConfig, Trainer, train

pytest.importorskip("tokenizers")

PARENT_CONTEXT = 64  # the trained_run fixture's max_seq_len


def stage(dataset: Path, parent: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(dataset), out=str(out), init_from=str(parent), seq_len=4 * PARENT_CONTEXT, rope="yarn",
                rope_factor=4.0, tokens=4 * PARENT_CONTEXT * 2 * 2, batch_size=2, batch_size_start=2, lr=1e-3,
                log_every=1, eval_every=2, eval_batches=1, ckpt_every=1000, progress=False, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def setup_model(cfg: TrainConfig) -> torch.nn.Module:
    trainer = Trainer.setup(cfg, init_distributed("cpu"), Path(cfg.data))
    trainer.logger.close()
    trainer.stop.restore()
    return trainer.model


def test_stage_starts_from_the_parents_weights_with_the_new_context(dataset, trained_run, tmp_path):
    model = setup_model(stage(dataset, trained_run, tmp_path / "ext"))
    parent = read_weights(latest_checkpoint(trained_run / "checkpoints"))
    own = model.state_dict()
    assert own.keys() == parent.keys()
    assert all(torch.equal(own[k], parent[k]) for k in parent)
    assert model.config.max_seq_len == 4 * PARENT_CONTEXT
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": PARENT_CONTEXT}
    assert model.rope.attention_factor > 1


def test_stage_is_a_new_run_that_records_its_parent_and_resumes(dataset, trained_run, tmp_path):
    out = tmp_path / "ext"
    summary = train(stage(dataset, trained_run, out))
    assert summary["step"] == 2
    ckpt = latest_checkpoint(out / "checkpoints")
    saved = read_config(ckpt)
    assert saved["max_seq_len"] == 4 * PARENT_CONTEXT and saved["rope_scaling"]["rope_type"] == "yarn"
    record = json.loads((out / "parent.json").read_text())
    assert record["checkpoint"] == str(latest_checkpoint(trained_run / "checkpoints").resolve())
    assert record["model_config"]["max_seq_len"] == PARENT_CONTEXT
    assert json.loads((out / "train_config.json").read_text())["init_from"] == str(trained_run)
    served, _ = load_as_kunlunbaize(ckpt)  # what kunlun generate / serve / eval build: the stage's scaling
    assert served.config.rope_scaling == saved["rope_scaling"] and served.rope.attention_factor > 1
    more = train(stage(dataset, trained_run, out, tokens=4 * PARENT_CONTEXT * 2 * 3))  # resumes its own run
    assert more["step"] == 3 and more["steps_now"] == 1


def test_second_stage_keeps_the_original_context_and_default_factor(dataset, trained_run, tmp_path):
    first = tmp_path / "s1"
    train(stage(dataset, trained_run, first, tokens=4 * PARENT_CONTEXT * 2))
    model = setup_model(stage(dataset, first, tmp_path / "s2", seq_len=8 * PARENT_CONTEXT, rope_factor=None,
                              tokens=8 * PARENT_CONTEXT * 2))
    assert model.config.rope_scaling["original_max_position_embeddings"] == PARENT_CONTEXT
    assert model.config.rope_scaling["factor"] == 8.0  # the new context over the original one
    kept = setup_model(stage(dataset, first, tmp_path / "s3", rope=None, rope_factor=None))
    assert kept.config.rope_scaling["factor"] == 4.0  # no --rope: the parent's own scaling


def test_unscaled_extension_and_llama_parents(dataset, trained_run, llama_run, tmp_path):
    plain = setup_model(stage(dataset, trained_run, tmp_path / "plain", rope="none", rope_factor=None))
    assert plain.config.rope_scaling is None and plain.config.max_seq_len == 4 * PARENT_CONTEXT
    llama = setup_model(stage(dataset, llama_run, tmp_path / "llama", arch="llama", rope="llama3"))
    assert llama.hf.config.rope_parameters["rope_type"] == "llama3"
    parent = read_weights(latest_checkpoint(llama_run / "checkpoints"))
    assert all(torch.equal(llama.state_dict()[k], v) for k, v in parent.items())


def _with_other_tokenizer(parent: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "other" / "checkpoints" / "step_00000001"
    shutil.copytree(latest_checkpoint(parent / "checkpoints"), ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["data"]["tokenizer_sha256"] = "0" * 64
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


@pytest.mark.parametrize("change,message", [
    (dict(arch="llama"), "holds a KunlunBaize"),
    (dict(model_overrides={"d_model": 64, "n_heads": 4}), "its weights do not fit the model"),
    (dict(seq_len=PARENT_CONTEXT, rope_factor=None), "must be > 1"),
    ("tokenizer", "another tokenizer"),
    ("same_out", "is a checkpoint of --out"),
])
def test_parents_that_do_not_fit_are_refused_in_one_line(dataset, trained_run, tmp_path, change, message):
    if change == "tokenizer":
        cfg = stage(dataset, _with_other_tokenizer(trained_run, tmp_path), tmp_path / "ext")
    elif change == "same_out":
        cfg = stage(dataset, trained_run, trained_run)
    else:
        cfg = stage(dataset, trained_run, tmp_path / "ext", **change)
    with pytest.raises((CheckpointError, ValueError)) as e:
        train(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change,message", [
    (dict(init_from=None), "TrainConfig.rope"),
    (dict(rope="ntk"), "TrainConfig.rope"),
    (dict(rope_factor=1.0), "TrainConfig.rope_factor"),
    (dict(rope="none"), "TrainConfig.rope_factor"),
])
def test_bad_extension_settings(dataset, trained_run, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        stage(dataset, trained_run, tmp_path / "ext", **change).validate()
