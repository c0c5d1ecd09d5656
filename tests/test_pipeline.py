"""Pipeline parallelism (train.parallel.pipeline, .pipeline_stages): exact stages, the schedules on real gloo ranks, the
dense residual's boundary traffic, two stages on one rank resuming a checkpoint, and refused splits."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kunlunbaize import ModelConfig
from kunlunbaize.model.model import KunlunBaize
from kunlunbaize.train.parallel.pipeline import build_pipeline
from kunlunbaize.train.parallel.pipeline_stages import (
    build_stage_modules,
    pipeline_traffic,
    set_shared_grads,
    shared_parameter_names,
    split_layers,
    sum_local_shared_grads,
)

VARIANTS = {  # the full model (tied head, so the embedding is shared three ways) and single-switch ablations
    "full": dict(tie_embeddings=True),
    "untied": dict(),
    "no_dense": dict(dense_residual=False),
    "no_mtp": dict(mtp_depth=0),
    "no_conv": dict(transformerx=False),
}


def _model(variant: str, n_layers: int = 4) -> KunlunBaize:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64,
                             n_layers=n_layers, max_seq_len=32, **VARIANTS[variant])
    model = KunlunBaize(cfg)
    if model.dense is not None:  # away from the uniform start, so every weight W[l, i] differs
        with torch.no_grad():
            for p in model.dense.parameters():
                p.normal_()
    return model


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _batch(step: int, batch: int = 4, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, : 3 + step] = -100  # uneven valid targets per micro-batch: the loss weighting must be per token
    return ids, labels


@pytest.mark.parametrize(("variant", "split"), [
    *[(v, [1] * 6) for v in VARIANTS],  # boundaries raw → raw → raw → partial sums → partial → partial
    ("full", [4, 2]),  # partial sums into the last stage
    ("full", [2, 3, 1]),
])
def test_stages_run_in_sequence_equal_the_whole_model(variant, split):
    """Every boundary form gives the model's loss and every gradient, for the full model and each ablation."""
    model = _model(variant, n_layers=6)
    ref = copy.deepcopy(model)
    ids, labels = _batch(0)
    loss = ref(ids, labels=labels, logits=False).loss
    loss.backward()
    stages = build_stage_modules(model, len(split), split)
    x = ids
    for stage in stages:
        x = stage(x)
    terms = stages[-1].loss_terms(x, ids, labels)
    terms.total.backward()
    names = list(shared_parameter_names(model.config, len(split)))
    set_shared_grads(stages, names, sum_local_shared_grads(stages, names))
    torch.testing.assert_close(terms.total, loss, rtol=1e-6, atol=1e-6)
    expected = dict(ref.named_parameters())
    seen = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            torch.testing.assert_close(_grad(p), _grad(expected[name]), rtol=1e-5, atol=1e-7, msg=name)
            seen.add(name)
    assert seen == set(expected)  # every parameter lives on some stage


@pytest.mark.parametrize(("variant", "split", "recompute"), [
    ("full", [1] * 6, False), ("full", [4, 2], True), ("untied", [2, 3, 1], False), ("no_conv", [3, 3], False),
    ("no_mtp", [3, 3], False),
])
def test_stages_with_document_ids_equal_the_whole_models_packed_documents(variant, split, recompute):
    """``--doc-mask`` through the stages: every stage given the micro-batch's document ids (several documents a
    window, some shorter than an MTP depth) gives the whole model's packed-document loss and every gradient."""
    from kunlunbaize.model.documents import document_ids

    model = _model(variant, n_layers=6)
    ref = copy.deepcopy(model)
    ids, labels = _batch(0)
    ids[:, [2, 3, 7]] = 0  # end-of-text 0: documents of 3, 1, 4 and the rest of the window (and any random 0s)
    docs = document_ids(ids, 0)
    assert (docs[:, -1] >= 3).all()
    loss = ref(ids, labels=labels, logits=False, document_ids=docs).loss
    loss.backward()
    stages = build_stage_modules(model, len(split), split)
    x = ids
    for stage in stages:
        stage.gradient_checkpointing = recompute
        x = stage(x, document_ids=docs)
    terms = stages[-1].loss_terms(x, ids, labels, document_ids=docs)
    terms.total.backward()
    names = list(shared_parameter_names(model.config, len(split)))
    set_shared_grads(stages, names, sum_local_shared_grads(stages, names))
    torch.testing.assert_close(terms.total, loss, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(terms.total, ref(ids, labels=labels, logits=False).loss)  # the masks matter here
    expected = dict(ref.named_parameters())
    for stage in stages:
        for name, p in stage.named_parameters():
            torch.testing.assert_close(_grad(p), _grad(expected[name]), rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- real ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_schedule(rank: int, schedule: str, stages_per_rank: int, split: list[int] | None, variant: str) -> None:
    """Three SGD steps of the pipeline on this rank and of the whole model in one process, compared each step (SGD,
    not Adam: Adam turns float noise in near-zero gradients into whole steps, and the runs part for that alone); then
    a forward-only evaluation and one more step."""
    model = _model(variant)
    ref = copy.deepcopy(model)
    pipe = build_pipeline(model, dist.group.WORLD, schedule, n_microbatches=2, stages_per_rank=stages_per_rank,
                          layers_per_stage=split)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    expected = dict(ref.named_parameters())
    for step in range(3):
        ids, labels = _batch(step)
        losses = pipe.step(ids, labels)
        out = ref(ids, labels=labels, logits=False)
        out.loss.backward()
        want = torch.stack([out.loss, out.main_loss, *out.mtp_losses]).detach()
        torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6, msg=f"{variant} step {step} losses")
        for _, name, p in pipe.named_parameters():
            torch.testing.assert_close(_grad(p), _grad(expected[name]), rtol=1e-4, atol=1e-6,
                                       msg=f"{variant} step {step} grad {name}")
        norm = pipe.clip_grad_norm_(1.0)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0), rtol=1e-5, atol=0)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    for _, name, p in pipe.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-4, atol=1e-5, msg=f"{variant} weight {name}")
    ids, labels = _batch(3)
    with torch.no_grad():
        val = ref(ids, labels=labels, logits=False)
    torch.testing.assert_close(pipe.evaluate(ids, labels), torch.stack([val.loss, val.main_loss, *val.mtp_losses]),
                               rtol=1e-5, atol=1e-6, msg=f"{variant} evaluation")
    assert all(p.grad is None for p in pipe.parameters())  # forward only
    out = ref(ids, labels=labels, logits=False)  # and training goes on after it
    torch.testing.assert_close(pipe.step(ids, labels)[0], out.loss.detach(), rtol=1e-5, atol=1e-6)


def _worker(rank: int, port: int, cases: list[tuple[str, int, list[int] | None, list[str]]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for schedule, stages_per_rank, split, variants in cases:
            for variant in variants:
                _check_schedule(rank, schedule, stages_per_rank, split, variant)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_equals_one_process_under_each_schedule():
    """Each schedule runs the full model and some single-switch ablations (the sequential test above runs all), one
    after another on the same 2 spawned ranks (one start-up for the three)."""
    cases = [("gpipe", 1, None, ["full", "no_dense"]),  # boundary after 2 of 4 layers: H_0, H_1, H_2
             ("1f1b", 1, [3, 1], ["full", "untied", "no_mtp"]),  # after 3 of 4: H_3 and the partial sum P_3
             ("interleaved1f1b", 2, None, ["full", "no_conv"])]  # four stages: raw, raw, partial
    mp.spawn(_worker, args=(_free_port(), cases), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------- one in-process rank
@pytest.fixture
def one_rank():
    """A one-rank gloo group in this process (an in-memory store: nothing listens)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_two_stages_on_one_rank_equal_the_model(one_rank):
    """Interleaved 1F1B with both stages on one rank: the embedding copies of the first and the last stage (tied
    head, MTP) and the dense logits are summed locally; loss and every gradient equal the model's."""
    model = _model("full")
    ref = copy.deepcopy(model)
    pipe = build_pipeline(model, one_rank, "interleaved1f1b", n_microbatches=2, stages_per_rank=2,
                          layers_per_stage=[3, 1])
    ids, labels = _batch(1)
    with pytest.raises(ValueError, match="forward-only evaluation needs the stages on at least 2 pipeline ranks"):
        pipe.evaluate(ids, labels)
    losses = pipe.step(ids, labels)
    out = ref(ids, labels=labels, logits=False)
    out.loss.backward()
    torch.testing.assert_close(losses, torch.stack([out.loss, out.main_loss, *out.mtp_losses]).detach(),
                               rtol=1e-5, atol=1e-6)
    expected = dict(ref.named_parameters())
    for _, name, p in pipe.named_parameters():
        torch.testing.assert_close(_grad(p), _grad(expected[name]), rtol=1e-4, atol=1e-6, msg=name)


def test_two_stages_on_one_rank_with_document_ids_equal_accumulated_micro_batches(one_rank):
    """``Pipeline.step(…, document_ids=…)``: every stage gets its micro-batch's document ids (the schedule splits
    them with the ids); the losses are the mean of the micro-batches' packed-document means and the gradients those
    of one process accumulating the two micro-batches, as ``train_step`` does."""
    from kunlunbaize.model.documents import document_ids

    model = _model("full")
    ref = copy.deepcopy(model)
    pipe = build_pipeline(model, one_rank, "interleaved1f1b", n_microbatches=2, stages_per_rank=2,
                          layers_per_stage=[3, 1])
    ids, _ = _batch(1)
    ids[0, [2, 3]] = ids[2, 7] = 0  # end-of-text 0: the micro-batches have different numbers of documents
    docs = document_ids(ids, 0)
    with pytest.raises(ValueError, match=r"document_ids must have the shape of input_ids \(4, 12\), got \(4, 11\)"):
        pipe.step(ids, ids, document_ids=docs[:, 1:])
    losses = pipe.step(ids, ids, document_ids=docs)
    outs = [ref(ids[i:i + 2], labels=ids[i:i + 2], logits=False, document_ids=docs[i:i + 2]) for i in (0, 2)]
    (sum(o.loss for o in outs) / 2).backward()
    want = sum(torch.stack([o.loss, o.main_loss, *o.mtp_losses]).detach() for o in outs) / 2
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    expected = dict(ref.named_parameters())
    for _, name, p in pipe.named_parameters():
        torch.testing.assert_close(_grad(p), _grad(expected[name]), rtol=1e-4, atol=1e-6, msg=name)


def test_bad_pipeline_requests_are_refused(one_rank):
    model = _model("full")
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'; choose one of gpipe, 1f1b"):
        build_pipeline(model, one_rank, "zb")
    with pytest.raises(ValueError, match=r"runs one stage per rank.*use interleaved1f1b"):
        build_pipeline(model, one_rank, "1f1b", stages_per_rank=2)
    with pytest.raises(ValueError, match="4 layers do not split evenly into 3 pipeline stages"):
        build_pipeline(model, one_rank, "interleaved1f1b", stages_per_rank=3)
    with pytest.raises(ValueError, match="4 layers cannot fill 8 pipeline stages"):
        build_pipeline(model, one_rank, "interleaved1f1b", stages_per_rank=8)
    pipe = build_pipeline(model, one_rank, "gpipe", n_microbatches=3)
    with pytest.raises(ValueError, match="batch of 4 sequences does not split into 3 micro-batches"):
        pipe.step(*_batch(0))


@pytest.mark.parametrize(("n_layers", "stages", "split", "message"), [
    (4, 3, None, "4 layers do not split evenly into 3 pipeline stages: choose a stage count that divides 4"),
    (2, 4, None, "2 layers cannot fill 4 pipeline stages"),
    (4, 2, [4, 0], r"layers_per_stage \[4, 0\] must give each of the 2 stages at least one layer"),
    (4, 2, [2, 3], r"layers_per_stage \[2, 3\] must .* sum to the model's 4 layers"),
    (4, 2, [4], r"layers_per_stage \[4\] must give each of the 2 stages"),
])
def test_bad_splits_are_refused(n_layers, stages, split, message):
    with pytest.raises(ValueError, match=message) as err:
        split_layers(n_layers, stages, split)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- traffic
def test_boundary_traffic_of_the_paper_preset_by_hand():
    """126 layers, d 16384, 4K tokens, bf16: one [1, 4096, 16384] tensor is 128 MiB. Llama 3's split (one layer
    fewer on the first and the last stage). A boundary after s layers sends min(s + 1, 126 − s + 1) tensors."""
    cfg = ModelConfig.preset("paper")
    one = 4096 * 16384 * 2
    pp8 = pipeline_traffic(cfg, [15] + [16] * 6 + [15])
    assert [b.after_layer for b in pp8] == [15, 31, 47, 63, 79, 95, 111]
    assert [b.tensors for b in pp8] == [16, 32, 48, 64, 48, 32, 16]
    assert [b.form for b in pp8] == ["raw"] * 4 + ["partial"] * 3
    assert pp8[3].bytes == 64 * one == 8 * 2**30 and pp8[3].plain_bytes == one and pp8[3].ratio == 64
    pp16 = pipeline_traffic(cfg, [7] + [8] * 14 + [7])
    assert [b.tensors for b in pp16] == [8, 16, 24, 32, 40, 48, 56, 64, 56, 48, 40, 32, 24, 16, 8]
    assert sum(b.bytes for b in pp16) == 512 * one


def test_boundary_traffic_of_the_small_preset_and_without_dense_residual():
    cfg = ModelConfig.preset("small")  # 6 layers, d 256, 256 tokens
    one = 2 * 256 * 256 * 4  # micro-batch 2, fp32
    assert [(b.after_layer, b.form, b.tensors, b.bytes) for b in pipeline_traffic(cfg, [2, 2, 2], 2, 256, 4)] == [
        (2, "raw", 3, 3 * one), (4, "partial", 3, 3 * one)]  # after 4: H_4, P_4, P_5
    assert [b.tensors for b in pipeline_traffic(cfg, [1] * 6)] == [2, 3, 4, 3, 2]
    plain = ModelConfig.preset("small", dense_residual=False)
    assert [(b.form, b.tensors, b.ratio) for b in pipeline_traffic(plain, [3, 3])] == [("plain", 1, 1.0)]


def test_old_torch_is_refused_with_the_version_needed(monkeypatch):
    from kunlunbaize.train.parallel import pipeline

    monkeypatch.setattr(torch, "__version__", "2.7.1+cpu")
    with pytest.raises(RuntimeError, match=r"pipeline parallelism needs torch >= 2.8 .*found 2.7.1\+cpu: upgrade"):
        pipeline.require_pipelining()
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    pipeline.require_pipelining()


def test_stages_recompute_blocks_when_the_model_checkpoints_them():
    """The model's ``gradient_checkpointing`` carries over: each block runs twice (forward, then again in the
    backward pass), with the same gradients."""
    model = _model("full")
    ref = copy.deepcopy(model)
    model.gradient_checkpointing = True
    stages = build_stage_modules(model, 2)
    calls = []
    for stage in stages:
        for block in stage.blocks.values():
            block.register_forward_pre_hook(lambda *_: calls.append(1))
    ids, labels = _batch(0)
    hidden = stages[1](stages[0](ids))
    stages[1].loss_terms(hidden, ids, labels).total.backward()
    assert len(calls) == 2 * 4
    ref(ids, labels=labels, logits=False).loss.backward()
    expected = dict(ref.named_parameters())
    for name, p in stages[0].named_parameters():
        if not name.startswith(("dense.", "embed.")):  # shared: summed over the stages elsewhere
            torch.testing.assert_close(_grad(p), _grad(expected[name]), rtol=1e-5, atol=1e-7, msg=name)


def _optimiser_state(named: dict[torch.Tensor, str], optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """``optimizer``'s state per parameter name (``named``: parameter → name)."""
    return {named[p]: s for p, s in optimizer.state.items()}


def _assert_same_training_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, ref: KunlunBaize,
                                ref_optimizer: torch.optim.Optimizer, what: str) -> None:
    """Every parameter of ``module`` and its optimiser state (the Adam step exactly) equal ``ref``'s."""
    expected = dict(ref.named_parameters())
    want = _optimiser_state({p: n for n, p in expected.items()}, ref_optimizer)
    got = _optimiser_state({p: n for n, p in module.named_parameters()}, optimizer)
    assert sorted(got) == sorted(n for n, _ in module.named_parameters()), what
    for name, p in module.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6, msg=f"{what}: {name}")
        assert sorted(got[name]) == sorted(want[name]), (what, name)
        for key, value in got[name].items():
            tol = dict(rtol=0, atol=0) if key == "step" else dict(rtol=0, atol=1e-6)
            torch.testing.assert_close(value, want[name][key], **tol, msg=f"{what}: {name} {key}")


def test_two_stages_on_one_rank_resume_a_one_process_checkpoint_and_save_one(one_rank, tmp_path):
    """A one-process step-2 checkpoint loaded into two stages on one rank (interleaved 1F1B), then step 3: every
    stage's parameters and optimiser state per parameter equal one process's; the shared embedding and dense logits
    (both stages hold them) included, whose loaded state each stage's optimiser must own (aliased, both advanced the
    one Adam step and moments). The pipeline's step-3 checkpoint loads back into one process as its state."""
    from kunlunbaize.checkpoint.state import load_checkpoint, save_checkpoint
    from kunlunbaize.train.optim import build_optimizer
    from kunlunbaize.train.parallel.pipeline_state import PipelineState

    model = _model("full")
    ref = copy.deepcopy(model)
    ref_opt = build_optimizer(ref, 1e-2, dense_lr_mult=2.0)

    def ref_step(step: int) -> None:
        ids, labels = _batch(step)
        ref_opt.zero_grad()
        ref(ids, labels=labels, logits=False).loss.backward()
        ref_opt.step()

    def save(step: int, target, optimizer) -> None:
        trainer = {"step": step, "consumed_samples": 4 * step, "tokens": 48 * step}
        save_checkpoint(tmp_path / "ckpt", step, target, optimizer, trainer, None, keep_last=2, full_weights=False)

    for step in (1, 2):
        ref_step(step)
    save(2, ref, ref_opt)
    pipe = build_pipeline(model, one_rank, "interleaved1f1b", n_microbatches=2, stages_per_rank=2,
                          layers_per_stage=[3, 1])
    opts = [build_optimizer(stage, 1e-2, dense_lr_mult=2.0) for stage in pipe.stages]
    state = PipelineState(pipe.stages, opts, one_rank, representative=True)
    assert load_checkpoint(tmp_path / "ckpt" / "step_00000002", state, None)["step"] == 2
    ref_step(3)
    for opt in opts:
        opt.zero_grad()
    pipe.step(*_batch(3))
    for opt in opts:
        opt.step()
    for stage, opt in zip(pipe.stages, opts, strict=True):
        _assert_same_training_state(stage, opt, ref, ref_opt, f"stage {stage.spec.index} after step 3")
    save(3, state, None)
    back = _model("full")
    back_opt = build_optimizer(back, 1e-2, dense_lr_mult=2.0)
    load_checkpoint(tmp_path / "ckpt" / "step_00000003", back, back_opt)
    _assert_same_training_state(back, back_opt, ref, ref_opt, "one process from the pipeline's step 3")
