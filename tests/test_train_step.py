"""train_step: accumulation over micro-batches is one big batch, a non-finite step changes nothing, and `kunlun
train`, `kunlun demo` and the training benchmarks all run this one function."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import kunlunbaize.train.step as step_module
from kunlunbaize import KunlunBaize
from kunlunbaize.train.optim import build_optimizer
from kunlunbaize.train.step import train_step

from .helpers import TRAIN_MODEL, tiny

ROOT = Path(__file__).resolve().parent.parent


def _model(seed: int = 0, **overrides) -> KunlunBaize:
    torch.manual_seed(seed)
    return KunlunBaize(tiny(**overrides)).train()


def _tokens(batch: int, seq_len: int = 16, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(7))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("k", "clip"), [(2, 1e9), (4, 1e9), (2, 0.1)])
def test_k_micro_batches_give_the_gradient_of_one_batch_k_times_as_large(k, clip):
    x = _tokens(4)
    one, many = _model(), _model()
    # SGD: the update is the (clipped) gradient itself, so equal weights after the step mean equal gradients (AdamW
    # would hide a gradient scaled by a constant)
    sgd = {m: torch.optim.SGD(m.parameters(), lr=0.1) for m in (one, many)}
    big = train_step(one, sgd[one], [x], grad_clip=clip, loss_kwargs={"logits": False})
    acc = train_step(many, sgd[many], list(x.chunk(k)), grad_clip=clip, loss_kwargs={"logits": False})
    assert (big.grad_norm > clip) == (clip < 1)  # clipping active in the clipped case only
    assert big.finite and acc.finite
    torch.testing.assert_close(acc.losses, big.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.grad_norm, big.grad_norm, rtol=1e-5, atol=1e-6)
    before = _weights(_model())
    after_one, after_many = _weights(one), _weights(many)
    assert any(not torch.equal(after_one[n], before[n]) for n in before)
    for name in before:
        torch.testing.assert_close(after_many[name], after_one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in many.parameters())  # zeroed (set to None) after the step


def test_a_non_finite_loss_skips_the_optimiser_step(monkeypatch):
    model = _model()
    opt = build_optimizer(model, 1e-2)
    before = _weights(model)
    original = KunlunBaize.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(KunlunBaize, "forward", poisoned)
    result = train_step(model, opt, list(_tokens(4).chunk(2)), grad_clip=1.0)
    assert not result.finite and torch.isnan(result.losses[0])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not opt.state  # AdamW never stepped: no moments
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_gradient_skips_the_optimiser_step():
    model = _model()
    opt = build_optimizer(model, 1e-2)
    before = _weights(model)
    model.embed.weight.register_hook(lambda g: g * float("inf"))
    result = train_step(model, opt, [_tokens(2)], grad_clip=1.0)
    assert not result.finite and torch.isfinite(result.losses).all() and not torch.isfinite(result.grad_norm)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not opt.state


def test_a_finite_step_reports_the_joint_main_and_mtp_losses():
    model = _model(mtp_depth=2)
    x = _tokens(2)
    with torch.no_grad():
        out = copy.deepcopy(model)(x, labels=x)
    result = train_step(model, build_optimizer(model, 1e-3), [x], grad_clip=1.0)
    assert result.finite and result.losses.shape == (4,)
    torch.testing.assert_close(result.losses, torch.stack([out.loss, out.main_loss, *out.mtp_losses]))
    assert result.loss == pytest.approx(out.loss.item()) and result.main_loss == pytest.approx(out.main_loss.item())


# ------------------------------------------------------------------ every training path runs this train_step
@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the calls of kunlunbaize.train.step.train_step by code imported after this fixture ran."""
    counted: list[int] = []
    real = step_module.train_step

    def counting(*args, **kwargs):
        counted.append(len(args[2]))  # micro-batches of the step
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "train_step", counting)
    return counted


def _load(path: Path, name: str) -> ModuleType:
    """A fresh copy of a module from its file (so that it imports the patched train_step)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.mark.slow
def test_kunlun_train_runs_train_step_once_per_step(dataset, tmp_path, monkeypatch):
    import kunlunbaize.train.runner as runner
    import kunlunbaize.train.trainer as trainer

    counted: list[int] = []

    def counting(*args, **kwargs):
        counted.append(len(args[2]))
        return step_module.train_step(*args, **kwargs)

    monkeypatch.setattr(runner, "train_step", counting)  # the runner of a whole model steps through it
    summary = trainer.train(trainer.TrainConfig(
        data=str(dataset), out=str(tmp_path / "r"), preset="tiny", model_overrides=dict(TRAIN_MODEL), seq_len=32,
        tokens=32 * 4 * 3, batch_size=4, batch_size_start=4, micro_batch_size=2, eval_every=1000, progress=False))
    assert summary["steps_now"] == 3
    assert counted == [2, 2, 2]  # batch 4 as two micro-batches of 2


def test_kunlun_demo_runs_train_step(calls, capsys):
    demo = _load(ROOT / "src" / "kunlunbaize" / "demo.py", "kunlunbaize._demo_under_test")
    corpus = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    demo.stdlib_bytes = lambda: (corpus[:3072], corpus[3072:])  # a small corpus instead of 4 MB of files
    cfg = tiny(vocab_size=256, mtp_depth=1)
    demo.run_demo(cfg, steps=2, batch_size=2, seq_len=16, lr=1e-3, seed=0, prompt="def ", max_new_tokens=2)
    assert calls == [1, 1]
    assert "step     2/2  loss" in capsys.readouterr().out


def test_model_step_benchmark_runs_train_step(calls):
    bench = _load(ROOT / "benchmarks" / "model_step.py", "_bench_model_step")
    run = bench.build("tiny", 16, 2, torch.device("cpu"), n_layers=1)
    before = _weights(run["model"])
    bench.step(run, chunked=True)
    bench.step(run, chunked=False)
    assert calls == [1, 1]
    assert any(not torch.equal(p, before[n]) for n, p in run["model"].named_parameters())


@pytest.mark.parametrize("arch", ["kunlunbaize", "llama"])
def test_train_memory_benchmark_runs_train_step(calls, arch):
    if arch == "llama":
        pytest.importorskip("transformers")
    bench = _load(ROOT / "benchmarks" / "train_memory.py", "_bench_train_memory")
    args = argparse.Namespace(preset="tiny", arch=arch, ac=1, loss="chunked" if arch == "kunlunbaize" else "logits",
                              batch_size=2, seq_len=16, device="cpu")
    step, x = bench.make_step(args)
    step()
    assert calls == [1] and x.shape == (2, 16)


def test_gpu_suite_training_sections_run_train_step(calls):
    pytest.importorskip("transformers")
    suite = _load(ROOT / "benchmarks" / "gpu_suite.py", "_bench_gpu_suite")
    prof = dataclasses.replace(suite.SMOKE, batch=2, seq_len=16, steps=1, rounds=1, warmup=1, dense_layers=2)
    sec = suite.Section("train_throughput", "2. training throughput", budget_s=60)
    suite.section_train_throughput(sec, prof)
    assert calls == [1] * 4  # two models, one warm-up and one timed step each
    assert sec.figures["KunlunBaize"]["tokens_per_s"] > 0
    dense = suite.Section("dense_residual", "3. dense residual overhead", budget_s=60)
    suite.section_dense_residual(dense, prof)
    assert calls == [1] * 8
