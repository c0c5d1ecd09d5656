"""Post-training (§4): chat format, generated tasks, rewards, reward model, SFT, rejection sampling, DPO, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")

from kunlunbaize.posttrain.chat import CHAT_TEMPLATE, add_chat_format, missing_chat_tokens
from kunlunbaize.posttrain.data import preference_records, prompt_records, sft_records
from kunlunbaize.posttrain.rewards import Combined, code_reward, math_reward, parse_spec
from kunlunbaize.posttrain.tasks import code_problems, generate_tasks, math_problems, reference_reply

from .helpers import TRAIN_MODEL

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def chat_model(dataset, tmp_path_factory) -> Path:
    """A tiny pre-trained KunlunBaize (context 128) as a transformers folder with the chat format."""
    from kunlunbaize.posttrain.models import load_policy, model_folder, save_model
    from kunlunbaize.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("posttrain")
    train(TrainConfig(data=str(dataset), out=str(root / "run"), preset="tiny",
                      model_overrides={**TRAIN_MODEL, "max_seq_len": 128}, seq_len=64, tokens=64 * 8 * 10,
                      batch_size=8, lr=3e-3, eval_every=1000, progress=False))
    base = model_folder(root / "run", root, **QUIET)
    return save_model(*load_policy(base, **QUIET), root / "chat", **QUIET)


def _short_math(n: int, split: str = "train") -> list[dict]:
    """Math tasks with short prompts (the tiny model's 320-token vocabulary makes long ones long)."""
    return [{**r, "prompt": r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")}
            for r in math_problems(split, n)]


# ------------------------------------------------------------------------------------------------- chat format
@pytest.mark.slow
def test_chat_template_prefix_and_assistant_mask(chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    assert tok.chat_template == CHAT_TEMPLATE and (chat_model / "chat_template.jinja").is_file()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "5"}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert full == "<|system|>\nBe brief.<|end|>\n<|user|>\n2 + 3?<|end|>\n<|assistant|>\n5<|end|>\n"
    assert full.startswith(prompt) and prompt.endswith("<|assistant|>\n")
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(marked) == "5<|end|>"  # the reply and the token that ends it, nothing else
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_tokens_are_added_to_a_foreign_tokenizer_and_the_embeddings_grow():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kunlunbaize.config import ModelConfig
    from kunlunbaize.hf import KunlunBaizeConfig, KunlunBaizeForCausalLM

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(62)}}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    model = KunlunBaizeForCausalLM(KunlunBaizeConfig.from_model_config(ModelConfig.preset("tiny", vocab_size=64)))
    assert len(missing_chat_tokens(tok)) == 4
    added = add_chat_format(model, tok)
    assert added == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] and not missing_chat_tokens(tok)
    assert model.config.vocab_size == len(tok) == 68 and model.get_input_embeddings().weight.shape[0] == 68
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "<|user|>"
    out = model(torch.tensor([ids]), mtp=True)
    assert out.logits.shape[-1] == 68 and all(lg.shape[-1] == 68 for lg in out.mtp_logits)


# ----------------------------------------------------------------------------------------------------- tasks
@pytest.mark.slow
def test_generated_tasks_are_deterministic_disjoint_and_solvable():
    from kunlunbaize.eval.arith import arith_problems
    from kunlunbaize.eval.sandbox import run_tests

    assert code_problems("train", 50) == code_problems("train", 50)
    train, test = code_problems("train", 1000), code_problems("test", 250)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert [r["prompt"] for r in math_problems("test", 20)] == [r["prompt"] for r in arith_problems("test", 20)]
    sample = test[:12]  # one of each family
    results = run_tests([reference_reply(r) + "\n" + r["test"] for r in sample], timeout=20)
    assert all(r.passed for r in results), [r.stderr for r in results if not r.passed]
    assert [r["kind"] for r in generate_tasks("mix", "train", 5)] == ["math", "code", "math", "code", "math"]
    with pytest.raises(ValueError, match="n must be"):
        code_problems("train", 5000)


# --------------------------------------------------------------------------------------------------- rewards
def test_math_reward_uses_mathematical_equivalence():
    pytest.importorskip("math_verify")
    completions = ["The answer is 1/2.", "0.5", "\\boxed{\\frac{1}{2}}", "<answer>42</answer>", "I think 3",
                   [{"role": "assistant", "content": "-7"}], "no number", "anything"]
    golds = ["0.5", "1/2", "0.5", "42", "4", "-7", "3", None]
    assert math_reward(None, completions, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, None]


def test_code_reward_runs_tests_in_the_sandbox():
    test = "assert f(2) == 3\n"
    completions = ["def f(x):\n    return x + 1\n",  # passes
                   "```python\ndef f(x):\n    return x + 1\n```\nDone.",  # the fenced block is the program
                   "def f(x):\n    return x\n",  # wrong
                   "def f(x):\n    while True:\n        pass\nf(1)\n",  # never ends: timeout
                   "import os\nos.system('echo pwned > /tmp/kb_pwned')\ndef f(x):\n    return 1/0\n",  # hostile
                   "def f(x): return x + 1"]
    out = code_reward(None, completions, test=[test] * 5 + [None], timeout=2)
    assert out == [1.0, 1.0, 0.0, 0.0, 0.0, None]


def test_code_reward_cannot_be_faked_by_exiting_early_or_faking_equality():
    """Each of these scored 1.0 when the reward was "the program with the test appended exits 0"."""
    test = "assert f(2) == 3\n"
    wrong = "def f(x):\n    return 0\n"
    hacks = [wrong + "import os\nos._exit(0)\n",
             wrong + "import sys\nsys.exit(0)\n",
             wrong + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
             wrong + "import os, threading, time\n"
             "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n",
             "class E:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return E()\n"]
    out = code_reward(None, ["def f(x):\n    return x + 1\n", *hacks], test=[test] * (1 + len(hacks)),
                      entry_point=["f"] * (1 + len(hacks)), timeout=3)
    assert out == [1.0] + [0.0] * len(hacks)


def test_format_rewards_and_combinations():
    spec = Combined.from_spec("math=1,no_repetition=0.5,length=0.25,answer_tag=2", max_chars=20)
    table = spec.score([None] * 3, ["<answer>5</answer>", "a b c d a b c d a b c d", "x" * 30],
                       answer=["5", None, "7"])
    assert table["answer_tag"] == [1.0, 0.0, 0.0]
    assert table["no_repetition"][0] == 1.0 and table["no_repetition"][1] < 0.5
    assert table["length"] == pytest.approx([1.0, 0.85, 0.5])  # 18, 23 and 30 characters against 20
    assert table["math"] == [1.0, None, 0.0]
    assert table["reward"][0] == pytest.approx(1 + 0.5 + 0.25 + 2)
    assert table["reward"][1] == pytest.approx(0.5 * table["no_repetition"][1] + 0.25 * 0.85)  # math: skipped
    assert parse_spec("math,code=0.5") == [("math", 1.0), ("code", 0.5)]
    for bad, match in [("", "no reward"), ("nope", "unknown reward"), ("math=x", "not a number"),
                       ("math,math", "twice")]:
        with pytest.raises(ValueError, match=match):
            parse_spec(bad)
    with pytest.raises(ValueError, match="reward model"):
        Combined.from_spec("rm")


# ------------------------------------------------------------------------------------------- padding + scores
def test_right_padding_changes_nothing_for_real_tokens_and_the_score_reads_the_last_one(chat_model):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import kunlunbaize.hf  # noqa: F401

    lm = AutoModelForCausalLM.from_pretrained(str(chat_model)).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(str(chat_model), num_labels=1).eval()
    assert type(rm).__name__ == "KunlunBaizeForSequenceClassification" and rm.config.num_labels == 1
    ids = torch.randint(5, 300, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], 1).long()
    left = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    with torch.no_grad():
        alone, right = lm(ids, mtp=True), lm(padded, attention_mask=mask, mtp=True)
        torch.testing.assert_close(right.logits[:, :12], alone.logits, atol=1e-5, rtol=1e-5)
        for a, b in zip(alone.mtp_logits, right.mtp_logits, strict=True):  # positions whose targets exist
            torch.testing.assert_close(b[:, :10], a[:, :10], atol=1e-5, rtol=1e-5)
        score = rm(ids).logits
        torch.testing.assert_close(rm(padded, attention_mask=mask).logits, score, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm(left, attention_mask=mask.flip(1)).logits, score, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- SFT
@pytest.mark.slow
def test_sft_learns_on_assistant_tokens_only_and_keeps_the_mtp_depths_trained(chat_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from kunlunbaize.posttrain.models import load_policy, trainer_settings
    from kunlunbaize.posttrain.sft import SFTSettings, _trainer_class, run_sft

    examples = sft_records([{"prompt": r["prompt"], "completion": r["answer"]} for r in _short_math(16)])
    model, tok = load_policy(chat_model, **QUIET)
    args = SFTConfig(output_dir=str(tmp_path / "t"), max_steps=1, per_device_train_batch_size=4,
                     assistant_only_loss=True, max_length=128, **trainer_settings("cpu", 0))
    trainer = _trainer_class()(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(examples))
    batch = next(iter(trainer.get_train_dataloader()))
    replies = {ex["messages"][-1]["content"] + "<|end|>" for ex in examples}
    for row_ids, row_labels, row_mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                             strict=True):
        learned = (row_labels != -100).nonzero().flatten()
        first, last = int(learned[0]), int(learned[-1])
        assert len(learned) == last - first + 1  # one contiguous span: the reply
        assert tok.decode(row_ids[first:last + 1]) in replies
        assert tok.decode(row_ids[:first]).endswith("<|assistant|>\n")  # the prompt is not learned
        assert tok.decode(row_ids[last + 1:][row_mask[last + 1:] == 1]) == "\n"  # nor the newline after the turn

    metrics = run_sft(chat_model, examples, tmp_path / "sft", SFTSettings(epochs=4, lr=3e-3, batch_size=6,
                                                                          eval_fraction=0.25, logging_steps=1),
                      **QUIET)
    assert metrics["steps"] == 8 and metrics["examples"] == 12
    assert metrics["losses"][-1] < metrics["losses"][0] - 0.5  # the joint loss (eq. 22) on the replies falls
    before = AutoModelForCausalLM.from_pretrained(str(chat_model)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(metrics["model"]).state_dict()
    assert not torch.equal(before["mtp.depths.0.cross_attn.wq.weight"], after["mtp.depths.0.cross_attn.wq.weight"])
    assert not torch.equal(before["model.embed.weight"], after["model.embed.weight"])
    from kunlunbaize.infer.load import load_model

    load_model(metrics["model"])  # every kunlun command reads the result


@pytest.mark.slow
def test_sft_gradient_accumulation_equals_the_larger_batch_for_every_loss_term(chat_model, tmp_path):
    """One SGD step on 4 conversations: 2 micro-batches of 2 accumulated must move every weight (trunk and MTP
    depths) as one batch of 4 does; the depths' terms must not count once per micro-batch."""
    from datasets import Dataset
    from trl import SFTConfig

    from kunlunbaize.posttrain.models import load_policy, trainer_settings
    from kunlunbaize.posttrain.sft import _trainer_class

    data = Dataset.from_list(sft_records([{"prompt": "7 + 5?", "completion": "12"}] * 4))
    deltas = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model, tok = load_policy(chat_model, **QUIET)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        args = SFTConfig(output_dir=str(tmp_path / f"ga{accumulation}"), max_steps=1, optim="sgd", learning_rate=0.5,
                         lr_scheduler_type="constant", per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation, assistant_only_loss=True, max_length=128,
                         **trainer_settings("cpu", 0))
        _trainer_class()(model=model, args=args, processing_class=tok, train_dataset=data).train()
        deltas.append({k: v - before[k] for k, v in model.state_dict().items()})
    for name in ("mtp.depths.0.cross_attn.wq.weight", "model.embed.weight", "model.blocks.0.attn.wq.weight"):
        one, accumulated = deltas[0][name], deltas[1][name]
        assert one.abs().max() > 0, name
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_trl_trainers_take_the_model_as_a_path(chat_model, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from kunlunbaize.posttrain.models import load_chat_tokenizer, trainer_settings

    data = Dataset.from_list(sft_records([{"prompt": "2 + 2?", "completion": "4"}] * 4))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_length=64,
                     assistant_only_loss=True, **trainer_settings("cpu", 0))
    trainer = SFTTrainer(model=str(chat_model), args=args, train_dataset=data,
                         processing_class=load_chat_tokenizer(chat_model))
    assert type(trainer.model).__name__ == "KunlunBaizeForCausalLM" and trainer.train().global_step == 1


# ---------------------------------------------------------------------------------------- rejection sampling
def _row(index: int, sample: int, text: str, reward: float | None) -> dict:
    return {"index": index, "sample": sample, "id": index, "prompt": [{"role": "user", "content": f"q{index}"}],
            "completion": text, "reward": reward}


def test_selection_keeps_the_best_above_the_floor_and_deduplicates():
    from kunlunbaize.posttrain.rs import preference_pairs, select

    rows = [_row(0, 0, "a", 0.0), _row(0, 1, "b", 1.0), _row(0, 2, " b ", 1.0), _row(0, 3, "c", 0.5),
            _row(1, 0, "x", 0.0), _row(1, 1, "y", 0.0), _row(2, 0, "z", None), _row(3, 0, "  ", 1.0)]
    assert [(r["index"], r["completion"]) for r in select(rows, 0.0, None)] == [(0, "b")]
    kept = select(rows, 0.0, 0.5)  # and everything >= 0.5, " b " being "b" again
    assert [(r["index"], r["completion"]) for r in kept] == [(0, "b"), (0, "c")]
    pairs = preference_pairs(rows)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a")]  # prompt 1: all equal; 2: unscored


@pytest.mark.slow
def test_rejection_sampling_round_writes_data_and_model_and_resumes(chat_model, tmp_path):
    from kunlunbaize.posttrain.rs import NothingKept, RSSettings, run_rs
    from kunlunbaize.posttrain.sft import SFTSettings

    prompts = prompt_records(_short_math(6))
    settings = RSSettings(n=3, temperature=1.0, max_new_tokens=8, batch_size=6, seed=1,
                          sft=SFTSettings(epochs=1, batch_size=4))
    reward = Combined.from_spec("length", max_chars=4)  # favours short replies: something is always kept
    (stats,) = run_rs(chat_model, prompts, reward, tmp_path / "rs", settings, **QUIET, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "rs/round_1/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and sorted({r["index"] for r in rows}) == list(range(6))
    kept = [json.loads(x) for x in (tmp_path / "rs/round_1/sft.jsonl").read_text().splitlines()]
    assert stats["kept"] == len(kept) > 0 and stats["samples"] == 18
    for ex in kept:  # each kept reply is its prompt's best
        prompt, reply = ex["messages"][0]["content"], ex["messages"][-1]["content"]
        group = [r for r in rows if r["prompt"][0]["content"] == prompt]
        assert max(r["reward"] for r in group) == next(r["reward"] for r in group if r["completion"] == reply)
    assert (tmp_path / "rs/round_1/model/model.safetensors").is_file()
    again = run_rs(chat_model, prompts, reward, tmp_path / "rs", settings, **QUIET, progress=False)
    assert again[0]["samples"] == 18  # read back, not sampled again
    with pytest.raises(NothingKept, match="nothing to fine-tune on"):
        run_rs(chat_model, prompts, Combined.from_spec("math"), tmp_path / "none",
               RSSettings(n=1, max_new_tokens=2, sft=SFTSettings(epochs=1)), **QUIET, progress=False)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_sampling_shards_across_torchrun_ranks_and_merges_on_rank_0(chat_model, tmp_path):
    script = tmp_path / "rs.py"
    script.write_text(f"""
import sys
from pathlib import Path
from kunlunbaize.posttrain.data import prompt_records
from kunlunbaize.posttrain.rewards import Combined
from kunlunbaize.posttrain.rs import RSSettings, run_rs
from kunlunbaize.posttrain.sft import SFTSettings
prompts = prompt_records([{{"prompt": f"{{a}} + {{a}}?", "answer": str(2 * a)}} for a in range(5)])
run_rs({str(chat_model)!r}, prompts, Combined.from_spec("length", max_chars=4), Path(sys.argv[1]),
       RSSettings(n=2, temperature=1.0, max_new_tokens=4, batch_size=1, sft=SFTSettings(epochs=1, batch_size=2)),
       log=lambda m: None, progress=False)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    samples = [(tmp_path / d / "round_1" / "samples.jsonl").read_text() for d in ("one", "two")]
    # one row per generation batch, seeded by its (prompt, sample): the same replies however the prompts are shared
    assert samples[0] == samples[1]  # rank 0 merged both ranks' shares back into the same rows
    assert not list((tmp_path / "two" / "round_1").glob("samples.rank*"))  # per-rank files merged and removed
    one_sft, two_sft = (json.loads((tmp_path / d / "round_1/stats.json").read_text())["sft"] for d in ("one", "two"))
    assert two_sft["steps"] < one_sft["steps"]  # both ranks fine-tuned (DDP): each took half the batches


# ------------------------------------------------------------------------------------------------------- DPO
@pytest.mark.slow
def test_dpo_trains_keeps_the_reference_and_stops_early_restoring_the_best(chat_model, tmp_path):
    from safetensors.torch import load_file

    from kunlunbaize.posttrain.dpo import DPOSettings, run_dpo

    tasks = _short_math(24)
    good = preference_records([{"prompt": r["prompt"], "chosen": r["answer"], "rejected": "no idea"} for r in tasks])
    # held-out pairs prefer the opposite: the better DPO fits the training pairs, the worse they get
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in good[:8]]
    before = load_file(str(chat_model / "model.safetensors"))
    settings = DPOSettings(lr=3e-3, batch_size=8, per_device_batch_size=4, epochs=6, eval_steps=1, patience=2,
                           metric="loss", seed=0, logging_steps=1)
    m = run_dpo(chat_model, good, tmp_path / "dpo", settings, **QUIET, heldout=flipped)
    train = [h for h in m["log"] if "rewards/margins" in h and "eval_loss" not in h]
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    assert m["stopped_early"] and m["steps"] < 18  # 24 pairs / 8 per step x 6 epochs were planned
    evals = [h["eval_loss"] for h in m["log"] if "eval_loss" in h]
    assert m["best_step"] is not None and m["best_metric"] == pytest.approx(min(evals[:-1]))
    saved = load_file(str(tmp_path / "dpo/model/model.safetensors"))
    best = load_file(str(tmp_path / f"dpo/trainer/checkpoint-{m['best_step']}/model.safetensors"))
    assert all(torch.equal(saved[k], best[k]) for k in best)  # the best checkpoint, restored and saved
    assert all(torch.equal(before[k], load_file(str(chat_model / "model.safetensors"))[k]) for k in before)


@pytest.mark.slow
def test_dpo_with_precomputed_reference_log_probs_needs_no_second_model(chat_model, tmp_path):
    from kunlunbaize.posttrain.dpo import DPOSettings, run_dpo

    pairs = preference_records([{"prompt": r["prompt"], "chosen": r["answer"], "rejected": "no"}
                                for r in _short_math(10)])
    m = run_dpo(chat_model, pairs, tmp_path / "dpo", DPOSettings(reference="precompute", lr=1e-3, batch_size=4,
                                                                 per_device_batch_size=4, eval_steps=1,
                                                                 eval_fraction=0.2), **QUIET)
    assert m["steps"] == 2 and m["pairs"] == 8 and (tmp_path / "dpo/model/model.safetensors").is_file()


@pytest.mark.slow
def test_reward_model_learns_a_toy_preference_in_either_direction(chat_model, tmp_path):
    from kunlunbaize.posttrain.reward_model import ModelReward, RMSettings, run_reward_model

    words = ["cats", "dogs", "rain", "sun", "tea", "code", "books", "trees", "maps", "bread", "snow", "ink"]
    pairs = preference_records([{"prompt": f"About {w}.", "chosen": f"{w} are lovely, thanks",
                                 "rejected": f"{w} whatever"} for w in words * 2])
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    results = []
    for name, data in (("pos", pairs), ("neg", flipped)):
        results.append(run_reward_model(chat_model, data, tmp_path / name,
                                        RMSettings(epochs=4, lr=3e-3, batch_size=8, eval_fraction=0.25), **QUIET))
    # the two share the starting model and held-out prompts, so at most one can be right before training
    assert results[0]["heldout_accuracy_before"] + results[1]["heldout_accuracy_before"] == pytest.approx(1.0)
    assert all(r["heldout_accuracy"] >= 0.8 for r in results), results
    rm = ModelReward(results[0]["model"])
    good, bad = rm(["About fish."] * 2, ["fish are lovely, thanks", "fish whatever"])
    assert good > bad


# --------------------------------------------------------------------------------------------- command line
def _fails(args: list[str], match: str, capsys) -> None:
    from kunlunbaize.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    text = str(e.value.code) + capsys.readouterr().err
    assert match in text, text


def test_bad_inputs_are_clear_errors(chat_model, tmp_path, capsys):
    empty, partial, same, long = (tmp_path / f"{n}.jsonl" for n in ("empty", "partial", "same", "long"))
    empty.write_text("")
    partial.write_text(json.dumps({"prompt": "hi"}) + "\n")
    same.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "a"}) + "\n")
    long.write_text(json.dumps({"prompt": "word " * 400, "answer": "1"}) + "\n")
    m = ["--model", str(chat_model), "--out", str(tmp_path / "out")]
    _fails(["posttrain", "sft", "--data", str(empty), *m], "is empty", capsys)
    _fails(["posttrain", "sft", "--data", str(partial), *m], "record 1: missing 'completion'", capsys)
    _fails(["posttrain", "dpo", "--pairs", str(partial), *m], "missing 'chosen', 'rejected'", capsys)
    _fails(["posttrain", "dpo", "--pairs", str(same), *m], "chosen and rejected are the same", capsys)
    _fails(["posttrain", "rs", "--prompts", str(long), *m], "the model's context is 128", capsys)
    _fails(["posttrain", "rs", "--prompts", str(partial), "--rewards", "math,bogus", *m], "unknown reward", capsys)
    _fails(["posttrain", "dpo", "--pairs", str(same), "--batch-size", "10", "--per-device-batch-size", "4", *m],
           "not a multiple", capsys)
    _fails(["reward", str(partial), "--rewards", "math"], "missing 'completion'", capsys)
    _fails(["posttrain", "sft", "--data", str(tmp_path / "nope.jsonl"), *m], "no such file", capsys)
    assert not (tmp_path / "out" / "model").exists()


def test_reward_command_scores_a_file(tmp_path, capsys):
    from kunlunbaize.cli import main

    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "2 + 2?", "completion": "4", "answer": "4"},
        {"prompt": "f", "completion": "def f():\n    return 1\n", "test": "assert f() == 1\n"},
        {"prompt": "3 + 3?", "completion": "7", "answer": "6"}]))
    main(["reward", str(data), "--rewards", "math,code,length=0.5"])
    rows = [json.loads(x) for x in (tmp_path / "c.scored.jsonl").read_text().splitlines()]
    assert [r["math"] for r in rows] == [1.0, None, 0.0] and [r["code"] for r in rows] == [None, 1.0, None]
    assert [r["reward"] for r in rows] == [1.5, 1.5, 0.5]
    assert "math" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_each(chat_model, tmp_path):
    from kunlunbaize.posttrain.demo import DemoSettings, run_demo

    settings = DemoSettings(checkpoint=str(chat_model), out=str(tmp_path / "demo"), tasks="math", sft_examples=32,
                            sft_epochs=1, rs_prompts=8, rs_n=2, dpo_epochs=1, eval_math=8, eval_code=0,
                            max_new_tokens=8)
    rows = run_demo(settings, **QUIET)
    assert [r["stage"] for r in rows] == ["base", "sft", "rs", "dpo"]
    assert {"arith_exact_match", "tokens_per_trunk_forward"} <= set(rows[0]) and rows[1]["examples"] == 32
    table = (tmp_path / "demo" / "demo.md").read_text()
    assert all(f"| {s} |" in table for s in ("base", "sft", "rs", "dpo"))
    summary = json.loads((tmp_path / "demo" / "scores" / "sft" / "eval" / "summary.json").read_text())
    assert summary["rows"][0]["n"] == 8  # scored by kunlun eval's arith task on the held-out split


def test_export_adds_the_chat_template_only_when_asked(trained_run, tmp_path):
    from kunlunbaize.cli import main
    from kunlunbaize.eval.model import read_chat_template

    main(["export", "--hf", str(tmp_path / "plain"), "--checkpoint", str(trained_run)])
    main(["export", "--hf", str(tmp_path / "chat"), "--checkpoint", str(trained_run), "--chat-template"])
    assert read_chat_template(tmp_path / "plain") is None  # kunlun eval must not chat with a base model
    assert read_chat_template(tmp_path / "chat") == CHAT_TEMPLATE


def test_prepare_reserves_the_chat_tokens_in_a_loaded_tokenizer_when_asked(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kunlunbaize.data.prepare import prepare

    words = ["the", "cat", "sat", "on", "a", "mat"]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<|endoftext|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "text.txt").write_text("the cat sat on a mat\n" * 50)
    for flag, out in ((False, "plain"), (True, "chat")):
        prepare([str(tmp_path / "text.txt")], tmp_path / out, tokenizer=tmp_path / "tokenizer.json", workers=1,
                val_fraction=0.0, chat_tokens=flag, progress=False, log=None)
    plain = json.loads((tmp_path / "plain/meta.json").read_text())
    chat = json.loads((tmp_path / "chat/meta.json").read_text())
    assert chat["vocab_size"] == plain["vocab_size"] + 4
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"} <= set(chat["tokenizer"]["special_tokens"])
    assert not {"<|user|>"} & set(plain["tokenizer"]["special_tokens"])
