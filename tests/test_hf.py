"""Hugging Face integration: config, backbone/head split, Auto classes, generate, export, lm-eval, PEFT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kunlunbaize.checkpoint.keys import from_hf
from kunlunbaize.cli import main
from kunlunbaize.hf import KunlunBaizeConfig, KunlunBaizeForCausalLM, KunlunBaizeModel
from kunlunbaize.infer import generate
from kunlunbaize.infer.load import load_model

from .helpers import build, config_id, switch_configs, tiny

CONFIGS = switch_configs()


def to_hf_model(model, **config_kwargs) -> KunlunBaizeForCausalLM:
    """The HF twin of one of our models (same weights)."""
    return KunlunBaizeForCausalLM.from_kunlunbaize(model, **config_kwargs)


# ---------------------------------------------------------------------------------------------- config
def test_config_aliases_validation_and_round_trip(tmp_path):
    cfg = KunlunBaizeConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            conv_kernel_sizes=[3, 5], mtp_depth=2, tie_word_embeddings=True)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (48, 3, 4, 2)
    assert cfg.hidden_size == 48 and cfg.max_position_embeddings == cfg.max_seq_len and cfg.tie_embeddings
    arch = cfg.to_model_config()
    assert arch.conv_kernel_sizes == (3, 5) and arch.tie_embeddings
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, KunlunBaizeConfig) and again.to_model_config() == arch
    for c in CONFIGS:
        assert KunlunBaizeConfig.from_model_config(c).to_model_config() == c
    with pytest.raises(ValueError, match="n_kv_heads"):
        KunlunBaizeConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="mtp_depth"):
        KunlunBaizeConfig(mtp_depth=-1)


REGISTERED = ("from transformers import AutoConfig, AutoModelForCausalLM; "
              "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as M; "
              "c = AutoConfig.for_model('kunlunbaize'); print(type(c).__name__, M[type(c)].__name__); "
              "import sys; from kunlunbaize._hf_hook import _RegisterOnImport as H; "
              "assert not any(isinstance(f, H) for f in sys.meta_path), 'the import hook stayed'")


def run_python(code: str, *flags: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("first", [
    "import sys, kunlunbaize; assert 'transformers' not in sys.modules; import transformers",
    "import transformers, kunlunbaize",
    "import kunlunbaize, importlib.util as u; [u.find_spec('transformers') for _ in range(3)]; import transformers",
    "import kunlunbaize, importlib.util as u; u.find_spec('transformers'); import transformers.models.auto",
    "import kunlunbaize, trl",
    "from kunlunbaize.hf import KunlunBaizeConfig",
], ids=["kb-then-tf", "tf-then-kb", "probes-then-tf", "probe-then-submodule", "kb-then-trl", "kb-hf-first"])
@pytest.mark.slow
@pytest.mark.subprocess
def test_import_registers_auto_classes_in_any_order(first):
    """`import kunlunbaize` does not import transformers, yet the Auto classes know the model, whatever imports
    transformers and however often it is probed for first (TRL calls importlib.util.find_spec before importing)."""
    if "trl" in first:
        pytest.importorskip("trl")
    out = run_python(first + "; " + REGISTERED, "-W", "error::RuntimeWarning:kunlunbaize._hf_hook")
    assert out.stdout.split() == ["KunlunBaizeConfig", "KunlunBaizeForCausalLM"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_unsupported_transformers_is_reported_not_silent():
    from kunlunbaize.hf import check_transformers_version

    check_transformers_version("5.24.0")
    with pytest.raises(ImportError, match=r"supports transformers >=5\.0,<6 but transformers 4\.57\.1"):
        check_transformers_version("4.57.1")
    code = ("import warnings, transformers; transformers.__version__ = '4.57.1'\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); import kunlunbaize\n"
            "print(*[str(x.message) for x in w])")
    out = run_python(code)
    assert "Hugging Face integration is unavailable" in out.stdout and "pip install" in out.stdout


# ---------------------------------------------------------------------------------------------- model
@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_hf_model_computes_exactly_what_ours_does(cfg):
    ours = build(cfg)
    hf = to_hf_model(ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for m in (None, mask):
        want = ours(ids, attention_mask=m)
        got = hf(ids, attention_mask=m, mtp=True, output_hidden_states=True)
        assert torch.equal(want.logits, got.logits)
        assert len(want.mtp_logits) == cfg.mtp_depth
        for a, b in zip(want.mtp_logits, got.mtp_logits or (), strict=True):
            assert torch.equal(a, b)
    # the backbone/head split transformers, TRL and PEFT rely on
    assert isinstance(hf.base_model, KunlunBaizeModel) and hf.get_output_embeddings() is hf.lm_head
    base = hf.model(ids, output_hidden_states=True, use_cache=False)
    assert torch.equal(hf.lm_head(base.last_hidden_state), ours(ids).logits)
    assert len(base.hidden_states) == cfg.n_layers + 1
    assert torch.equal(base.hidden_states[-1], base.last_hidden_state)
    assert torch.equal(base.hidden_states[0], hf.get_input_embeddings()(ids))
    assert (hf.lm_head.weight is hf.model.embed.weight) == cfg.tie_embeddings


def test_loss_is_causal_lm_loss_and_mtp_gives_the_joint_loss():
    ours = build(tiny())
    hf = to_hf_model(ours)
    ids = torch.randint(0, 61, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    want = ours(ids, labels=labels)
    assert torch.allclose(hf(ids, labels=labels).loss, want.main_loss, atol=1e-6)
    joint = hf(ids, labels=labels, mtp=True)
    assert torch.allclose(joint.loss, want.loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(joint.mtp_losses, want.mtp_losses, strict=True))


def test_gradient_checkpointing_stores_less_with_identical_gradients():
    ours = build(tiny())
    ids = torch.randint(0, 61, (2, 16))

    def run(checkpointing: bool):
        hf = to_hf_model(ours).train()
        if checkpointing:
            # the transformers 5.x name; the older gradient_checkpointing_enable is a deprecated alias of it
            (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = hf(ids, labels=ids, mtp=True).loss
        loss.backward()
        return {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}, sum(saved)

    plain, stored_plain = run(False)
    ckpt, stored_ckpt = run(True)
    assert stored_ckpt < stored_plain / 2  # block activations are recomputed, not stored
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


@pytest.mark.parametrize("cfg", [tiny(), tiny(transformerx=False, mtp_depth=0), tiny(tie_embeddings=True)],
                         ids=["full", "plain", "tied"])
def test_save_and_load_pretrained_round_trip(cfg, tmp_path):
    hf = to_hf_model(build(cfg))
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again, KunlunBaizeForCausalLM)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    assert torch.equal(hf(ids).logits, again(ids).logits)
    assert (again.lm_head.weight is again.model.embed.weight) == cfg.tie_embeddings
    assert torch.equal(again.model.rope.inv_freq, hf.model.rope.inv_freq)


# ---------------------------------------------------------------------------------------------- generate
def generate_counting(hf: KunlunBaizeForCausalLM, *args, **kwargs) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``hf.generate(*args, **kwargs)`` and the shape (rows, tokens) of the input_ids of every forward it ran."""
    fed = []

    def record(_module, args, kw) -> None:
        fed.append(tuple((kw["input_ids"] if "input_ids" in kw else args[0]).shape))

    handle = hf.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return hf.generate(*args, **kwargs), fed
    finally:
        handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=config_id)
def test_hf_generate_greedy_equals_ours_and_reuses_the_cache(cfg):
    ours = build(cfg).double()
    hf = to_hf_model(ours, pad_token_id=0, eos_token_id=None)
    prompts = [[5, 9, 3, 7, 11, 2, 8], [4, 6, 1]]
    want = generate(ours, prompts, 12).tokens
    ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    for use_cache in (True, False):
        out, fed = generate_counting(hf, ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     use_cache=use_cache)
        assert out[:, 7:].tolist() == want
        # with the cache, the prompt once and then one new token per row and step; without, everything every step
        assert fed == ([(2, 7)] + [(2, 1)] * 11 if use_cache else [(2, 7 + i) for i in range(12)])


def test_beam_search_reorders_and_reuses_the_cache():
    hf = to_hf_model(build(tiny()).double(), pad_token_id=0, eos_token_id=None)
    ids = torch.tensor([[5, 9, 3, 7], [4, 6, 1, 2]])
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
    out, fed = generate_counting(hf, ids, use_cache=True, **kw)
    assert fed == [(6, 4)] + [(6, 1)] * 7  # 2 prompts × 3 beams
    assert torch.equal(out, hf.generate(ids, use_cache=False, **kw))


def test_generate_continues_a_returned_cache():
    hf = to_hf_model(build(tiny()).double(), pad_token_id=0, eos_token_id=None)
    ids = torch.tensor([[5, 9, 3, 7]])
    first = hf.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = first.get("cache", first.get("past_key_values"))
    assert cache.get_seq_length() == 7  # the last token generated is not fed yet
    out, fed = generate_counting(hf, first.sequences, cache=cache, max_new_tokens=3, do_sample=False)
    assert fed == [(1, 1)] * 3
    assert torch.equal(out, hf.generate(ids, max_new_tokens=7, do_sample=False))


def test_forward_builds_a_cache_only_when_asked_and_continues_it():
    hf = to_hf_model(build(tiny()))
    ids = torch.randint(0, 61, (2, 14))
    full = hf(ids)
    assert full.past_key_values is None  # preallocated, so not built for a plain forward
    first = hf(ids[:, :9], use_cache=True)
    assert first.past_key_values.get_seq_length() == 9
    rest = hf(ids[:, 9:], past_key_values=first.past_key_values)
    assert (rest.logits - full.logits[:, 9:]).abs().max() <= 1e-5
    assert rest.past_key_values.get_seq_length() == 14
    first = hf(ids[:, :9], use_cache=True)  # the newer name of the argument
    assert hf(ids[:, 9:], cache=first.past_key_values).past_key_values.get_seq_length() == 14
    with pytest.raises(ValueError, match="two different caches"):
        hf(ids[:, 9:], cache=first.past_key_values, past_key_values=hf(ids[:, :9], use_cache=True).past_key_values)


def test_a_foreign_non_empty_cache_is_refused():
    from transformers import DynamicCache

    hf = to_hf_model(build(tiny()))
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="InferenceCache"):
        hf(torch.tensor([[1, 2]]), past_key_values=cache)


# ------------------------------------------------------------------------------------ transformers' conventions
def test_missing_dense_residual_logits_are_initialised():
    """transformers initialises missing weights module by module, by each module's own parameters: the dense-residual
    logits (identity init: not zeros) must be reached, not left as uninitialised memory."""
    cfg = KunlunBaizeConfig.from_model_config(tiny(dense_init="identity"))
    fresh = KunlunBaizeModel.from_pretrained(None, config=cfg, state_dict={})
    want = KunlunBaizeModel(cfg).dense.logits
    for got, ref in zip(fresh.dense.logits, want, strict=True):
        assert torch.equal(got, ref)
    assert fresh.dense.logits[2][-1] > 2  # identity: the latest output weighted 0.95


def test_output_flags_fall_back_to_the_config():
    hf = to_hf_model(build(tiny()))
    ids = torch.tensor([[1, 2, 3]])
    hf.config.output_hidden_states, hf.config.return_dict = True, False
    out = hf(ids)
    assert isinstance(out, tuple) and len(out[1]) == hf.config.n_layers + 1  # (logits, hidden_states)
    assert hf(ids, output_hidden_states=False, return_dict=True).hidden_states is None
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        hf(ids, output_attentions=True)


@pytest.mark.parametrize("cfg", [tiny(), tiny(dense_residual=False, transformerx=False, mtp_depth=0)], ids=config_id)
def test_inputs_embeds_compute_what_input_ids_do(cfg):
    """inputs_embeds stand for the token embeddings in the trunk and the MTP depths, in forward and generate."""
    hf = to_hf_model(build(cfg).double(), pad_token_id=0, eos_token_id=None)
    ids = torch.tensor([[5, 9, 3, 7, 11], [0, 0, 4, 6, 1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    embeds = hf.get_input_embeddings()(ids)
    a, b = hf(ids, attention_mask=mask, mtp=True), hf(inputs_embeds=embeds, attention_mask=mask, mtp=True)
    assert torch.equal(a.logits, b.logits) and all(map(torch.equal, a.mtp_logits or (), b.mtp_logits or ()))
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want[:, 5:])  # generate returns only the new tokens when given embeddings
    with pytest.raises(ValueError, match="inputs_embeds must be a float tensor"):
        hf(inputs_embeds=torch.zeros(1, 2, 7))


def test_generate_returns_the_hidden_states_of_every_step():
    hf = to_hf_model(build(tiny()).double(), pad_token_id=0, eos_token_id=None)
    out = hf.generate(torch.tensor([[5, 9, 3, 7]]), max_new_tokens=3, do_sample=False, output_hidden_states=True,
                      return_dict_in_generate=True)
    assert len(out.hidden_states) == 3
    assert [tuple(h.shape) for h in out.hidden_states[0]] == [(1, 4, 32)] * (hf.config.n_layers + 1)
    assert [tuple(h.shape) for h in out.hidden_states[1]] == [(1, 1, 32)] * (hf.config.n_layers + 1)


def test_assisted_decoding_is_refused_with_a_reason():
    from transformers import GenerationConfig

    hf = to_hf_model(build(tiny()), pad_token_id=0, eos_token_id=None)
    ids = torch.tensor([[5, 9, 3, 7]])
    for kw in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=hf),
               dict(generation_config=GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=2))):
        with pytest.raises(ValueError, match=r"assisted decoding .* kunlun generate --speculative"):
            hf.generate(ids, max_new_tokens=2, **kw)


def test_classifier_from_a_causal_lm_checkpoint_reports_its_new_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    to_hf_model(build(tiny())).save_pretrained(tmp_path)
    _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1, output_loading_info=True)
    assert set(info["missing_keys"]) == {"score.weight"}
    assert not info["unexpected_keys"]  # the LM head and MTP depths are left out on purpose


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    main(["export", "--hf", str(out), "--checkpoint", str(trained_run)])
    return out


@pytest.mark.slow
def test_export_loads_back_with_identical_logits(trained_run, exported):
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert json.loads((exported / "config.json").read_text())["model_type"] == "kunlunbaize"
    ours, _ = load_model(trained_run)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    tok = AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([tok.encode("def heappush(heap, item):")])
    assert torch.equal(ours(ids).logits, hf(ids).logits)
    back, _ = load_model(exported)  # `kunlun generate` reads exports too
    assert from_hf(hf.state_dict()).keys() == back.state_dict().keys()
    assert torch.equal(back(ids).logits, ours(ids).logits)
    # transformers' own generate and pipeline on the export == our greedy decoding
    want = generate(ours, [ids[0].tolist()], 20).tokens[0]
    got = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got[:len(want)] == want
    from transformers import pipeline

    text = pipeline("text-generation", model=str(exported))("def ", max_new_tokens=8, do_sample=False)
    assert text[0]["generated_text"].startswith("def ")


def test_exported_tokenizer_pads_left_and_knows_the_context(exported):
    """What `kunlun export` sets up is in tokenizer_config.json, so the guide's batched example works as written."""
    tok = AutoTokenizer.from_pretrained(exported)
    assert (tok.padding_side, tok.model_max_length, tok.pad_token) == ("left", 64, tok.eos_token)
    model = AutoModelForCausalLM.from_pretrained(exported)
    prompts = ["def parse(", "import"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is padded on the left
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    for row, prompt in zip(out, prompts, strict=True):
        alone = model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=12, do_sample=False)
        assert tok.decode(row, skip_special_tokens=True) == tok.decode(alone[0], skip_special_tokens=True)


def test_generate_cli_reads_an_export(trained_run, exported, capsys):
    main(["generate", "class Heap:", "--checkpoint", str(trained_run), "--max-new-tokens", "16"])
    from_run = capsys.readouterr().out
    main(["generate", "class Heap:", "--checkpoint", str(exported), "--max-new-tokens", "16", "--speculative"])
    assert capsys.readouterr().out == from_run


def test_export_errors_leave_nothing_behind(trained_run, exported, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(exported, dst)
    with pytest.raises(SystemExit, match=r"not empty.*--overwrite"):
        main(["export", "--hf", str(dst), "--checkpoint", str(trained_run)])
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["export", "--hf", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "missing")])
    assert not (tmp_path / "x").exists()
    main(["export", "--hf", str(dst), "--checkpoint", str(trained_run), "--overwrite", "--dtype", "bfloat16"])
    assert AutoModelForCausalLM.from_pretrained(dst).dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left


# ---------------------------------------------------------------------------------------------- ecosystem
def write_mc_task(folder: Path, docs: list[dict]) -> None:
    """A local multiple-choice lm-eval task ``kb_mc`` over ``docs`` (question, choices, answer) in ``folder``."""
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "kb_mc.yaml").write_text(textwrap.dedent(f"""\
        task: kb_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        target_delimiter: ""
        metric_list:
          - metric: acc
        """))


@pytest.mark.slow
def test_lm_eval_hflm_scores_a_local_multiple_choice_task(trained_run, exported, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    docs = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " heap", " None"], "answer": 0},
            {"question": "import", "choices": [" os", " )", " ]]"], "answer": 0},
            {"question": "for i in", "choices": [" range(n):", " def", " +="], "answer": 0}]
    write_mc_task(tmp_path, docs)
    lm = HFLM(pretrained=str(exported), backend="causal", batch_size=2, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=["kb_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True)
    assert 0.0 <= res["results"]["kb_mc"]["acc,none"] <= 1.0
    ours, _ = load_model(trained_run)
    tok = AutoTokenizer.from_pretrained(exported)
    for sample in res["samples"]["kb_mc"]:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            loglik = float(resp[0][0])
            ctx, full = tok.encode(doc["question"]), tok.encode(doc["question"] + choice)
            logp = torch.log_softmax(ours(torch.tensor([full])).logits[0].double(), -1)
            want = sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))
            assert loglik == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
@pytest.mark.subprocess
def test_lm_eval_command_line_scores_an_export(exported, tmp_path):
    """The real lm-eval CLI (through ``python -m kunlunbaize.lm_eval``) loads the export and reports the accuracy
    our model scores in-process: answers are set so that the model is right on exactly half the questions."""
    pytest.importorskip("lm_eval")
    questions = [("def add(a, b):\n    return", [" a + b", " heap", " None"]), ("import", [" os", " )", " ]]"]),
                 ("for i in", [" range(n):", " def", " +="]), ("class", [" Heap:", " 3", " +"])]
    ours, _ = load_model(exported)
    tok = AutoTokenizer.from_pretrained(exported)

    def loglik(context: str, choice: str) -> float:
        ctx, full = tok.encode(context), tok.encode(context + choice)
        logp = torch.log_softmax(ours(torch.tensor([full])).logits[0].double(), -1)
        return sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))

    docs = []
    for n, (question, choices) in enumerate(questions):
        best = max(range(len(choices)), key=lambda i: loglik(question, choices[i]))
        docs.append({"question": question, "choices": choices, "answer": best if n % 2 else (best + 1) % 3})
    write_mc_task(tmp_path, docs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kunlunbaize.lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={exported},backend=causal", "--tasks", "kb_mc", "--include_path", str(tmp_path),
           "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results.read_text())["results"]["kb_mc"]["acc,none"] == 0.5


def test_trl_dpo_trains_an_export_without_a_reference_model(exported, tmp_path):
    """TRL builds the reference model from the path (reading config.auto_map); one DPO step runs."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    assert KunlunBaizeConfig().auto_map == {} and "auto_map" not in (exported / "config.json").read_text()
    pairs = Dataset.from_list([{"prompt": "def add(a, b):", "chosen": " return a + b", "rejected": " pass"},
                               {"prompt": "import", "chosen": " os", "rejected": " )"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, per_device_train_batch_size=2,
                     save_strategy="no", max_length=32)
    trainer = DPOTrainer(model=str(exported), args=args, train_dataset=pairs)
    assert isinstance(trainer.model, KunlunBaizeForCausalLM)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.train().global_step == 1
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_peft_lora_attaches_to_the_attention_projections():
    peft = pytest.importorskip("peft")
    cfg = tiny()
    hf = to_hf_model(build(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    before = hf(ids).logits
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wk", "wv", "wo"]))
    wrapped = [n for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    n_attention = cfg.n_layers * (1 + len(cfg.conv_kernel_sizes)) + cfg.mtp_depth  # self, conv-cross, MTP
    assert len(wrapped) == 4 * n_attention
    assert all(n.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo") for n in wrapped)
    assert torch.equal(lora(ids).logits, before)  # LoRA's B starts at zero
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    lora.train()
    losses = []
    for _ in range(5):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.eval()
    tuned = lora(ids).logits
    merged = lora.merge_and_unload()
    assert torch.allclose(merged(ids).logits, tuned, atol=1e-5)
    assert not torch.equal(tuned, before)
