"""lm-evaluation-harness through ``kunlun eval``: the example local tasks, rows folded into the table, and the
real ``lm_eval`` command line scoring a local task exactly as ``kunlun eval`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kunlunbaize.eval.arith import arith_mc_problems, arith_problems

from .test_cli_errors import run_main

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "examples" / "tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_arith_mc_problems_are_pinned_and_well_formed():
    problems = arith_mc_problems("test")
    assert problems[:2] == [
        {"id": "arith-mc-test-0", "question": "What is (11 + 20) - 5?", "choices": ["-26", "26", "62", "36"],
         "answer": 1, "level": 2},
        {"id": "arith-mc-test-1", "question": "What is 11 - 92?", "choices": ["81", "-79", "-81", "-80"],
         "answer": 2, "level": 0}]
    gen = arith_problems("test")
    positions = [0, 0, 0, 0]
    for p, g in zip(problems, gen, strict=True):
        assert len(set(p["choices"])) == 4
        assert p["choices"][p["answer"]] == g["answer"]
        assert f"Question: {p['question']}\nAnswer:" == g["prompt"]
        positions[p["answer"]] += 1
    assert min(positions) > 100  # about 125 each
    assert arith_mc_problems("train", n=5) != arith_mc_problems("train", n=5, seed=1)


@pytest.mark.subprocess
def test_the_example_task_files_equal_a_fresh_generation(tmp_path):
    import shutil

    for name in ("make_arith.py", "kunlun_arith_mc.yaml"):
        shutil.copy(TASKS / name, tmp_path / name)
    subprocess.run([sys.executable, str(tmp_path / "make_arith.py")], check=True, capture_output=True)
    for name in ("arith.jsonl", "arith-mc.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASKS / name).read_bytes(), name


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    from kunlunbaize.cli import main

    out = tmp_path_factory.mktemp("export") / "hf"
    main(["export", "--hf", str(out), "--checkpoint", str(trained_run)])
    return out


@pytest.fixture
def at_root(monkeypatch):
    """The example YAMLs name their data relative to the repository root, as `datasets` resolves them."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(ROOT)
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def test_tasks_of_the_include_path_alone_skip_lm_evals_own_index():
    """Indexing lm-eval's own ~15,000 task YAMLs costs seconds: tasks all found in --include-path are run without."""
    pytest.importorskip("lm_eval")
    from kunlunbaize.eval.harness import task_manager

    manager = task_manager(["kunlun_arith_mc", "kunlun_arith_gen"], TASKS)
    assert set(manager.all_tasks) == {"kunlun_arith_mc", "kunlun_arith_gen"}


@pytest.mark.slow
def test_run_lm_eval_on_a_training_run_and_on_its_export(trained_run, exported, at_root):
    from kunlunbaize.eval.harness import run_lm_eval

    rows, raw = run_lm_eval(trained_run, ["kunlun_arith_mc"], include_path=TASKS, limit=8, batch_size=4)
    got = {r["metric"]: r for r in rows}
    assert set(got) == {"acc", "acc_norm"}
    for name, r in got.items():
        assert r["value"] == raw["results"]["kunlun_arith_mc"][f"{name},none"]
        assert 0.0 <= r["value"] <= 1.0 and r["n"] == 8 and r["source"] == "lm-eval"
    again, _ = run_lm_eval(exported, ["kunlun_arith_mc"], include_path=TASKS, limit=8, batch_size=2)
    assert [r["value"] for r in again] == [r["value"] for r in rows]


@pytest.mark.slow
def test_generation_task_and_unknown_names(trained_run, at_root):
    from kunlunbaize.eval.harness import run_lm_eval

    rows, _ = run_lm_eval(trained_run, ["kunlun_arith_gen"], include_path=TASKS, limit=3, batch_size=3)
    assert [r["metric"] for r in rows] == ["exact_match (last_integer)"]
    with pytest.raises(ValueError, match=r"no task 'kunlun_arith_mcc' \(did you mean kunlun_arith_mc"):
        run_lm_eval(trained_run, ["kunlun_arith_mcc"], include_path=TASKS)


@pytest.mark.slow
def test_the_llama_baseline_runs_through_lm_eval(llama_run, at_root):
    from kunlunbaize.eval.harness import run_lm_eval

    rows, _ = run_lm_eval(llama_run, ["kunlun_arith_mc"], include_path=TASKS, limit=4, batch_size=4)
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"}


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_lm_eval_command_line_and_kunlun_eval_agree(trained_run, exported, tmp_path, capsys, at_root):
    """The real `lm_eval` CLI on an export over the example multiple-choice file reports exactly the accuracy
    `kunlun eval --task mc=FILE` computes on the same file (same contexts, continuations and length rule)."""
    n = 40
    cmd = [sys.executable, "-m", "kunlunbaize.lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={exported},backend=causal", "--tasks", "kunlun_arith_mc", "--include_path", str(TASKS),
           "--limit", str(n), "--batch_size", "8", "--output_path", str(tmp_path / "lm")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (results,) = (tmp_path / "lm").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]["kunlun_arith_mc"]

    code, _, err = run_main(capsys, "eval", "--checkpoint", str(trained_run), "--task",
                            "mc=examples/tasks/arith-mc.jsonl", "--few-shot", "0", "--limit", str(n), "--out",
                            str(tmp_path / "ours"), "--no-progress")
    assert code == 0, err
    ours = {r["metric"]: r["value"] for r in json.loads((tmp_path / "ours" / "summary.json").read_text())["rows"]}
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # a real score, not a degenerate one


@pytest.mark.slow
def test_kunlun_eval_folds_lm_eval_rows_into_its_table(trained_run, tmp_path, capsys, at_root):
    code, out, err = run_main(capsys, "eval", "--checkpoint", str(trained_run), "--task", "arith", "--lm-eval",
                              "kunlun_arith_mc", "--include-path", "examples/tasks", "--limit", "4", "--out",
                              str(tmp_path / "res"), "--no-progress")
    assert code == 0, err
    rows = json.loads((tmp_path / "res" / "summary.json").read_text())["rows"]
    assert [(r["task"], r["source"]) for r in rows][-2:] == [("kunlun_arith_mc", "lm-eval")] * 2
    assert "kunlun_arith_mc" in out and "lm-eval" in out
    assert (tmp_path / "res" / "lm_eval.json").is_file()


@pytest.mark.slow
def test_a_task_needing_a_missing_package_says_which(trained_run, at_root):
    """lm-eval's RULER tasks import `wonderwords` from their YAML; without it the error names the package. The
    tasks are read from lm-eval's own ruler folder alone (as --include-path): the same YAMLs, without indexing
    lm-eval's ~15,000 others (a minute of CPU, twice)."""
    import importlib.util

    if importlib.util.find_spec("wonderwords") is not None:
        pytest.skip("wonderwords is installed here: the ruler tasks load")
    import lm_eval

    from kunlunbaize.eval.harness import run_lm_eval

    ruler = Path(lm_eval.__file__).parent / "tasks" / "ruler"
    with pytest.raises(ValueError, match=r"ruler_vt cannot load: .*wonderwords"):
        run_lm_eval(trained_run, ["ruler_vt"], include_path=ruler, limit=1, metadata={"max_seq_lengths": [128]})
