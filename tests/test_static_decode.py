"""Static decoding (``StaticDecoder``): the fixed-shape trunk step equals the eager cached forward, generation
through it gives the eager tokens (plain, padded batch, sampling, speculative), its one cache is reused across
calls, and the compiled step is traced once per number of new tokens."""

import shutil

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from kunlunbaize.infer import DraftVocab, StaticDecoder, frequent_tokens, generate, speculative_generate
from kunlunbaize.infer.sampling import SamplingParams
from kunlunbaize.infer.speculative import draft
from kunlunbaize.infer.static import BatchDecoder, CompileOptions, PromptFiller, fill_buckets, row_buckets, slot_buckets
from kunlunbaize.model import prefill
from kunlunbaize.model.cache import CacheOverflowError

from .helpers import build, tiny


def model64(seed=0, **kw):
    return build(tiny(**kw), seed).double().eval()


DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4}  # scaling from token 5 on


@pytest.mark.parametrize("kw", [dict(), dict(transformerx=False), dict(dense_residual=False, mtp_depth=1),
                                dict(mtp_depth=3, conv_kernel_sizes=(2, 9)), dict(mtp_depth=0),
                                dict(rope_scaling=DYNAMIC), dict(rope_scaling={**DYNAMIC, "rope_type": "yarn"})])
@torch.inference_mode()
def test_step_equals_eager_cached_forward(kw):
    """Logits, hidden states and every cache buffer written (self-attention, conv history, cross-attention and
    MTP keys) equal the eager path's, for 1 and 3 new tokens and a left-padded batch."""
    model = model64(**kw)
    V = model.config.vocab_size
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # row 1: a 5-token prompt behind 4 pads
    eager = model.new_cache(2, 40, mtp=model.mtp is not None)
    out = model(ids, cache=eager, attention_mask=mask, mtp=False)
    dec = StaticDecoder(model, 2, 40, mtp=model.mtp is not None, compile=False)
    static = dec.prefill(ids, mask)
    torch.testing.assert_close(static.logits, out.logits)
    feed = out.logits[:, -1:].argmax(-1)
    for n in (1, 3, 1, 2):
        feed = torch.cat([feed, torch.randint(1, V, (2, n - 1))], 1)
        ref = model(feed, cache=eager, mtp=False)
        logits, hidden = dec.step(feed)
        torch.testing.assert_close(logits, ref.logits)
        torch.testing.assert_close(hidden, ref.hidden)
        feed = logits[:, -1:].argmax(-1)
    assert dec.cache.length == eager.length
    L = eager.length
    for (a, dim), (b, _) in zip(dec.cache.slot_tensors(), eager.slot_tensors(), strict=True):
        torch.testing.assert_close(a.narrow(dim, 0, L), b.narrow(dim, 0, L))


@torch.inference_mode()
def test_generate_through_decoder_equals_eager():
    model = model64()
    V = model.config.vocab_size
    dec = StaticDecoder(model, 3, compile=False)
    prompts = [torch.randint(1, V, (n,)).tolist() for n in (9, 2, 5)]
    assert generate(model, prompts, 12, eos_id=0, decoder=dec).tokens == generate(model, prompts, 12, eos_id=0).tokens
    sampling = SamplingParams(temperature=0.9, top_k=20)
    assert (generate(model, prompts, 12, sampling, seed=3, decoder=dec).tokens
            == generate(model, prompts, 12, sampling, seed=3).tokens)


@torch.inference_mode()
def test_decoder_cache_is_reused_and_reset():
    """One decoder serves prompts of other lengths: its cache (not a new one) holds each generation's tokens,
    and nothing of the previous one leaks in."""
    model = model64()
    V = model.config.vocab_size
    dec = StaticDecoder(model, 1, compile=False)
    keys = dec.cache.layers[0].self_attn.k
    for n in (12, 3, 7):
        prompt = torch.randint(1, V, (n,)).tolist()
        got = generate(model, [prompt], 10, decoder=dec).tokens[0]
        assert got == generate(model, [prompt], 10).tokens[0]
        assert dec.cache.layers[0].self_attn.k is keys  # the same buffer every time
        assert dec.cache.length == n + 9  # the last token is chosen, never fed
        assert keys[0, :, :n + 9].abs().sum(-1).gt(0).all()  # every fed slot was written through this cache


@pytest.mark.parametrize(("kw", "adaptive"), [(dict(mtp_depth=1), False), (dict(mtp_depth=3), True),
                                              (dict(mtp_depth=2, transformerx=False), False)])
@pytest.mark.slow
@torch.inference_mode()
def test_speculative_through_decoder_equals_plain_greedy(kw, adaptive):
    for seed in range(2):
        model = model64(seed, **kw)
        dec = StaticDecoder(model, 1, mtp=True, compile=False)
        prompt = torch.randint(0, model.config.vocab_size, (1 + 4 * seed,)).tolist()  # as short as 1 token
        plain = generate(model, [prompt], 25).tokens[0]
        spec = speculative_generate(model, prompt, 25, adaptive=adaptive, decoder=dec)
        assert spec.tokens[0] == plain
        assert spec.stats["tokens_per_trunk_forward"] > 1  # drafts were accepted through the static verification
        vocab = frequent_tokens(torch.arange(model.config.vocab_size), 30)
        assert speculative_generate(model, prompt, 25, adaptive=adaptive, draft_vocab=vocab,
                                    decoder=dec).tokens[0] == plain


@pytest.mark.parametrize(("vocab_size", "scaling"), [(None, None), (30, None), (None, DYNAMIC)])
@torch.inference_mode()
def test_draft_step_equals_eager_drafting(vocab_size, scaling):
    """The static drafting step (``StaticDecoder.draft``) draws the eager drafts from the same distributions, and
    writes the same keys into the depths' caches (with dynamic NTK: at the frequencies of the sequence so far)."""
    model = model64(0, mtp_depth=3, rope_scaling=scaling)
    V = model.config.vocab_size
    vocab = DraftVocab(model, frequent_tokens(torch.arange(V), vocab_size)) if vocab_size else None
    prompt = torch.randint(0, V, (1, 7))
    cache = model.new_cache(1, 20)
    hidden = model(prompt, cache=cache, mtp=False).hidden[:, -1:]
    dec = StaticDecoder(model, 1, 20, mtp=True, compile=False)
    static_hidden = dec.prefill(prompt).hidden[:, -1:]
    sampling = SamplingParams(temperature=1.0)
    want, want_q = draft(model, cache, hidden, 5, 3, sampling, torch.Generator().manual_seed(0), vocab)
    got, got_q = draft(model, dec.cache, static_hidden, 5, 3, sampling, torch.Generator().manual_seed(0), vocab, dec)
    assert got == want
    for q, p in zip(got_q, want_q, strict=True):
        torch.testing.assert_close(q, p)
    for mine, theirs in zip(dec.cache.mtp, cache.mtp, strict=True):
        torch.testing.assert_close(mine.k[:, :, :7], theirs.k[:, :, :7])
        torch.testing.assert_close(mine.v[:, :, :7], theirs.v[:, :, :7])


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_once_per_token_count():
    """Compiled (fullgraph, a counting backend): plain decoding of prompts of three lengths traces one graph;
    speculative verification adds one per draft length. Outputs equal eager."""
    model = build(tiny(n_layers=1, mtp_depth=2), 0).eval()
    V = model.config.vocab_size
    counter = CompileCounter()
    dec = StaticDecoder(model, 1, backend=counter)
    for n in (4, 9, 13):
        prompt = torch.randint(1, V, (n,)).tolist()
        assert generate(model, [prompt], 8, decoder=dec).tokens[0] == generate(model, [prompt], 8).tokens[0]
    assert counter.frame_count == 1
    spec = StaticDecoder(model, 1, mtp=True, backend=counter)
    for k in (1, 2):
        prompt = torch.randint(1, V, (6,)).tolist()
        got = speculative_generate(model, prompt, 10, draft_len=k, decoder=spec).tokens[0]
        assert got == generate(model, [prompt], 10).tokens[0]
    assert counter.frame_count == 1 + 2 + 2  # verification of 2 and of 3 tokens; drafting at depths 1 and 2


@torch.inference_mode()
def test_decoder_errors():
    model = model64()
    dec = StaticDecoder(model, 2, 20, compile=False)
    with pytest.raises(ValueError, match="batch 2"):
        generate(model, [[1, 2]], 4, decoder=dec)
    with pytest.raises(ValueError, match="another model"):
        generate(model64(1), [[1, 2], [3]], 4, decoder=dec)
    with pytest.raises(ValueError, match="mtp=True"):
        speculative_generate(model, [1, 2], 4, decoder=StaticDecoder(model, 1, compile=False))
    with pytest.raises(ValueError, match="MTP depths"):
        StaticDecoder(model64(mtp_depth=0), mtp=True, compile=False)
    dec.prefill(torch.ones(2, 18, dtype=torch.long))
    with pytest.raises(CacheOverflowError, match="context of 20"):
        dec.step(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 19 fit"):  # prompts are fitted to the decoder's context
        generate(model, [[1] * 20, [2]], 4, decoder=dec)


@pytest.mark.slow
@torch.inference_mode()
def test_many_decoders_each_compile_their_own_steps():
    """Decoders do not share one compile cache: three speculative decoders (3 step shapes each, 9 step graphs, one
    more than Dynamo's per-function recompile limit of 8 allows) stay within the limit and each traces only its own
    shapes."""
    from torch._dynamo.config import recompile_limit

    model = build(tiny(n_layers=1, mtp_depth=2), 0).eval()
    prompt = torch.randint(1, model.config.vocab_size, (6,)).tolist()
    want = generate(model, [prompt], 10).tokens[0]
    n = recompile_limit // 3 + 1  # shared, their step graphs would exceed the limit
    counts = []
    for _ in range(n):
        counter = CompileCounter()
        dec = StaticDecoder(model, 1, mtp=True, backend=counter)
        assert generate(model, [prompt], 10, decoder=dec).tokens[0] == want
        assert speculative_generate(model, prompt, 10, draft_len=2, decoder=dec).tokens[0] == want
        counts.append(counter.frame_count)
    assert counts == [5] * n  # 1 new token; verification of 3 and (the budget's end) 2; drafting at depths 1, 2


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor's CPU code generation needs a C++ compiler")
@pytest.mark.slow
@torch.inference_mode()
def test_cpu_max_autotune_uses_cpp_gemm_templates():
    """``mode="max-autotune"`` on a CPU: the step's matrix products run inductor's C++ GEMM templates (frozen,
    prepacked weights), and greedy decoding still gives the eager tokens. Every matrix product of the model is
    32 × 32 (kv heads = heads, each of the 2 FFNs 64 / 2 wide, vocabulary 32): the autotuning (a C++ build per
    candidate kernel, seconds each) runs for one weight shape (two input layouts), not five."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    model = build(tiny(n_layers=1, mtp_depth=0, n_kv_heads=4, ffn_hidden=64, vocab_size=32), 0).eval()
    prompt = torch.randint(1, model.config.vocab_size, (5,)).tolist()
    counters.clear()
    dec = StaticDecoder(model, 1, mode="max-autotune")
    with fresh_cache():  # compiled here, not loaded from inductor's on-disk cache (which counts nothing)
        got = generate(model, [prompt], 6, decoder=dec).tokens[0]
    assert got == generate(model, [prompt], 6).tokens[0]
    assert counters["inductor"]["cpp_templated_kernel_counter"] > 0
    assert not dec._clone  # no CUDA graphs on a CPU: outputs need no copy
    with pytest.raises(ValueError, match="not both"):
        StaticDecoder(model, 1, mode="max-autotune", options={"freezing": True})


def test_row_buckets_are_powers_of_two_and_the_batch():
    assert row_buckets(1) == (1,)
    assert row_buckets(16) == (1, 2, 4, 8, 16)
    assert row_buckets(5) == (1, 2, 4, 5)
    with pytest.raises(ValueError, match="max_batch"):
        row_buckets(0)


def _step_as_eager(model, dec, eager, feed: torch.Tensor) -> torch.Tensor:
    """One step of the batch decoder ``dec`` on ``feed`` [rows, 1] checked against the eager forward over the same
    rows of the cache ``eager``; the next greedy tokens."""
    view = eager.rows(feed.shape[0])
    ref = model(feed, cache=view, mtp=False)
    eager.length = view.length
    logits, hidden = dec.step(feed)
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(hidden, ref.hidden)
    return logits[:, -1:].argmax(-1)


@torch.inference_mode()
def test_batch_decoder_steps_the_first_rows_as_the_eager_forward_does():
    """Running rows of a padded batch cache, padded with dummy rows to their bucket: logits, hidden states and the
    running rows' cache equal the eager forward on those rows alone."""
    model = model64()
    V = model.config.vocab_size
    ids = torch.randint(1, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    prompts = model.new_cache(3, 9)
    model(ids, cache=prompts, attention_mask=mask, mtp=False)
    batch, eager = model.new_cache(4, 40), model.new_cache(4, 40)
    for cache in (batch, eager):
        cache.length = 9
        for r in range(3):
            cache.place_row(r, prompts, r)
            cache.valid[r, :9] = prompts.valid[r]
    dec = BatchDecoder(model, batch, CompileOptions(compile=False))
    assert dec.buckets == (1, 2, 4) and dec.bucket(3) == 4 and dec.bucket(1) == 1
    feed = torch.randint(1, V, (3, 1))
    for rows in (3, 3, 2, 1):
        feed = _step_as_eager(model, dec, eager, feed[:rows])
    assert batch.length == eager.length == 13
    for (a, dim), (b, _) in zip(batch.slot_tensors(), eager.slot_tensors(), strict=True):
        torch.testing.assert_close(a[:1].narrow(dim, 0, 13), b[:1].narrow(dim, 0, 13))


def test_batch_decoder_errors():
    model = model64(mtp_depth=0)
    with pytest.raises(ValueError, match="at most 128"):
        BatchDecoder(model, model.new_cache(200, 8), CompileOptions(compile=False))
    dec = BatchDecoder(model, model.new_cache(4, 8), CompileOptions(compile=False))
    for rows in (0, 5):
        with pytest.raises(ValueError, match="do not fit a batch of 4"):
            dec.bucket(rows)
    dec.warm_up()
    assert dec.cache.length == 0 and bool(dec.cache.valid.all())
    dec.step(torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="before its cache holds tokens"):
        dec.warm_up()


def test_slot_buckets_halve_the_context():
    assert slot_buckets(256, 3) == (64, 128, 256)
    assert slot_buckets(256, 1) == (256,)
    assert slot_buckets(40, 3) == (10, 20, 40)
    assert slot_buckets(5, 5) == (1, 2, 3, 5)
    with pytest.raises(ValueError, match="slot_buckets must be >= 1"):
        slot_buckets(256, 0)


@torch.inference_mode()
def test_each_slot_bucket_steps_as_the_eager_forward_and_a_row_crosses_them_exactly():
    """Rows decoding from slot 3 to the end of a 40-slot cache step through the 10-, 20- and 40-slot steps of their
    bucket in turn (the smallest that holds their tokens); every step's logits and hidden states, and the cache
    after it, equal the eager forward's on those rows alone. Buckets of under half the batch read every slot."""
    model = model64(transformerx=True)
    V = model.config.vocab_size
    batch, eager = model.new_cache(4, 40), model.new_cache(4, 40)
    dec = BatchDecoder(model, batch, CompileOptions(compile=False))
    assert dec.slot_buckets == {1: (40,), 2: (10, 20, 40), 4: (10, 20, 40)}
    assert set(dec.decoders) == {(1, 40), (2, 10), (2, 20), (2, 40), (4, 10), (4, 20), (4, 40)}
    ids = torch.randint(1, V, (3, 3))
    for cache in (batch, eager):
        model(ids, cache=cache.rows(3), mtp=False)
        cache.length = 3
    used = []
    step = dec.step

    def spy(feed):
        used.append(dec.slots(feed.shape[0], batch.length + feed.shape[1]))
        return step(feed)

    dec.step = spy
    feed = torch.randint(1, V, (3, 1))
    while batch.length < 40:
        feed = _step_as_eager(model, dec, eager, feed)
    assert used == [10] * 7 + [20] * 10 + [40] * 20
    for (a, _), (b, _) in zip(batch.slot_tensors(), eager.slot_tensors(), strict=True):
        torch.testing.assert_close(a[:3], b[:3])
    assert dec.slots(1, 5) == 40 and dec.slots(2, 20) == 20 and dec.slots(2, 21) == 40
    with pytest.raises(CacheOverflowError, match="41 tokens exceed"):
        dec.slots(4, 41)


@pytest.mark.parametrize("kw", [dict(), dict(transformerx=False, dense_residual=False),
                                dict(conv_kernel_sizes=(2, 9)), dict(rope_scaling=DYNAMIC)])
@torch.inference_mode()
def test_a_right_padded_fill_writes_and_returns_what_prefilling_each_prompt_alone_does(kw):
    """Two prompts of different lengths right-padded to the fill's 16 slots and read in one step: each row's last
    logits and hidden state, and its prompt's slots of every cache buffer (self-attention, the causal convolutions'
    input history, the conv scales' cross-attention keys), equal an unpadded eager prefill of that prompt alone;
    what the padding wrote after a prompt is never read back. (With dynamic NTK the rows share the longest row's
    rotary length, as a left-padded eager batch does: there the longest row is checked, and the engine fills one
    prompt at a time.)"""
    model = model64(**kw)
    dec = StaticDecoder(model, batch_size=2, max_len=16, compile=False)
    for lengths in ((5, 16), (1, 11)):
        prompts = [torch.randint(1, model.config.vocab_size, (n,)).tolist() for n in lengths]
        ids = torch.tensor([p + [7] * (16 - len(p)) for p in prompts])
        logits, hidden = dec.fill(ids, torch.tensor(lengths) - 1)
        assert logits.shape == (2, 1, model.config.vocab_size) and hidden.shape == (2, 1, model.config.d_model)
        for b, p in enumerate(prompts):
            if model.rope.dynamic and len(p) < max(lengths):
                continue
            alone = model.new_cache(1, len(p), mtp=False)
            want = prefill(model, torch.tensor([p]), alone, None)
            torch.testing.assert_close(logits[b], want.logits[0], rtol=0, atol=1e-10)
            torch.testing.assert_close(hidden[b], want.hidden[0], rtol=0, atol=1e-10)
            pairs = list(zip(dec.cache.slot_tensors(), alone.slot_tensors(), strict=True))
            assert len(pairs) == (1 + 2 * 3 * (1 + 2) + 3 if model.config.transformerx else 1 + 2 * 3)
            for (got, dim), (ref, _) in pairs:
                torch.testing.assert_close(got[b].narrow(dim - 1, 0, len(p)), ref[0], rtol=0, atol=1e-10)


@torch.inference_mode()
def test_prompt_filler_buckets_and_errors():
    assert fill_buckets(256, 3) == (8, 16, 32) and fill_buckets(256, 6) == (8, 16, 32, 64, 128, 256)
    assert fill_buckets(64, 5) == (8, 16, 32, 64) and fill_buckets(256, 0) == ()
    with pytest.raises(ValueError, match="fill_buckets must be >= 0"):
        fill_buckets(64, -1)
    model = model64()
    filler = PromptFiller(model, (8, 16), CompileOptions(compile=False))
    assert [filler.bucket(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, None]
    prompt = torch.randint(1, model.config.vocab_size, (11,)).tolist()
    cache, logits, hidden = filler.fill(prompt)
    want = prefill(model, torch.tensor([prompt]), model.new_cache(1, 11, mtp=False), None)
    assert cache.max_len == 16 and cache.length == 11
    torch.testing.assert_close(logits, want.logits[:, -1], rtol=0, atol=1e-10)
    torch.testing.assert_close(hidden, want.hidden, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="does not fit the prefill buckets"):
        filler.fill([1] * 17)
    with pytest.raises(ValueError, match="right-padded"):
        filler.decoders[8].fill(torch.ones(1, 5, dtype=torch.long), torch.tensor([4]))
    with pytest.raises(ValueError, match="MTP depths' keys"):
        StaticDecoder(model, max_len=8, mtp=True, compile=False).fill(torch.ones(1, 8, dtype=torch.long),
                                                                      torch.tensor([7]))
    with pytest.raises(ValueError, match="at least one prompt length"):
        PromptFiller(model, ())
