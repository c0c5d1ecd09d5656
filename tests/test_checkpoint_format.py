"""The checkpoint layer: one resolution rule for run, checkpoint and export folders, one error type, the
architecture a folder holds; and the architecture registry every feature asks instead of naming architectures."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kunlunbaize.arch import ARCHS, BASELINE, DEFAULT, HOOKS, get_arch
from kunlunbaize.checkpoint import (
    CheckpointError,
    checkpoint_arch,
    checkpoint_dirs,
    is_export,
    read_config,
    resolve_checkpoint,
)

from .helpers import tiny


@pytest.mark.slow
def test_a_run_folder_resolves_to_its_newest_complete_checkpoint(trained_run):
    newest = checkpoint_dirs(trained_run / "checkpoints")[-1]
    assert resolve_checkpoint(trained_run) == newest
    assert resolve_checkpoint(trained_run / "checkpoints") == newest
    assert resolve_checkpoint(newest) == newest
    assert resolve_checkpoint(newest, resumable=True) == newest


def test_an_interrupted_save_is_never_resolved(trained_run, tmp_path):
    newest = checkpoint_dirs(trained_run / "checkpoints")[-1]
    half = tmp_path / "run" / "checkpoints" / "step_00000099.tmp"
    shutil.copytree(newest, half)
    (half / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(half)


def test_an_export_resolves_to_itself_but_cannot_be_resumed(trained_run, tmp_path):
    pytest.importorskip("transformers")
    from kunlunbaize.hf.export import export_hf

    out = tmp_path / "hf"
    export_hf(resolve_checkpoint(trained_run), out, log=lambda m: None)
    assert is_export(out) and resolve_checkpoint(out) == out
    assert checkpoint_arch(out) is DEFAULT
    with pytest.raises(CheckpointError, match="exported model, not a training checkpoint"):
        resolve_checkpoint(out, resumable=True)


def test_missing_paths_and_files_get_one_error_type(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nowhere does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "f")
    assert issubclass(CheckpointError, ValueError)


def test_a_damaged_config_names_the_file(trained_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(trained_run), ckpt)
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON list"):
        read_config(ckpt)


def test_the_architecture_of_a_checkpoint(trained_run, llama_run, tmp_path):
    assert checkpoint_arch(resolve_checkpoint(trained_run)) is DEFAULT
    llama = resolve_checkpoint(llama_run)
    assert checkpoint_arch(llama) is BASELINE
    old = tmp_path / "old"  # written before config.json named the architecture: told by the trainer state
    shutil.copytree(llama, old)
    config = read_config(old)
    del config["arch"]
    (old / "config.json").write_text(json.dumps(config))
    assert checkpoint_arch(old) is BASELINE
    (old / "trainer_state.json").write_text(json.dumps({"step": 1, "consumed_samples": 1, "tokens": 1}))
    assert checkpoint_arch(old) is BASELINE  # …and, without that, by the weight names


def test_the_registry_refuses_an_unknown_architecture():
    with pytest.raises(ValueError, match=r"unknown architecture 'gpt9'.*kunlunbaize"):
        get_arch("gpt9")
    with pytest.raises(KeyError, match="unknown hook"):
        DEFAULT.hook("fly")
    with pytest.raises(NotImplementedError, match="no parallelize"):
        get_arch("llama").hook("parallelize")  # the KunlunBaize spec has its tensor-parallel plan


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_architecture_trains_through_the_same_forward_and_names_its_hooks(name):
    spec = get_arch(name)
    if spec is not DEFAULT:
        pytest.importorskip("transformers")
    cfg = tiny()
    model = spec.build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, labels=ids, **spec.train_kwargs())
    terms = [out.loss, out.main_loss, *out.mtp_losses]
    assert len(terms) == spec.loss_terms(cfg) and all(torch.isfinite(t) for t in terms)
    assert spec.model_config(spec.checkpoint_config(cfg)) == cfg.to_dict()
    assert spec.training_flops(cfg, 8) > 0
    for hook in ("generator", "export"):
        assert callable(spec.hook(hook))
    assert set(spec.hooks) <= set(HOOKS)


def test_the_baselines_flops_are_a_plain_decoder_with_its_matched_ffn():
    pytest.importorskip("transformers")
    import dataclasses

    cfg = tiny()
    model = BASELINE.build(cfg)
    plain = dataclasses.replace(cfg, transformerx=False, dense_residual=False, mtp_depth=0, mtp_loss_weights=None,
                                ffn_hidden=model.hf_config.intermediate_size)
    assert BASELINE.training_flops(cfg, 16) == plain.flops_per_token(16, training=True)
    mtp = cfg.param_breakdown()["mtp"]
    assert abs(model.num_params() - (cfg.num_params() - mtp)) / cfg.num_params() < 0.02


def test_resuming_under_another_architecture_is_refused(llama_run, dataset, tmp_path):
    from kunlunbaize.train.trainer import TrainConfig, train

    from .helpers import TRAIN_MODEL

    with pytest.raises(CheckpointError, match=r"holds a HF Llama.*resume with --arch llama"):
        train(TrainConfig(data=str(dataset), out=str(tmp_path / "run"), resume=str(llama_run), preset="tiny",
                          model_overrides=dict(TRAIN_MODEL), seq_len=32, tokens=32 * 8 * 8, batch_size=8,
                          progress=False))
