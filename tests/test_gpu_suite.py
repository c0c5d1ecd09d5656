"""benchmarks/gpu_suite.sh: the CPU smoke run covers every section end to end; a failing or overlong section is
reported without stopping the others, and a failed correctness check gives a non-zero exit status."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
SECTIONS = ["corpus", "correctness", "train_throughput", "dense_residual", "decode", "cli_train"]

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def load_suite():
    """benchmarks/gpu_suite.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """benchmarks/gpu_suite.sh with ``args``; the timeout only catches a hang (a loaded machine takes minutes)."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def numbers(obj) -> list[float]:
    """Every finite number inside a JSON value."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj] if math.isfinite(obj) else []
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    return []


@pytest.mark.slow
@pytest.mark.subprocess
def test_cpu_smoke_runs_every_section(tmp_path):
    """Budgets scaled by 6: they are the GPU run's alarms, tested below; here a loaded CI machine beside other tests
    took 26 s for the corpus section's 25 s."""
    out = tmp_path / "suite.json"
    proc = run_script("--cpu-smoke", "--budget-scale", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-smoke" and doc["correctness_passed"] is True
    assert list(doc["sections"]) == SECTIONS
    for name, sec in doc["sections"].items():
        assert sec["status"] == "ok", (name, sec["reason"], sec["notes"])
        assert numbers(sec["figures"]), name
    s = doc["sections"]
    assert s["correctness"]["checks"] == {"cache_fp32": True, "speculative_greedy": True, "cache_bf16": True}
    spec = s["correctness"]["figures"]["speculative"]
    assert spec["identical"] == spec["runs"] > 0
    assert s["correctness"]["figures"]["cache_fp32"]["relative"] <= 1e-4
    for model in ("KunlunBaize", "HF Llama (matched)"):
        fig = s["train_throughput"]["figures"][model]
        assert fig["tokens_per_s"] > 0 and fig["mfu"] > 0 and fig["train_flops_per_token"] > 0
    assert s["train_throughput"]["figures"]["mfu_ratio"] > 0
    assert s["dense_residual"]["figures"]["ratio"] > 0 and s["dense_residual"]["figures"]["n_layers"] == 4
    decode = s["decode"]["figures"]
    assert {"plain cached greedy", "plain greedy, static compiled (eager)",
            "HF generate (exported model)"} <= set(decode)
    assert all(v["identical_to_plain"] for k, v in decode.items() if k != "setup")
    assert s["corpus"]["figures"]["train_tokens"] > 0
    train = s["cli_train"]["figures"]
    assert train["tokens_per_s"] > 0 and math.isfinite(train["val_loss"])
    assert train["val_loss"] < train["first_val_loss"]
    for title in ("1. correctness", "2. training throughput", "3. dense residual overhead", "4. decoding",
                  "5a. corpus", "5b. kunlun train"):
        assert f"| {title}" in proc.stdout
    assert "| section | measurement | value | status |" in proc.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_failing_section_is_reported_and_the_others_run(tmp_path):
    """An injected failure in the correctness section: reported as FAILED, the next section (the dense residual's,
    the cheapest: no Hugging Face import) still runs, exit status 1. The script runs as its own process: its
    sections' time budgets are alarms, which must not interrupt an import in the test's own interpreter."""
    out = tmp_path / "suite.json"
    proc = run_script("--cpu-smoke", "--sections", "correctness", "dense_residual", "--fail-section", "correctness",
                      "--out", str(out), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert list(doc["sections"]) == ["correctness", "dense_residual"] and doc["correctness_passed"] is False
    assert doc["sections"]["correctness"]["status"] == "FAILED"
    assert "injected" in doc["sections"]["correctness"]["reason"]
    assert doc["sections"]["dense_residual"]["status"] == "ok"
    assert "FAILED: RuntimeError: failure injected" in proc.stdout


@pytest.mark.slow
def test_section_runner_time_box_and_errors():
    suite = load_suite()

    def slow(sec):
        sec.figures["before"] = 1.0
        time.sleep(30)

    t0 = time.monotonic()
    sec = suite.run_section(suite.Section("slow", "slow", budget_s=1.5), slow)
    assert time.monotonic() - t0 < 10
    assert sec.status == "SKIPPED" and "budget" in sec.reason and sec.figures == {"before": 1.0}

    def broken(sec):
        raise ValueError("bad shape")

    sec = suite.run_section(suite.Section("broken", "broken", budget_s=5), broken)
    assert sec.status == "FAILED" and sec.reason == "ValueError: bad shape"

    sec = suite.run_section(suite.Section("late", "late", budget_s=0), lambda s: None)
    assert sec.status == "SKIPPED" and "no time left" in sec.reason

    ok = suite.Section("correctness", "1. correctness", budget_s=5)
    ok.check("a", True, "a", "1")
    assert suite.correctness_passed({"correctness": ok}) is True
    ok.check("b", False, "b", "2")
    assert suite.correctness_passed({"correctness": ok}) is False
    assert suite.correctness_passed({}) is None
    table = suite.markdown({"correctness": ok, "decode": sec}, {
        "mode": "test", "device_name": "x", "torch": "t", "transformers": "t", "wall_s": 1.0, "time_limit_s": 2.0,
        "correctness_passed": False})
    assert "| 1. correctness | b | 2 | FAIL |" in table and "correctness FAILED" in table
