"""``kunlun ablate``: the plan (variants differ only in their switch, seeds only in the seed, FLOPs matching),
the study's bookkeeping (runs in worker processes, resume, a changed setting refused) and the aggregation."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from kunlunbaize.ablate.plan import VARIANTS, StudyConfig, model_config, plan, train_config
from kunlunbaize.ablate.report import aggregate, markdown, mean_sd
from kunlunbaize.ablate.run import StudyError, run_study

from .helpers import TRAIN_MODEL
from .test_cli_errors import run_main

ROOT = Path(__file__).resolve().parents[1]


def study(**kw) -> StudyConfig:
    base = dict(preset="tiny", model_overrides=dict(TRAIN_MODEL), tokens=32 * 8 * 3, seq_len=32, batch_size=8,
                seeds=(0, 1), eval_every=1, eval_tasks=("bpb",))
    base.update(kw)
    return StudyConfig(**base)


# ---------------------------------------------------------------------------------------------------- plan
def test_variants_differ_only_in_their_switch():
    cfg = study()
    runs = {r.name: r for r in plan(cfg)}
    full = train_config(cfg, runs["full-s0"], "x")
    full_model = model_config(cfg, VARIANTS["full"]).to_dict()
    for name in ("no_dense", "no_transformerx", "no_mtp", "llama"):
        other = train_config(cfg, runs[f"{name}-s0"], "x")
        assert {k for k in full if full[k] != other[k]} == ({"arch"} if name == "llama" else {"model_overrides"})
        changed = {k for k, v in model_config(cfg, VARIANTS[name]).to_dict().items() if full_model[k] != v}
        assert changed == set(VARIANTS[name].switch) | ({"mtp_loss_weights"} if name == "no_mtp" and
                                                         full_model["mtp_loss_weights"] else set())


def test_seeds_differ_only_in_the_seed():
    cfg = study(seeds=(0, 7))
    runs = {r.name: r for r in plan(cfg)}
    a, b = train_config(cfg, runs["full-s0"], "x"), train_config(cfg, runs["full-s7"], "x")
    assert {k for k in a if a[k] != b[k]} == {"seed"}


def test_equal_flops_runs_get_the_full_models_compute():
    cfg = study(match="both", seeds=(0,))
    runs = plan(cfg)
    full = next(r for r in runs if r.variant == "full")
    flops_runs = [r for r in runs if r.match == "flops"]
    assert {r.variant for r in flops_runs} == {"no_transformerx", "no_mtp", "llama"}  # no_dense: same FLOPs
    for r in flops_runs:
        assert r.flops_per_token < full.flops_per_token
        assert r.tokens * r.flops_per_token == pytest.approx(full.tokens * full.flops_per_token, rel=1e-3)
    assert [r.name for r in runs if r.match == "tokens"] == [f"{v}-s0" for v in VARIANTS]
    only = plan(study(match="tokens"))
    assert all(r.tokens == cfg.tokens for r in only) and len(only) == 2 * len(VARIANTS)


@pytest.mark.parametrize("kw, message", [
    ({"variants": ("full", "bogus")}, "bogus"),
    ({"seeds": (0, 0)}, "distinct seeds"),
    ({"match": "flops", "variants": ("llama",)}, "include variant full"),
    ({"model_overrides": {"d_model": 30}}, "d_model"),
])
def test_invalid_studies_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        plan(study(**kw))


# ---------------------------------------------------------------------------------------------- aggregation
def fake_run(variant: str, seed: int, loss: float, match: str = "tokens") -> dict:
    return {"spec": {"variant": variant, "seed": seed, "match": match, "flops_per_token": 1e6, "tokens": 100},
            "val_loss": loss, "params": 1000, "tokens": 100, "tokens_per_s": 10.0, "curve": [],
            "eval": [{"task": "bpb", "metric": "bpb", "value": loss / 2}]}


def test_aggregation_means_sds_and_paired_deltas():
    runs = [fake_run("full", 0, 3.0), fake_run("full", 1, 3.2), fake_run("llama", 0, 2.9), fake_run("llama", 1, 3.3),
            fake_run("llama", 0, 2.5, "flops"), fake_run("llama", 1, 2.7, "flops")]
    rows = {(r["match"], r["variant"]): r for r in aggregate(runs)}
    full, llama = rows[("tokens", "full")], rows[("tokens", "llama")]
    assert full["metrics"]["val_loss"] == pytest.approx((3.1, statistics.stdev([3.0, 3.2])))
    assert full["metrics"]["bpb bpb"][0] == pytest.approx(1.55)
    assert llama["delta_vs_full"] == pytest.approx((0.0, statistics.stdev([-0.1, 0.1])))
    assert full["delta_vs_llama"][0] == pytest.approx(0.0)
    # equal FLOPs: the full model's own run is the reference
    assert rows[("flops", "llama")]["delta_vs_full"][0] == pytest.approx(-0.5)
    assert rows[("flops", "full")]["n"] == 2
    assert mean_sd([1.0]) == (1.0, None) and mean_sd([]) == (None, None)


def test_the_report_names_the_studys_settings():
    rows = aggregate([fake_run("full", 0, 3.0)])
    assert "Every variant with" not in markdown(rows, StudyConfig())
    text = markdown(rows, StudyConfig(model_overrides={"mtp_depth": 0, "dense_residual": False,
                                                      "conv_kernel_sizes": (3, 15)}, dense_lr_mult=10.0))
    assert "`mtp_depth=0 dense_residual=false conv_kernel_sizes=3,15 dense_lr_mult=10.0`" in text


@pytest.mark.slow
def test_plots_draw_only_the_studys_comparisons(tmp_path):
    pytest.importorskip("matplotlib")
    from kunlunbaize.ablate.report import plot

    def width(png: Path) -> int:  # from the PNG header (IHDR)
        return int.from_bytes(png.read_bytes()[16:20], "big")

    curve = [[0, 6.0], [100, 5.0]]
    runs = [dict(fake_run(v, s, 3.0 + s / 10, m), curve=curve) for v, m in (("full", "tokens"), ("llama", "tokens"),
                                                                           ("llama", "flops")) for s in (0, 1)]
    widths = {}
    for name, part in (("tokens", [r for r in runs if r["spec"]["match"] == "tokens"]), ("both", runs)):
        (tmp_path / name).mkdir()
        paths = plot(part, aggregate(part), tmp_path / name)
        widths[name] = {p.name: width(p) for p in paths}
    for png in ("ablation_curves.png", "ablation_bars.png"):  # an equal-token study: one panel, not an empty second
        assert widths["tokens"][png] == pytest.approx(widths["both"][png] / 2, rel=0.02)


# --------------------------------------------------------------------------------------------- the study
@pytest.mark.slow
@pytest.mark.subprocess
def test_a_study_runs_resumes_and_reports(dataset, tmp_path, capsys):
    """Two variants + the equal-FLOPs run, two at a time in worker processes; the report aggregates the runs' own
    numbers; a second invocation reruns nothing, a run that lost its done.json is redone, and a changed setting is
    refused. One seed: each run is a worker process (~8 CPU-s); the means, SDs and paired deltas over seeds are
    test_aggregation_means_sds_and_paired_deltas's."""
    cfg = study(out=str(tmp_path / "study"), data=str(dataset), variants=("full", "no_mtp"), jobs=2, seeds=(0,))
    said: list[str] = []
    result = run_study(cfg, log=said.append)
    assert result["ran"] == ["full-s0", "no_mtp-s0", "no_mtp-flops-s0"]
    done = {n: json.loads((tmp_path / "study" / "runs" / n / "done.json").read_text()) for n in result["ran"]}
    assert done["no_mtp-flops-s0"]["tokens"] > done["no_mtp-s0"]["tokens"]
    assert all(math.isfinite(d["val_loss"]) and d["eval"][0]["metric"] == "bpb" for d in done.values())
    report = json.loads((tmp_path / "study" / "ablation.json").read_text())
    rows = {(r["match"], r["variant"]): r for r in report["rows"]}
    assert rows[("tokens", "no_mtp")]["delta_vs_full"][0] == pytest.approx(
        done["no_mtp-s0"]["val_loss"] - done["full-s0"]["val_loss"])
    assert rows[("tokens", "full")]["metrics"]["val_loss"][0] == pytest.approx(done["full-s0"]["val_loss"])
    md = (tmp_path / "study" / "ablation.md").read_text()
    assert "equal tokens" in md and "equal training FLOPs" in md and "− MTP" in md
    for plot in ("ablation_curves.png", "ablation_bars.png"):
        assert (tmp_path / "study" / plot).stat().st_size > 0
    assert not (tmp_path / "study" / "ablation_gap.png").exists()  # no Llama in this study: no gap to plot

    again = run_study(cfg, log=said.append)
    assert again["ran"] == [] and len(again["skipped"]) == 3

    # scripts/save_study.sh keeps the records without checkpoints; restored on a "new machine" (the study folder
    # gone), every run counts as done and the report is the same
    kept = tmp_path / "kept"
    subprocess.run(["bash", str(ROOT / "scripts" / "save_study.sh"), cfg.out, str(kept)], check=True,
                   capture_output=True)
    assert not list(kept.rglob("*.pt")) and not list(kept.rglob("checkpoints"))
    shutil.rmtree(cfg.out)
    shutil.copytree(kept / "runs", tmp_path / "study" / "runs")
    restored = run_study(cfg, log=said.append)
    assert restored["ran"] == [] and len(restored["skipped"]) == 3
    assert json.loads((tmp_path / "study" / "ablation.json").read_text())["rows"] == report["rows"]
    (tmp_path / "study" / "runs" / "no_mtp-s0" / "done.json").unlink()  # killed after training, before the end
    overrides = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TRAIN_MODEL.items()]
    code, out, err = run_main(capsys, "ablate", "--dry-run", "--out", cfg.out, "--data", cfg.data, "--preset", "tiny",
                              "--set", *overrides, "--tokens", str(cfg.tokens), "--seq-len", "32", "--batch-size",
                              "8", "--seeds", "0", "--eval-every", "1", "--eval", "bpb", "--variants", "full,no_mtp")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines() if not line.endswith("done")] == ["no_mtp-s0"]
    assert run_study(cfg, log=said.append)["ran"] == ["no_mtp-s0"]
    with pytest.raises(StudyError, match=r"other settings \(lr\)"):
        run_study(study(out=cfg.out, data=cfg.data, variants=("full", "no_mtp"), seeds=(0,), lr=1e-4),
                  log=said.append)


def test_kunlun_ablate_dry_run_and_errors(capsys):
    code, out, err = run_main(capsys, "ablate", "--dry-run", "--seeds", "0", "--variants", "full,llama")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()] == ["full-s0", "llama-s0", "llama-flops-s0"]
    code, _, err = run_main(capsys, "ablate", "--dry-run", "--variants", "full,nope")
    assert code == 2 and "argument --variants: unknown variant 'nope'" in err and "Traceback" not in err


def test_dense_lr_mult_reaches_the_runs_only_when_set():
    spec = plan(study(seeds=(0,)))[0]
    assert "dense_lr_mult" not in train_config(study(), spec, "x")  # specs of earlier studies stay valid
    assert train_config(study(dense_lr_mult=10.0), spec, "x")["dense_lr_mult"] == 10.0
    with pytest.raises(ValueError, match="dense_lr_mult"):
        plan(study(dense_lr_mult=0.0))


def test_a_missing_dataset_is_reported_before_any_run(tmp_path):
    with pytest.raises(StudyError, match="no prepared dataset at"):
        run_study(study(out=str(tmp_path / "s"), data=str(tmp_path / "nothing"), variants=("full",), seeds=(0,)),
                  log=lambda m: None)
    assert not list((tmp_path / "s" / "runs" / "full-s0").glob("worker.log"))


def test_probe_measures_each_branch():
    """branch_scales reports every block's branches; a cross-attention whose output projection is zero reads 0, the
    others do not; a plain block has one MLP and no conv scales; β is read from the eSwish modules."""
    import torch

    from kunlunbaize import KunlunBaize
    from kunlunbaize.ablate.probe import branch_scales, format_rows

    from .helpers import tiny

    torch.manual_seed(0)
    model = KunlunBaize(tiny(n_layers=2, conv_kernel_sizes=(3, 5))).eval()
    with torch.no_grad():
        model.blocks[1].cross_attns[0].wo.weight.zero_()
        model.blocks[0].mlps[1].act.beta.fill_(2.0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    rows = branch_scales(model, tokens)
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[1]["cross_attn"][0] == 0 and rows[1]["cross_attn"][1] > 0
    assert all(v > 0 for r in rows for v in [r["input"], r["self_attn"], *r["mlp"], *r["conv"]])
    assert rows[0]["mlp_beta"] == [1.0, 2.0] and rows[0]["conv_beta"] == [1.0, 1.0]
    assert "| 1 |" in format_rows("tiny", rows)
    plain = branch_scales(KunlunBaize(tiny(n_layers=2, transformerx=False)).eval(), tokens)
    assert len(plain[0]["mlp"]) == 1 and plain[0]["cross_attn"] == [] and plain[0]["conv"] == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_the_kept_records_of_the_study_still_give_its_table():
    """results/ keeps only the raw records; the figures docs/reports/ABLATION.md quotes come back from them."""
    from kunlunbaize.ablate.report import collect

    folder = Path(__file__).resolve().parents[1] / "results" / "ablation-500k"
    cfg = StudyConfig(out=str(folder), eval_tasks=("bpb", "arith", "arith-mc"), eval_limit=200, match="both")
    runs = collect(cfg)
    assert len(runs) == 24
    rows = {(r["match"], r["variant"]): r for r in aggregate(runs)}
    assert round(rows["tokens", "full"]["metrics"]["val_loss"][0], 4) == 4.8904
    assert round(rows["tokens", "no_dense"]["delta_vs_full"][0], 4) == 0.1347
    assert round(rows["flops", "llama"]["delta_vs_full"][0], 4) == -0.3670
