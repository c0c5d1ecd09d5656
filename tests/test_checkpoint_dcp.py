"""Checkpoints without full weights (``kunlun train --full-weights``): the weights read from the DCP files in one
process, tensor by tensor, and ``kunlun export --hf`` streamed from them into transformers' sharded layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kunlunbaize.checkpoint import (
    CheckpointDamaged,
    has_full_weights,
    latest_checkpoint,
    read_trainer_state,
    read_weights,
    weight_names,
)
from kunlunbaize.checkpoint.dcp_weights import DcpWeights
from kunlunbaize.checkpoint.state import FULL_WEIGHTS_AUTO_MAX, writes_full_weights
from kunlunbaize.cli import main
from kunlunbaize.infer.load import load_model
from kunlunbaize.train.trainer import TrainConfig, train

from .helpers import TRAIN_MODEL

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")


def test_full_weights_policy():
    assert writes_full_weights("auto", FULL_WEIGHTS_AUTO_MAX)
    assert not writes_full_weights("auto", FULL_WEIGHTS_AUTO_MAX + 1)
    assert writes_full_weights("always", 450 * 10**9) and not writes_full_weights("never", 1000)
    with pytest.raises(ValueError, match="auto, always, never"):
        writes_full_weights("sometimes", 1000)
    with pytest.raises(ValueError, match=r"full_weights.*auto, always or never"):
        TrainConfig(full_weights="sometimes").validate()


@pytest.fixture(scope="module")
def pair(dataset, tmp_path_factory) -> tuple[Path, Path]:
    """The same one-process run (tied embeddings) saved with ``--full-weights always`` and ``never``."""
    root = tmp_path_factory.mktemp("dcp")
    runs = []
    for policy in ("always", "never"):
        out = root / policy
        train(TrainConfig(data=str(dataset), out=str(out), preset="tiny", seq_len=32, tokens=32 * 4 * 2,
                          batch_size=4, lr=3e-3, eval_every=1000, eval_batches=0, progress=False, full_weights=policy,
                          model_overrides={**TRAIN_MODEL, "tie_embeddings": True}))
        runs.append(latest_checkpoint(out / "checkpoints"))
    return runs[0], runs[1]


@pytest.mark.slow
def test_a_checkpoint_without_full_weights_reads_the_same_weights_from_dcp(pair):
    full, dcp_only = pair
    assert (full / "model.safetensors").is_file() and not (dcp_only / "model.safetensors").exists()
    assert read_trainer_state(full)["full_weights"] is True and read_trainer_state(dcp_only)["full_weights"] is False
    assert has_full_weights(full) and not has_full_weights(dcp_only)
    want = read_weights(full)
    got = read_weights(dcp_only)  # the DCP fallback: every model tensor (the tied head once), no optimiser state
    assert set(got) == set(want) and set(weight_names(dcp_only)) == set(got) and "head.weight" not in got
    assert all(torch.equal(got[k], want[k]) for k in want)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def export(capsys, ckpt: Path, out: Path, *extra: str) -> str:
    """``kunlun export --hf`` of ``ckpt`` into ``out``; what it said."""
    main(["export", "--hf", str(out), "--checkpoint", str(ckpt), *extra])
    return capsys.readouterr().err


def check_same_export(a: Path, b: Path) -> None:
    """Two exports hold the same files, tensors (bit-exact), configs and, if sharded, the same index."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        if (a / name).exists():
            assert (a / name).read_text() == (b / name).read_text(), name


@pytest.mark.slow
def test_streamed_export_equals_the_full_weights_export_sharded_or_not(pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    full, dcp_only = pair
    said = export(capsys, dcp_only, tmp_path / "stream", "--max-shard-size", "4KB")
    assert "streamed from its DCP files" in said and "reloaded tensors identical" in said
    export(capsys, full, tmp_path / "full", "--max-shard-size", "4KB")
    check_same_export(tmp_path / "full", tmp_path / "stream")
    shards = sorted(p.name for p in (tmp_path / "stream").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and "lm_head.weight" not in index["weight_map"]
    ours, _ = load_model(full)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    assert torch.equal(hf(ids).logits, ours(ids).logits)
    # the default shard size: one model.safetensors, as the export of the full weights; bf16 the same
    export(capsys, dcp_only, tmp_path / "one", "--dtype", "bfloat16")
    export(capsys, full, tmp_path / "one_full", "--dtype", "bfloat16")
    check_same_export(tmp_path / "one_full", tmp_path / "one")
    assert (tmp_path / "one" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_streamed_export_reads_one_requested_model_tensor_per_call(pair, tmp_path, capsys, monkeypatch):
    """The peak memory of the streamed read is one tensor: each DCP read asks for exactly one model tensor (never
    the optimiser state), each tensor is read once, and ``.metadata`` once."""
    from torch.distributed.checkpoint import FileSystemReader

    _, dcp_only = pair
    reads: list[set[str]] = []
    metadata_reads = []
    read_data, read_metadata = FileSystemReader.read_data, FileSystemReader.read_metadata

    def spy_data(self, plan, planner):
        reads.append({item.storage_index.fqn for item in plan.items})
        return read_data(self, plan, planner)

    def spy_metadata(self, *args, **kwargs):
        metadata_reads.append(1)
        return read_metadata(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemReader, "read_data", spy_data)
    monkeypatch.setattr(FileSystemReader, "read_metadata", spy_metadata)
    export(capsys, dcp_only, tmp_path / "hf", "--max-shard-size", "4KB")
    names = set(DcpWeights(dcp_only).names())
    assert all(len(r) == 1 for r in reads), reads
    assert sorted(next(iter(r)) for r in reads) == sorted("model." + n for n in names)
    assert len(metadata_reads) == 2  # the export's reader, and the check above


@pytest.mark.slow
def test_generate_and_init_from_read_a_checkpoint_without_full_weights(pair, dataset, tmp_path, capsys):
    from .test_extend import setup_model, stage

    full, dcp_only = pair
    outputs = []
    for ckpt in pair:
        main(["generate", "class Heap:", "--checkpoint", str(ckpt), "--max-new-tokens", "12"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()
    model = setup_model(stage(dataset, dcp_only, tmp_path / "ext", seq_len=128, rope_factor=2.0))
    want = read_weights(full)
    own = model.state_dict()
    assert all(torch.equal(own[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_damaged_or_missing_dcp_shard_is_one_clear_line(pair, tmp_path):
    _, dcp_only = pair
    ckpt = tmp_path / "step_00000003"
    shutil.copytree(dcp_only, ckpt)
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:200])
    for argv in (["export", "--hf", str(tmp_path / "hf"), "--checkpoint", str(ckpt)],
                 ["generate", "x", "--checkpoint", str(ckpt)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        message = str(e.value.code)
        assert "\n" not in message and shard.name in message and "damaged or truncated" in message, message
    shard.unlink()
    with pytest.raises(SystemExit, match=rf"{shard.name} is missing: the checkpoint's DCP shards are incomplete"):
        main(["export", "--hf", str(tmp_path / "hf"), "--checkpoint", str(ckpt)])
    (ckpt / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointDamaged, match=r"cannot read .*\.metadata .*damaged"):
        DcpWeights(ckpt)
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_a_llama_baseline_checkpoint_without_full_weights_exports_whole(dataset, tmp_path, capsys):
    """The Llama baseline's export loads the checkpoint whole: from the DCP shards when there is no
    model.safetensors, with the logits check."""
    out = tmp_path / "llama"
    train(TrainConfig(data=str(dataset), out=str(out), preset="tiny", seq_len=32, tokens=32 * 4 * 2, batch_size=4,
                      lr=3e-3, eval_every=1000, eval_batches=0, progress=False, full_weights="never", arch="llama",
                      model_overrides=dict(TRAIN_MODEL)))
    ckpt = latest_checkpoint(out / "checkpoints")
    assert not has_full_weights(ckpt)
    said = export(capsys, ckpt, tmp_path / "hf", "--max-shard-size", "20KB")
    assert "LlamaForCausalLM" in said and "reloaded logits identical" in said
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()


# --- real ranks through `kunlun train` ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_fsdp2_run_without_full_weights_exports_as_the_run_with_them(dataset, tmp_path, capsys):
    """dp_shard 2 (FSDP2): a checkpoint without model.safetensors (its two ranks' DCP shards alone) exports, streamed
    and sharded, bit for bit as the same run's full weights do, and loads back in transformers. One run, saved with
    ``--full-weights always``, gives both: ``never`` writes the same DCP files and only leaves model.safetensors out
    (``save_checkpoint``; the pp2 test below runs ``--full-weights never`` through torchrun), so its copy without
    model.safetensors is what ``never`` writes, with no second 2-rank launch."""
    from transformers import AutoModelForCausalLM

    from .test_train import _common, _run, _torchrun

    out = tmp_path / "always"
    run = _run(_torchrun(2, *_common(dataset, out, 32 * 4 * 3, "--parallel", "fsdp", "--full-weights", "always",
                                     "--sample-tokens", "0")), timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    ckpts = {"always": latest_checkpoint(out / "checkpoints")}
    ckpts["never"] = tmp_path / "never" / ckpts["always"].name
    shutil.copytree(ckpts["always"], ckpts["never"], ignore=shutil.ignore_patterns("model.safetensors"))
    assert (ckpts["always"] / "model.safetensors").is_file()
    assert not (ckpts["never"] / "model.safetensors").exists() and len(list(ckpts["never"].glob("*.distcp"))) == 2
    export(capsys, ckpts["always"], tmp_path / "full", "--max-shard-size", "20KB")
    said = export(capsys, ckpts["never"], tmp_path / "stream", "--max-shard-size", "20KB")
    assert "reloaded tensors identical" in said
    check_same_export(tmp_path / "full", tmp_path / "stream")
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    ours, _ = load_model(ckpts["never"])  # a whole-model load from the two ranks' shards
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    assert torch.equal(hf(ids).logits, ours(ids).logits)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_pp2_run_without_full_weights_reads_under_one_process_names_and_exports(dataset, tmp_path, capsys):
    """pp2: the DCP files hold the one-process names, so the weights read and export without model.safetensors."""
    from transformers import AutoModelForCausalLM

    from .test_train import _common, _run, _torchrun

    out = tmp_path / "pp"
    run = _run(_torchrun(2, *_common(dataset, out, 32 * 4 * 2, "--pp", "2", "--micro-batch-size", "2",
                                     "--full-weights", "never", "--sample-tokens", "0")), timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    ckpt = latest_checkpoint(out / "checkpoints")
    assert not (ckpt / "model.safetensors").exists()
    ours, _ = load_model(ckpt)
    assert set(DcpWeights(ckpt).names()) == set(ours.state_dict())
    said = export(capsys, ckpt, tmp_path / "hf", "--max-shard-size", "20KB")
    assert "reloaded tensors identical" in said
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    assert torch.equal(hf(ids, mtp=True).logits, ours(ids, mtp=True).logits)

