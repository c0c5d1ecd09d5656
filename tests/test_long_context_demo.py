"""benchmarks/long_context.py (the long-context demonstration's driver) and its report: the stages' plan, the job
queue, the report's tables."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def lc():
    return _module("long_context")


def test_the_plan_extends_each_method_to_2k_then_4k_from_the_previous_stage(lc, tmp_path):
    args = lc.parse_args(["--parent", "P", "--out", str(tmp_path), "--methods", "none,yarn", "--steps", "2"])
    jobs = {j.name: j for j in lc.plan_jobs(args, ["none", "yarn"])}
    names = list(jobs)
    assert names[:2] == ["train-none-2k", "train-yarn-2k"]
    assert names.index("eval-yarn-2k-position") < names.index("train-none-4k") < names.index("eval-parent-ruler")
    four = jobs["train-yarn-4k"]
    assert four.needs == ("train-yarn-2k",)
    cmd = four.cmd
    assert cmd[cmd.index("--init-from") + 1] == str(tmp_path / "yarn-2k") and cmd[cmd.index("--rope") + 1] == "yarn"
    assert cmd[cmd.index("--seq-len") + 1] == "4096" and cmd[cmd.index("--tokens") + 1] == str(2 * 4096)
    assert jobs["train-none-2k"].cmd[jobs["train-none-2k"].cmd.index("--init-from") + 1] == "P"
    position = jobs["eval-yarn-4k-position"].cmd
    assert position[position.index("--lengths") + 1] == "4096" and "eval-yarn-2k-ruler" not in jobs  # last stage only
    assert position[position.index("--per-length") + 1] == "4"  # 16K tokens of 4K windows
    parent = jobs["eval-parent-position-2048"].cmd
    assert parent[parent.index("--per-length") + 1] == "8" and "eval-parent-position-256" in jobs


def test_the_queue_drops_the_jobs_whose_need_failed_and_runs_the_rest(lc, tmp_path):
    args = lc.parse_args(["--out", str(tmp_path), "--lanes", "2"])
    jobs = [lc.Job("train-a", ["false"], tmp_path / "a" / "summary.json"),
            lc.Job("eval-a-position", ["true"], tmp_path / "ea" / "summary.json", ("train-a",)),
            lc.Job("eval-b-position", ["true"], tmp_path / "eb" / "summary.json"),
            lc.Job("eval-c-position", ["true"], tmp_path / "ec" / "summary.json")]
    (tmp_path / "ec").mkdir()
    (tmp_path / "ec" / "summary.json").write_text("{}")  # done already: skipped
    lc.run_jobs(args, jobs, tmp_path)
    records = [json.loads(ln) for ln in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert sorted((r["stage"], r["rc"]) for r in records) == [("eval-b-position", 0), ("train-a", 1)]
    assert all(r["wall_s"] >= 0 and "load_start" in r and r["threads"] == 1 for r in records)


def test_the_report_averages_position_ranges_and_tabulates_the_ruler_by_length(tmp_path):
    report = _module("long_context_report")
    curve = {"starts": [0, 128, 256, 2048], "ends": [128, 256, 2048, 4096], "loss": [4.0, 5.0, 6.0, 7.0],
             "windows": 1}
    assert report.range_loss(curve, 0, 256) == pytest.approx(4.5)
    assert report.range_loss(curve, 256, 2048) == pytest.approx(6.0) and report.range_loss(curve, 1, 2) is None
    out = tmp_path / "runs"
    for name, scores in (("parent", {"256": 1.0}), ("yarn-4k", {"256": 0.0, "4096": 1.0})):
        (out / "eval" / name / "ruler").mkdir(parents=True)
        (out / "eval" / name / "ruler" / "summary.json").write_text(json.dumps(
            {"tasks": [{"ruler": {"scores": {"passkey": scores}}}]}))
    (out / "eval" / "yarn-4k" / "position").mkdir()
    (out / "eval" / "yarn-4k" / "position" / "summary.json").write_text(json.dumps(
        {"tasks": [{"position_loss": {"curves": {"4096": curve}}}]}))
    (out / "eval" / "parent" / "position").mkdir()
    (out / "eval" / "parent" / "position" / "summary.json").write_text(json.dumps(
        {"tasks": [{"position_loss": {"curves": {"4096": {**curve, "loss": [4.0, 5.0, 6.5, 7.25]}}}}]}))
    report.write_report(out, tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| parent | 1.00 | — | 1.00 |" in text and "| yarn-4k | 0.00 | 1.00 | 0.50 |" in text
    assert "| yarn-4k | 1 × 4K | — | 4.500 | 6.000 | 7.000 | 0.500 |" in text
    assert "| yarn-4k | +0.000 | -0.500 | -0.250 |" in text  # against the parent on the same tokens
    assert "| positions | parent | yarn-4k |" in text and (tmp_path / "rep" / "position_4096.png").is_file()


def test_skipping_a_stage_drops_what_needs_it(lc, tmp_path):
    args = lc.parse_args(["--out", str(tmp_path), "--skip", "train-yarn-2k"])
    names = [j.name for j in lc.plan_jobs(args, ["none", "yarn"])]
    assert not [n for n in names if "yarn" in n] and "train-none-4k" in names and "eval-none-4k-ruler" in names


def test_token_budgets_and_the_control_stage_train_the_parent_at_its_own_context_for_the_same_tokens(lc, tmp_path):
    args = lc.parse_args(["--parent", "P", "--out", str(tmp_path), "--tokens-2k", "49152", "--tokens-4k", "49152",
                          "--warmup-steps", "2", "--control", "--nice", "0"])
    jobs = {j.name: j for j in lc.plan_jobs(args, ["yarn"])}

    def flag(job: str, name: str) -> str:
        cmd = jobs[job].cmd
        return cmd[cmd.index(name) + 1]

    assert [flag("train-yarn-2k", f) for f in ("--seq-len", "--tokens", "--batch-size", "--warmup-steps")] == \
        ["2048", "49152", "1", "2"]
    assert [flag("train-control-2k", f) for f in ("--seq-len", "--rope", "--tokens", "--batch-size", "--init-from")] \
        == ["256", "none", "49152", "8", "P"]  # 8 × 256 tokens a step: the 2K stage's steps and tokens
    assert flag("train-control-4k", "--batch-size") == "16" and jobs["train-control-4k"].needs == ("train-control-2k",)
    assert flag("train-control-4k", "--init-from") == str(tmp_path / "control-2k")
    assert flag("eval-control-2k-position-2048", "--lengths") == "2048" and "eval-control-2k-position-256" in jobs
    assert "eval-control-4k-position-4096" in jobs and "eval-control-4k-ruler" in jobs
    names = list(jobs)  # the 2K stages, the control's and the parent's evaluations before any 4K stage
    assert names.index("eval-parent-position-2048") < names.index("train-yarn-4k")
    assert names.index("eval-control-2k-position-2048") < names.index("train-yarn-4k")
    assert "train-control-2k" not in {j.name for j in lc.plan_jobs(lc.parse_args(["--out", str(tmp_path)]), ["yarn"])}


def test_stages_run_at_the_niceness_asked_for(lc, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(lc.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or type("R", (), {"returncode": 0}))
    lc.run_stage(lc.parse_args(["--nice", "0"]), "train-x", ["true"], tmp_path)
    lc.run_stage(lc.parse_args([]), "train-y", ["true"], tmp_path)
    assert seen == [["nice", "-n", "0", "true"], ["nice", "-n", "5", "true"]]


def test_the_report_sets_each_extension_against_its_control_range_by_range_and_bucket_by_bucket(tmp_path):
    report = _module("long_context_report")
    assert report.control_of("yarn-4k") == "control-4k" and report.control_of("control-2k") is None
    assert report.control_of("parent") is None
    out = tmp_path / "runs"
    starts, ends = [0, 128, 256, 2048], [128, 256, 2048, 4096]
    for name, loss in (("parent", [4.0, 5.0, 6.5, 7.25]), ("control-4k", [3.5, 4.5, 6.25, 7.0]),
                       ("yarn-4k", [4.0, 5.0, 6.0, 7.0])):
        (out / "eval" / name / "position").mkdir(parents=True)
        (out / "eval" / name / "position" / "summary.json").write_text(json.dumps({"tasks": [{"position_loss": {
            "curves": {"4096": {"starts": starts, "ends": ends, "loss": loss, "windows": 1}}}}]}))
    for name, windows in (("control-4k", ([6.0] * 4, [6.5] * 4)), ("yarn-4k", ([5.75] * 4, [6.0] * 4))):
        (out / "eval" / name / "position" / "position-loss").mkdir()  # per window: paired differences -0.25, -0.5
        (out / "eval" / name / "position" / "position-loss" / "records.jsonl").write_text("\n".join(json.dumps(
            {"window": w, "length": 4096, "edges": [*starts, 4096], "loss": loss}) for w, loss in enumerate(windows)))
    (out / "yarn-4k").mkdir()
    (out / "yarn-4k" / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"step": i, "loss": 6.0, "main_loss": v, "tokens_per_s": 100.0}) for i, v in enumerate((5.5, 5.0), 1)))
    report.write_report(out, tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    control = text.split("## Against the control")[1].split("##")[0]
    assert "| yarn-4k | +0.500 | -0.250 | +0.000 |" not in control  # the curves' difference, ± the windows' spread
    assert "| yarn-4k | +0.500 ± 0.125 | -0.250 ± 0.125 | +0.000 ± 0.125 |" in control
    assert "| control-4k |" not in control
    assert "| control-4k | -0.500 | -0.250 | -0.250 |" in text.split("## Against the parent")[1]
    assert "| 256–2047 | -0.250 |" in text.split("## Against control-4k by position")[1]
    assert "| yarn-4k | 2 | 5.500 | 5.000 | 100 |" in text
    assert (tmp_path / "rep" / "position_control_gain_4096.png").is_file()
