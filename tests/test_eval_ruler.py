"""The long-context suite (``kunlun eval --task ruler``): generation at exact lengths, needle depths, scoring
through the real runner with models that know or do not know the answer, clipping, bad input, end to end."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from kunlunbaize.eval import ruler
from kunlunbaize.eval.model import Generated
from kunlunbaize.eval.ruler import FILLER, NEEDLE, SUITE, RulerError, make_sample
from kunlunbaize.eval.runner import TaskRunner
from kunlunbaize.eval.tasks import TaskError, make_task

from .test_cli_errors import run_main

pytest.importorskip("tokenizers")

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled "
        "cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, had been "
        "tacked to the wall. " * 40)


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (the project's own trainer), as a checkpoint or dataset would hold it."""
    from kunlunbaize.data.tokenizer import train_tokenizer

    return train_tokenizer([TEXT, FILLER * 5, NEEDLE], vocab_size=400)


@pytest.fixture(scope="module")
def count(tokenizer):
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


SENTENCES = [s.strip() + "." for s in TEXT.split(".") if s.strip()]


# ------------------------------------------------------------------------------------------------ generator
def test_the_generator_is_deterministic_for_a_seed(count):
    for name in ("niah_multikey_2", "vt", "cwe", "fwe", "niah_single_2"):
        a = make_sample(name, 2000, 3, count, seed=7, sentences=SENTENCES)
        assert a == make_sample(name, 2000, 3, count, seed=7, sentences=SENTENCES)
        assert a["prompt"] != make_sample(name, 2000, 3, count, seed=8, sentences=SENTENCES)["prompt"]
        assert a["prompt"] != make_sample(name, 2000, 4, count, seed=7, sentences=SENTENCES)["prompt"]


@pytest.mark.parametrize("length", [1700, 3000])
def test_every_task_hits_the_exact_token_length(count, length):
    for name in SUITE:
        sample = make_sample(name, length, 0, count, sentences=SENTENCES)
        assert count(sample["prompt"]) == length - SUITE[name].budget == sample["prompt_tokens"], name


def test_exact_lengths_hold_through_a_chat_template_and_another_answer_budget(count):
    wrap = "<|user|>\n{}<|end|>\n<|assistant|>\n".format
    for name in ("niah_single_1", "vt", "cwe"):
        sample = make_sample(name, 1700, 1, count, budget=20, wrap=wrap)
        assert sample["prompt"].startswith("<|user|>\n") and count(sample["prompt"]) == 1680


@pytest.mark.parametrize("name", ["niah_single_1", "niah_multikey_2", "passkey", "vt"])
def test_needles_sit_at_the_depth_the_record_gives(count, name):
    """A needle at depth d follows int(n * d / 100) of the n haystack units (RULER's rule)."""
    for index in range(6):
        sample = make_sample(name, 1200, index, count, sentences=SENTENCES)
        n, prompt = sample["haystack_units"], sample["prompt"]
        context = prompt[prompt.index("\n", prompt.rindex("following text") if name == "vt" else 0) + 1:]
        assert len(sample["needles"]) == len(sample["depths"]) >= 1
        for needle, depth in zip(sample["needles"], sample["depths"], strict=True):
            before = context[:context.index(needle)]
            others = sum(before.count(x) for x in sample["needles"] if x != needle)
            units = before.count(FILLER) if name != "niah_multikey_2" else before.count("\n") - others
            assert units == int(n * depth / 100), (name, index, depth)


def test_validation_text_of_code_with_non_ascii_characters_still_gives_exact_lengths(count):
    """Code makes long runs without a sentence end, and a character of several bytes can add two tokens at once
    (stepping over the target): the units are cut to 50 words and the top-up falls back to the filler."""
    import sysconfig

    code = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    sentences = ruler.valtext_sentences(code.replace("e", "é", 200).replace("a", "日", 100))
    assert max(len(s.split(" ")) for s in sentences) <= 50
    for length in (1100, 1500, 2100):
        for name in ("niah_single_2", "niah_multikey_1"):
            for index in range(4):
                sample = make_sample(name, length, index, count, sentences=sentences, budget=16)
                assert count(sample["prompt"]) == length - 16


def test_the_needle_value_is_the_answer_and_appears_once(count):
    sample = make_sample("niah_single_3", 1500, 0, count, sentences=SENTENCES)
    (value,) = sample["answer"]
    assert sample["prompt"].count(value) == 1 and re.fullmatch(r"[0-9a-f-]{36}", value)
    vt = make_sample("vt", 1500, 0, count)
    assert len(vt["answer"]) == 5 and all(f"VAR {v} =" in vt["prompt"] for v in vt["answer"])


# ------------------------------------------------------------------------------------------ oracle models
def _oracle_answer(prompt: str) -> str:
    """What a model that reads the haystack right answers: found in the prompt alone, never in the record."""
    question = prompt[prompt.rfind("\n"):]
    if "pass key" in question:
        return re.findall(r"The pass key is (\d+)\. Remember it\.", prompt)[-1]
    if "variables are assigned the value" in question:
        value = re.search(r"assigned the value (\d+)", question).group(1)
        body = prompt[prompt.rindex("Memorize and track"):]
        names = set(re.findall(rf"VAR (\w+) = {value}\b", body))
        links = re.findall(r"VAR (\w+) = VAR (\w+)", body)
        while any(b in names and a not in names for a, b in links):
            names |= {a for a, b in links if b in names}
        return " ".join(sorted(names))
    if "most common words" in question:
        body = prompt[prompt.rindex("Below is a numbered list"):]
        words = Counter(re.findall(r"\d+\. (\w+)", body))
        return " ".join(w for w, _ in words.most_common(10))
    if "coded text" in question:
        words = Counter(w for w in prompt[prompt.index("coded words. "):].split() if re.fullmatch(r"[a-z]{6}", w))
        return " ".join(w for w, _ in words.most_common(3))
    keys = re.split(r", and |, ", re.search(r"for (.+?) mentioned", question).group(1))
    return " ".join(v for k in keys for v in re.findall(rf"for {re.escape(k)} is: ([\w-]+)\.", prompt))


class FakeModel:
    """A checkpoint for the runner: the real tokenizer and context; ``generate`` answers like ``answer``."""

    def __init__(self, tokenizer, checkpoint: Path, context: int, answer) -> None:
        self.tokenizer, self.checkpoint, self.context, self.answer = tokenizer, checkpoint, context, answer
        self.prompts: list[str] = []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def generate(self, prompts, max_new_tokens, sampling, seed, stop=()):
        assert sampling.temperature == 0 and all(len(self.encode(p)) + max_new_tokens <= self.context
                                                 for p in prompts)
        self.prompts += prompts
        return [Generated(self.answer(p), max_new_tokens, "length") for p in prompts]


def _run(model, tmp_path, spec="ruler", lengths=(1700, 2500), per_length=2, logs=None, data=None, limit=None):
    task = make_task(spec, lengths=lengths, per_length=per_length)
    runner = TaskRunner(model, task, tmp_path / task.name, checkpoint_hash="x", progress=False, data=data,
                        limit=limit, log=(logs.append if logs is not None else lambda m: None))
    return runner.run()


@pytest.fixture
def data_dir(tokenizer, tmp_path):
    """A prepared dataset whose validation split is :data:`TEXT`, tokenized with :func:`tokenizer`."""
    from kunlunbaize.data.prepare import prepare

    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(f"Part {i}. {TEXT}")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "ds"
    prepare(sources=[str(src)], out=out, tokenizer=str(tmp_path / "tokenizer.json"), workers=1, val_fraction=0.5,
            progress=False, log=None)
    return out


def test_a_model_that_copies_the_needles_scores_1_and_one_that_does_not_scores_0(tokenizer, data_dir, tmp_path):
    oracle = FakeModel(tokenizer, data_dir, 4096, _oracle_answer)
    summary = _run(oracle, tmp_path / "oracle", data=data_dir)
    assert {r["metric"]: r["value"] for r in summary["rows"]} == {"score@1700": 1.0, "score@2500": 1.0,
                                                                 "score (avg over lengths)": 1.0}
    assert all(v == 1.0 for scores in summary["ruler"]["scores"].values() for v in scores.values())
    assert len(oracle.prompts) == len(SUITE) * 2 * 2
    lines = [json.loads(ln) for ln in (tmp_path / "oracle" / "ruler" / "records.jsonl").read_text().splitlines()]
    assert {ln["task"] for ln in lines} == set(SUITE) and all(ln["correct"] == 1.0 for ln in lines)
    silent = FakeModel(tokenizer, data_dir, 4096, lambda p: "I do not know. 1234567 abc-def")
    summary = _run(silent, tmp_path / "silent", data=data_dir)
    assert all(r["value"] == 0.0 for r in summary["rows"])
    half = FakeModel(tokenizer, data_dir, 4096, lambda p: _oracle_answer(p).split(" ")[0])  # 1 of 4 values
    rows = _run(half, tmp_path / "half", "ruler=niah_multivalue", lengths=(1700,), data=data_dir)["rows"]
    assert rows[0]["value"] == 0.25  # RULER's string_match_all: the fraction of the values found


def test_the_table_and_plot_have_table_3s_shape(tokenizer, tmp_path):
    model = FakeModel(tokenizer, tmp_path, 4096, _oracle_answer)
    summary = _run(model, tmp_path, "ruler=niah_single_1,passkey,vt", lengths=(1100, 2048, 3072), per_length=1)
    table = summary["ruler"]["table"].splitlines()
    assert table[0] == "| task | 1100 | 2K | 3K | avg |"
    assert [ln.split(" | ")[0] for ln in table[2:]] == ["| niah_single_1", "| passkey", "| vt", "| **average**"]
    folder = tmp_path / "ruler-niah_single_1-passkey-vt"
    assert (folder / "ruler.md").read_text().strip() == summary["ruler"]["table"]
    assert (folder / "ruler.png").read_bytes()[:4] == b"\x89PNG"
    assert set(summary["ruler"]["wall_s"]) == {"1100", "2048", "3072"}


def test_lengths_beyond_the_context_are_clipped_with_a_warning(tokenizer, tmp_path):
    logs: list[str] = []
    model = FakeModel(tokenizer, tmp_path, 1024, _oracle_answer)
    summary = _run(model, tmp_path, "ruler=passkey", lengths=(512, 2048, 4096), per_length=1, logs=logs)
    assert summary["ruler"]["lengths"] == [512, 1024]
    assert any("2K, 4K tokens exceed the model's context of 1024" in m for m in logs)
    assert [len(model.encode(p)) for p in model.prompts] == [512 - 16, 1024 - 16]


def test_a_task_that_does_not_fit_a_length_is_skipped_with_a_warning(tokenizer, tmp_path):
    logs: list[str] = []
    model = FakeModel(tokenizer, tmp_path, 4096, _oracle_answer)
    summary = _run(model, tmp_path, "ruler=passkey,cwe", lengths=(300, 2048), per_length=1, logs=logs)
    assert summary["ruler"]["skipped"] == ["cwe@300"] and any("cwe at 300 tokens" in m for m in logs)
    assert "| cwe | — | 1.000 | 1.000 |" in summary["ruler"]["table"]
    with pytest.raises(TaskError, match="no task fits"):
        _run(model, tmp_path / "b", "ruler=cwe", lengths=(300,), per_length=1)


def test_limit_caps_the_samples_per_length_and_a_rerun_resumes(tokenizer, tmp_path):
    model = FakeModel(tokenizer, tmp_path, 4096, _oracle_answer)
    _run(model, tmp_path, "ruler=passkey", lengths=(600,), per_length=5, limit=2)
    assert len(model.prompts) == 2
    _run(model, tmp_path, "ruler=passkey", lengths=(600,), per_length=5, limit=3)
    assert len(model.prompts) == 3  # the first two were on record


def test_valtext_tasks_without_validation_text_get_a_clear_error(tokenizer, tmp_path):
    model = FakeModel(tokenizer, tmp_path, 4096, _oracle_answer)
    with pytest.raises(TaskError, match="niah_single_2 hide their needles in validation text: give --data"):
        _run(model, tmp_path, "ruler=niah_single_2", lengths=(900,), per_length=1)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("text, message", [
    ("1k,,2k", "give comma-separated token counts"),
    ("", "give comma-separated token counts"),
    ("0", "must be a whole number of tokens > 0"),
    ("1.3", "must be a whole number of tokens > 0"),
    ("-4k", "is not a token count"),
    ("4kb", "is not a token count"),
])
def test_malformed_length_lists_are_refused(text, message):
    with pytest.raises(RulerError, match=message):
        ruler.parse_lengths(text)


def test_length_lists_and_task_names_parse():
    assert ruler.parse_lengths("4k, 1K,128k,300,1k") == (300, 1024, 4096, 131072)
    assert ruler.length_label(131072) == "128K" and ruler.length_label(300) == "300"
    assert ruler.parse_tasks("niah,vt")[-1] == "vt" and len(ruler.parse_tasks("niah")) == 9
    with pytest.raises(RulerError, match="ruler has no task 'nope'"):
        ruler.parse_tasks("vt,nope")


@pytest.mark.parametrize("args, message", [
    (["--task", "ruler=nope"], "ruler has no task 'nope'"),
    (["--task", "ruler", "--lengths", "0"], "must be a whole number of tokens > 0"),
    (["--task", "ruler", "--lengths", "1k,x"], "'x' is not a token count"),
    (["--task", "ruler", "--per-length", "0"], "expected an integer >= 1"),
    (["--task", "ruler", "--lm-eval-metadata", "{}"], "--lm-eval-metadata applies to --lm-eval tasks"),
    (["--lm-eval", "ruler_vt", "--lm-eval-metadata", "[4096]"], "give a JSON object"),
    (["--lm-eval", "ruler_vt", "--lm-eval-metadata", "{max_seq_lengths: 1}"], "not JSON"),
])
def test_bad_arguments_get_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "eval", "--checkpoint", str(tmp_path / "none"), *args)
    assert code in (1, 2)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


# ------------------------------------------------------------------------------------------------ end to end
def test_kunlun_eval_runs_the_suite_on_a_trained_checkpoint(trained_run, tmp_path, capsys):
    from kunlunbaize.checkpoint import resolve_checkpoint

    ckpt = tmp_path / "ckpt"  # the tiny run's 64-token context lengthened (rotary positions extend)
    shutil.copytree(resolve_checkpoint(trained_run), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["max_seq_len"] = 512
    (ckpt / "config.json").write_text(json.dumps(config))
    code, out, err = run_main(capsys, "eval", "--checkpoint", str(ckpt), "--task", "ruler=passkey,niah_single_1",
                              "--lengths", "300,1k", "--per-length", "1", "--max-new-tokens", "3", "--out",
                              str(tmp_path / "ev"), "--no-progress")
    assert code == 0, err
    assert "1K tokens exceed the model's context of 512" in err
    assert "score@300" in out and "score@512" in out and "| task | 300 | 512 | avg |" in out
    folder = tmp_path / "ev" / "ruler-passkey-niah_single_1"
    lines = [json.loads(ln) for ln in (folder / "records.jsonl").read_text().splitlines()]
    assert [(ln["task"], ln["length"], ln["tokens"]) for ln in lines] == [
        ("passkey", 300, 3), ("niah_single_1", 300, 3), ("passkey", 512, 3), ("niah_single_1", 512, 3)]
    assert (folder / "ruler.png").is_file() and "score by length" in (tmp_path / "ev" / "results.md").read_text()


def test_lm_evals_ruler_tasks_are_told_the_tokenizer():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from kunlunbaize.eval.harness import sizes_by_tokenizer

    manager = TaskManager()
    assert sizes_by_tokenizer(manager, ["ruler_vt"]) and sizes_by_tokenizer(manager, ["arc_easy", "ruler"])
    assert not sizes_by_tokenizer(manager, ["arc_easy", "hellaswag"])
