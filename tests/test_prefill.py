"""Chunked prefill equals a one-shot prefill: logits, final hidden states and every cache tensor, for every switch
combination and chunk sizes that split the conv history (k − 1 tokens) and the MTP shift; generation, speculative
decoding, the static decoder, the Llama baseline, evaluation and serving read long prompts in chunks with the same
results; bad chunk sizes and over-long prompts get clear errors."""

from __future__ import annotations

import pytest
import torch

from kunlunbaize.infer import StaticDecoder, generate, speculative_generate
from kunlunbaize.model import check_prefill_chunk, prefill

from .helpers import build, config_id, switch_configs, tiny

CONFIGS = switch_configs()
FAST = {0, 5, 10}  # the fast subset's configs (every switch combination runs without -m 'not slow')
SWEEP = [pytest.param(c, id=config_id(c), marks=() if i in FAST else pytest.mark.slow) for i, c in enumerate(CONFIGS)]
T = 19
TOL = 1e-12  # float64: the chunked and one-shot computations differ only in the order of a few sums


def chunk_sizes(cfg) -> list[int | None]:
    """1, k−1 and k for the largest kernel k, one past the MTP depth, primes, and one chunk (None)."""
    k = max(cfg.conv_kernel_sizes)
    sizes = {1, max(1, k - 1), k, cfg.mtp_depth + 1, 5, 7}
    return [*sorted(sizes), None]


def one_shot(model, x, mask=None):
    cache = model.new_cache(x.shape[0], T + 4)
    out = model(x, cache=cache, attention_mask=mask)  # the plain forward, MTP depths included
    return out, cache


def assert_same_cache(a, b) -> None:
    assert (a.length, a.padded) == (b.length, b.padded)
    for (ta, _), (tb, _) in zip(a.slot_tensors(), b.slot_tensors(), strict=True):
        if ta.dtype == torch.bool:
            assert torch.equal(ta, tb)
        else:
            torch.testing.assert_close(ta, tb, rtol=0, atol=TOL)


@pytest.mark.parametrize("cfg", SWEEP)
def test_chunked_prefill_equals_one_shot(cfg):
    model = build(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        ref, ref_cache = one_shot(model, x)
        for chunk in chunk_sizes(cfg):
            cache = model.new_cache(2, T + 4)
            out = prefill(model, x, cache, chunk, keep=None)
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=TOL, msg=f"chunk {chunk}")
            torch.testing.assert_close(out.hidden, ref.hidden, rtol=0, atol=TOL, msg=f"chunk {chunk}")
            assert_same_cache(cache, ref_cache)


@pytest.mark.parametrize("cfg", SWEEP[::2])
def test_chunked_prefill_of_a_left_padded_batch_equals_one_shot(cfg):
    model = build(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :6], mask[2, :13] = 0, 0  # padding that ends inside a chunk and across chunk boundaries
    with torch.no_grad():
        ref, ref_cache = one_shot(model, x, mask)
        for chunk in (1, max(cfg.conv_kernel_sizes) - 1 or 1, 7):
            cache = model.new_cache(3, T + 4)
            out = prefill(model, x, cache, chunk, mask, keep=5)
            torch.testing.assert_close(out.logits, ref.logits[:, -5:], rtol=0, atol=TOL)
            assert_same_cache(cache, ref_cache)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.mtp_depth][:2], ids=config_id)
def test_decoding_continues_a_chunked_prefill_exactly(cfg):
    """The tokens after a chunked prefill: the same logits step after step as after a one-shot one."""
    model = build(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad():
        _, ref_cache = one_shot(model, x[:, :13])
        cache = model.new_cache(1, T + 4)
        prefill(model, x[:, :13], cache, 3)
        for i in range(13, T):
            a, b = model(x[:, i:i + 1], cache=ref_cache), model(x[:, i:i + 1], cache=cache)  # MTP logits too
            torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=TOL)
            for da, db in zip(a.mtp_logits, b.mtp_logits, strict=True):
                torch.testing.assert_close(db, da, rtol=0, atol=TOL)


@pytest.mark.parametrize("cfg", [p for p in SWEEP if p.values[0].mtp_depth])
def test_speculative_decoding_after_a_chunked_prefill_is_plain_greedy(cfg):
    model = build(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (29,)).tolist()
    plain = generate(model, [prompt], 16, prefill_chunk=None).tokens[0]
    for chunk in (1, max(cfg.conv_kernel_sizes), 7):
        assert speculative_generate(model, prompt, 16, prefill_chunk=chunk).tokens[0] == plain


def test_generation_and_the_static_decoder_give_the_same_tokens_at_any_chunk():
    cfg = tiny(mtp_depth=2, conv_kernel_sizes=(3, 7))
    model = build(cfg)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (31, 9, 20)]
    ref = generate(model, prompts, 12, prefill_chunk=None).tokens
    for chunk in (1, 6, 13):
        assert generate(model, prompts, 12, prefill_chunk=chunk).tokens == ref
    decoder = StaticDecoder(model, 3, compile=False)
    assert generate(model, prompts, 12, decoder=decoder, prefill_chunk=5).tokens == ref


def test_generate_allocates_the_cache_to_what_it_needs(monkeypatch):
    model = build(tiny())
    sizes = []
    original = type(model).new_cache

    def recorded(self, batch_size, max_len=None, **kw):
        sizes.append(max_len)
        return original(self, batch_size, max_len, **kw)

    monkeypatch.setattr(type(model), "new_cache", recorded)
    generate(model, [[1, 2, 3], [4] * 10], 5)
    speculative_generate(model, [1, 2, 3], 5)
    assert sizes == [15, 8]  # the longest prompt plus the tokens to generate, not max_seq_len (64)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_a_chunk_below_one_token_is_refused(bad):
    model = build(tiny())
    with pytest.raises(ValueError, match="prefill chunk must be a whole number of tokens >= 1"):
        check_prefill_chunk(bad)
    with pytest.raises(ValueError, match="prefill chunk"):
        generate(model, [[1, 2, 3]], 4, prefill_chunk=bad)
    with pytest.raises(ValueError, match="prefill chunk"):
        speculative_generate(model, [1, 2, 3], 4, prefill_chunk=bad)
    with pytest.raises(ValueError, match="prefill chunk"):
        prefill(model, torch.tensor([[1, 2]]), model.new_cache(1, 4), bad)


def test_a_prompt_beyond_the_context_is_refused_clearly():
    cfg = tiny()
    model = build(cfg)
    too_long = [1] * (cfg.max_seq_len + 5)
    with pytest.raises(ValueError, match=f"prompt 0 has {len(too_long)} tokens; at most {cfg.max_seq_len - 1} fit"):
        generate(model, [too_long], 4, prefill_chunk=7)
    with pytest.raises(ValueError, match="exceed the context of 20"), torch.no_grad():
        prefill(model, torch.tensor([too_long[:30]]), model.new_cache(1, 20), 7)



def test_the_serving_engine_prefills_in_chunks_with_the_same_tokens_and_prompt_logprobs():
    from kunlunbaize.serve.engine import Engine, Params

    from .test_serve import CharTokenizer, _run

    cfg = tiny(vocab_size=26, mtp_depth=2)
    model = build(cfg)
    prompts = [torch.randint(0, 26, (n,)).tolist() for n in (23, 9)]
    alone = [generate(model, [p], 8, prefill_chunk=None).tokens[0] for p in prompts]
    with pytest.raises(ValueError, match="prefill chunk"):
        Engine(model, CharTokenizer(), prefill_chunk=0)
    engine = Engine(model, CharTokenizer(), max_batch=2, prefill_chunk=4)
    try:
        got = _run(engine, [(p, Params(max_tokens=8, prompt_logprobs=1)) for p in prompts])
    finally:
        engine.shutdown(10)
    assert [r.tokens for r in got] == alone
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompts[0]])).logits[0], -1)
    for i, entry in enumerate(got[0].prompt_logprobs[1:], start=1):
        assert entry.logprob == pytest.approx(full[i - 1, prompts[0][i]].item(), abs=1e-5)


def eval_model(model, chunk):
    """An :class:`EvalModel` around ``model`` (no checkpoint: only what log-likelihoods read)."""
    from kunlunbaize.eval.model import EvalModel

    em = EvalModel.__new__(EvalModel)
    em.model, em.prefill_chunk, em.device, em.context = model, chunk, torch.device("cpu"), 64
    return em


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["kunlunbaize", "llama"])
def test_evaluation_log_likelihoods_are_the_same_at_any_chunk(arch):
    model = build(tiny()) if arch == "kunlunbaize" else tiny_llama()
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randint(0, 61, (n,), generator=g).tolist(), torch.randint(0, 61, (m,), generator=g).tolist())
             for n, m in ((30, 4), (7, 1), (18, 9))]
    ref = eval_model(model, None).loglikelihoods(pairs)
    for chunk in (1, 4, 11):
        assert eval_model(model, chunk).loglikelihoods(pairs) == pytest.approx(ref, abs=1e-4)


def test_the_llama_baselines_generation_is_the_same_at_any_chunk():
    from kunlunbaize.infer.llama import generate_llama, llama_prefill

    model = tiny_llama()
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (21, 8)]
    ref = generate_llama(model, prompts, 10, prefill_chunk=None).tokens
    for chunk in (1, 5, 8):
        assert generate_llama(model, prompts, 10, prefill_chunk=chunk).tokens == ref
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        hidden = llama_prefill(model, ids, chunk=6, keep=None)[0]
        torch.testing.assert_close(model.lm_head(hidden), whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prefill chunk"):
        generate_llama(model, prompts, 4, prefill_chunk=0)


@pytest.mark.parametrize("command", [["generate", "x"], ["eval"], ["serve"]])
def test_the_command_line_refuses_a_chunk_below_one(command, capsys):
    from kunlunbaize.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(command).prefill_chunk == 512
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*command, "--prefill-chunk", "0"])
    assert e.value.code == 2 and "--prefill-chunk: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_a_compiled_decoders_cache_holds_what_the_generation_needs_rounded_to_a_power_of_two():
    from kunlunbaize.cli.generate import static_cache_len

    assert static_cache_len([[1] * 10, [2] * 3], 5, 64) == 16  # 15 slots needed
    assert static_cache_len([[1] * 11], 5, 64) == 16
    assert static_cache_len([[1] * 12], 5, 64) == 32
    assert static_cache_len([[1] * 40], 30, 64) == 64  # never past the context


@pytest.mark.parametrize("rope_type", ["linear", "yarn", "llama3"])
def test_chunked_prefill_equals_one_shot_under_fixed_rope_scaling(rope_type):
    """Past the original context with a scaled rotary table, chunks still give the one-shot logits and cache
    (dynamic NTK's frequencies depend on the forward's length, as in transformers, so it is left out: see
    docs/ARCHITECTURE.md)."""
    import dataclasses

    scaling = {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 8}
    cfg = dataclasses.replace(tiny(), max_seq_len=64, rope_scaling=scaling)
    torch.manual_seed(0)
    model = build(cfg).double().eval()
    x = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad():
        whole, c1 = one_shot(model, x)
        c2 = model.new_cache(1, T + 4)
        out = prefill(model, x, c2, chunk=5, keep=None)
    assert torch.allclose(out.logits, whole.logits, atol=TOL, rtol=0)
    assert_same_cache(c1, c2)
