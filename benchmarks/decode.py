"""Batch-1 decoding speed: plain cached greedy vs. MTP self-speculative greedy vs. HF ``generate``.

All variants decode the same prompts with the same weights in one process, rounds interleaved:
our plain cached greedy, MTP self-speculative greedy at each draft length (and adaptive), and
transformers' ``generate`` (greedy, with our cache) on the same model exported by ``kunlun export
--hf`` and loaded through ``AutoModelForCausalLM``. Every output is checked token-for-token against
plain greedy. Reported: tokens/s, the ratio to plain greedy (and to HF ``generate``), tokens per trunk forward,
acceptance per depth. ``--library-gemm`` adds plain and adaptive speculative rows whose small matrix products
go through ``F.linear`` instead of :func:`kunlunbaize.model.layers.linear` (the before/after of that change, in
one run). ``--compile`` adds plain and adaptive speculative decoding through a
``StaticDecoder`` (the trunk step compiled at fixed shapes), warmed up (compiled) before the timed rounds.

    python benchmarks/decode.py --checkpoint runs/small            # a checkpoint from `kunlun train`
    python benchmarks/decode.py --random small                      # random weights of a preset
    python benchmarks/decode.py --checkpoint runs/small --compile   # + the compiled static step
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from kunlunbaize import KunlunBaize, ModelConfig
from kunlunbaize.checkpoint import load_tokenizer, training_data
from kunlunbaize.data.format import token_counts
from kunlunbaize.infer import StaticDecoder, generate, speculative_generate
from kunlunbaize.infer.load import load_model
from kunlunbaize.infer.speculative import DraftVocab, frequent_tokens
from kunlunbaize.model import layers

LIBRARY = "F.linear"
PROMPTS = ["def parse_args(argv):\n", "class Cache:\n    def __init__(self", "import os\nimport sys\n\n",
           "    for i in range(len(", "# Copyright", "if __name__ == '__main__':\n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="run or checkpoint folder")
    ap.add_argument("--random", metavar="PRESET", help="random weights of a preset instead of a checkpoint")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers generate() comparison")
    ap.add_argument("--draft-vocab", type=int, nargs="*", default=[], metavar="N",
                    help="also adaptive speculative decoding drafting from the N most frequent training tokens")
    ap.add_argument("--library-gemm", action="store_true",
                    help="also eager rows with every small matrix product through F.linear (layers.SMALL_ROWS = 0)")
    ap.add_argument("--compile", action="store_true", help="also decode through compiled StaticDecoders")
    ap.add_argument("--compile-mode", nargs="+", default=["default"], metavar="MODE",
                    help="torch.compile mode(s) of the static step, one set of compiled rows each: default, "
                         "reduce-overhead (CUDA graphs), max-autotune (on a CPU: C++ GEMM templates, frozen weights)")
    ap.add_argument("--data", help="prepared data whose train split gives the token frequencies "
                                   "(default: the checkpoint's training data)")
    args = ap.parse_args()
    if bool(args.checkpoint) == bool(args.random):
        ap.error("give exactly one of --checkpoint or --random")

    if args.checkpoint:
        model, ckpt = load_model(args.checkpoint, args.device)
        tok, _ = load_tokenizer(ckpt, model.config.vocab_size)
        prompts = [tok.encode(p).ids for p in PROMPTS]
        what = str(ckpt)
    else:
        torch.manual_seed(0)
        model = KunlunBaize(ModelConfig.preset(args.random)).to(args.device).eval()
        prompts = [torch.randint(0, model.config.vocab_size, (16,)).tolist() for _ in PROMPTS]
        what = f"random {args.random}"
    D = model.config.mtp_depth
    n = args.max_new_tokens

    variants = {"plain greedy": None, **{f"speculative, draft {k}": k for k in range(1, D + 1)},
                "speculative, adaptive": "adaptive"}
    vocabs = {}
    if args.draft_vocab:
        data = args.data or (training_data(ckpt) if args.checkpoint else None)
        if data is None:
            ap.error("--draft-vocab needs token frequencies: give --data (a prepared data folder)")
        counts = token_counts(data, model.config.vocab_size)
        for size in args.draft_vocab:
            vocabs[f"speculative, adaptive, draft vocab {size:,}"] = frequent_tokens(counts, size)
            variants[f"speculative, adaptive, draft vocab {size:,}"] = "adaptive"
    if args.library_gemm:
        variants[f"plain greedy, {LIBRARY}"] = None
        if D:
            variants[f"speculative, adaptive, {LIBRARY}"] = "adaptive"
    decoders: dict[str, StaticDecoder] = {}
    for mode in args.compile_mode if args.compile else []:
        tag = "static compiled" + ("" if mode == "default" else f", {mode}")
        plain_dec = StaticDecoder(model, 1, mode=mode)
        spec_dec = StaticDecoder(model, 1, mtp=True, mode=mode) if D else None
        compiled = {f"plain greedy, {tag}": (None, plain_dec)}
        if D:
            compiled[f"speculative, adaptive, {tag}"] = ("adaptive", spec_dec)
            for name in [v for v in vocabs if "static compiled" not in v]:
                compiled[f"{name}, {tag}"] = ("adaptive", spec_dec)
                vocabs[f"{name}, {tag}"] = vocabs[name]
        for name, (k, dec) in compiled.items():
            variants[name] = k
            decoders[name] = dec
    hf = None if args.no_hf else hf_twin(model, args.device)
    if hf is not None:
        variants["HF generate (exported model)"] = "hf"
    rates = {v: [] for v in variants}
    stats = {v: [] for v in variants}
    reference = {i: generate(model, [p], n).tokens[0] for i, p in enumerate(prompts)}

    def decode_all(name: str, k) -> int:
        """Every prompt through variant ``name``; the number of tokens generated."""
        count = 0
        for i, p in enumerate(prompts):
            if k is None:
                tokens = generate(model, [p], n, decoder=decoders.get(name)).tokens[0]
            elif k == "hf":
                ids = torch.tensor([p], device=args.device)
                tokens = hf.generate(ids, max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            else:
                out = speculative_generate(model, p, n, draft_len=None if k == "adaptive" else k,
                                           adaptive=k == "adaptive", draft_vocab=vocabs.get(name),
                                           decoder=decoders.get(name))
                stats[name].append(out.stats)
                tokens = out.tokens[0]
            if tokens != reference[i]:
                raise SystemExit(f"{name}: output differs from plain greedy on prompt {i}")
            count += len(tokens)
        return count

    warmup = {}
    for name in decoders:  # compile every shape the timed rounds will use
        t0 = time.perf_counter()
        decode_all(name, variants[name])
        warmup[name] = time.perf_counter() - t0
        stats[name].clear()
    for _ in range(args.rounds):
        for name, k in variants.items():
            with layers.small_rows(0 if name.endswith(LIBRARY) else layers.SMALL_ROWS):
                t0 = time.perf_counter()
                count = decode_all(name, k)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                rates[name].append(count / (time.perf_counter() - t0))

    base = statistics.median(rates["plain greedy"])
    print(f"{what}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, MTP depth {D}; "
          f"{len(prompts)} prompts x {n} new tokens, batch 1, {args.rounds} rounds; device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}\n")
    hf_rate = statistics.median(rates["HF generate (exported model)"]) if hf is not None else None
    print("| decoding | tokens/s | vs plain | " + ("vs HF generate | " if hf_rate else "") + "tokens / trunk forward | "
          + " | ".join(f"acceptance d{j}" for j in range(1, D + 1)) + " |")
    print("|---|---:|---:|" + ("---:|" if hf_rate else "") + "---:|" + "---:|" * D)
    for name in variants:
        r = statistics.median(rates[name])
        if stats[name]:
            tpf = statistics.mean(s["tokens_per_trunk_forward"] for s in stats[name])
            acc = [statistics.mean(s.get(f"acceptance_depth_{j}", float("nan")) for s in stats[name])
                   for j in range(1, D + 1)]
            cols = [f"{tpf:.2f}", *(f"{a:.2f}" if a == a else "–" for a in acc)]
        else:
            cols = ["1.00", *("–" for _ in range(D))]
        vs_hf = f"{r / hf_rate:.2f}x | " if hf_rate else ""
        print(f"| {name} | {r:,.1f} | {r / base:.2f}x | {vs_hf}" + " | ".join(cols) + " |")
    print("\nevery output was identical to plain greedy")
    for name, seconds in warmup.items():
        print(f"{name}: first pass over the prompts (compiling) {seconds:.0f} s")
    if D:
        cost_table(model, D, args.device, {name.rsplit(" ", 1)[-1]: DraftVocab(model, ids)
                                           for name, ids in vocabs.items() if name not in decoders},
                   {name.removeprefix("speculative, adaptive, "): dec for name, dec in decoders.items()
                    if name.startswith("speculative, adaptive, static")}, args.library_gemm)


@torch.inference_mode()
def cost_table(model: KunlunBaize, D: int, device: str, vocabs: dict[str, DraftVocab],
               statics: dict[str, StaticDecoder], library: bool = False, reps: int = 60) -> None:
    """What one speculative round costs relative to one plain step: a trunk forward over n = k+1 tokens
    (verification of k drafts, MTP keys included) and k drafting steps, timed interleaved; for each of
    ``statics`` (compiled ``StaticDecoder``s with MTP keys, by name) also its steps, relative to its own 1-token
    step; with ``library`` also the eager trunk forwards with every matrix product through ``F.linear``."""
    from kunlunbaize.infer.sampling import GREEDY
    from kunlunbaize.infer.speculative import draft

    P = min(64, model.config.max_seq_len - D - 2)
    prompt = torch.randint(0, model.config.vocab_size, (1, P), device=device)
    plain = model.new_cache(1, P + 1, mtp=False)  # what plain decoding uses
    model(prompt, cache=plain, mtp=False)
    cache = model.new_cache(1, P + D + 1)  # what speculative decoding uses
    hidden = model(prompt, cache=cache, mtp=False).hidden[:, -1:]
    static_hidden = {name: static.prefill(prompt).hidden[:, -1:] for name, static in statics.items()}
    times: dict[str, list[float]] = {}

    def timed(key: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times.setdefault(key, []).append(time.perf_counter() - t0)

    for _ in range(reps):
        plain.crop(P)
        timed("plain", lambda: model(prompt[:, :1], cache=plain, mtp=False))
        for n in range(2, D + 2):
            cache.crop(P)
            timed(f"F{n}", lambda n=n: model(prompt[:, :n], cache=cache, mtp=False))
        for name, static in statics.items():
            for n in range(1, D + 2):
                static.cache.crop(P)
                timed(f"{name} S{n}", lambda n=n, s=static: s.step(prompt[:, :n]))
            for k in range(1, D + 1):
                for size, vocab in {"": None, **vocabs}.items():
                    static.cache.crop(P)
                    timed(f"{name} d{k} {size}".strip(), lambda k=k, v=vocab, s=static, h=static_hidden[name]:
                          draft(model, s.cache, h, 1, k, GREEDY, None, v, s))
        for n in range(1, D + 2) if library else ():  # the eager verification with F.linear's small-row GEMM
            cache.crop(P)
            with layers.small_rows(0):
                timed(f"{LIBRARY} F{n}", lambda n=n: model(prompt[:, :n], cache=cache, mtp=False))
        for k in range(1, D + 1):
            cache.crop(P)
            timed(f"d{k}", lambda k=k: draft(model, cache, hidden, 1, k, GREEDY, None))
            for size, vocab in vocabs.items():
                cache.crop(P)
                timed(f"d{k} {size}", lambda k=k, v=vocab: draft(model, cache, hidden, 1, k, GREEDY, None, v))
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    f1 = med["plain"]
    print(f"\ncost of a round (median of {reps}, after a {P}-token prompt), relative to a plain decoding step "
          f"F(1) = {f1:.2f} ms:\n")

    def rows(prefix: str, step: str, verify: str) -> None:
        """The round table of one decoder: its verification keys ``{prefix}{step}{n}``, drafting ``{prefix}d{k}``."""
        base = med[f"{prefix}{step}1"]
        print(f"| draft length k | verify: {verify} | drafting k tokens | round / {step}(1) |")
        print("|---:|---:|---:|---:|")
        for k in range(1, D + 1):
            for size in ["", *vocabs]:
                vk, dk = med[f"{prefix}{step}{k + 1}"], med[f"{prefix}d{k} {size}".strip()]
                label = f"{k}" + (f", draft vocab {size}" if size else "")
                print(f"| {label} | {vk:.2f} ms ({vk / base:.2f}x) | {dk:.2f} ms ({dk / base:.2f}x) "
                      f"| {(vk + dk) / base:.2f} |")

    med["F1"] = f1
    rows("", "F", "trunk forward of k+1 tokens")
    if library:
        lf1 = med[f"{LIBRARY} F1"]
        print(f"\nthe same trunk forwards with every matrix product through {LIBRARY}: F(1) = {lf1:.2f} ms, "
              + ", ".join(f"F({n}) = {med[f'{LIBRARY} F{n}']:.2f} ms ({med[f'{LIBRARY} F{n}'] / lf1:.2f}x)"
                          for n in range(2, D + 2)))
    print("\nspeedup ≈ (tokens per trunk forward) / (round / F(1))")
    for name in statics:
        s1 = med[f"{name} S1"]
        print(f"\n{name}: a round relative to its own 1-token step S(1) = {s1:.2f} ms ({s1 / f1:.2f}x F(1)); "
              "verification S(k+1) and drafting both compiled:\n")
        rows(f"{name} ", "S", "S(k+1)")


def hf_twin(model: KunlunBaize, device: str):
    """The model exported to a transformers folder and loaded back through ``AutoModelForCausalLM``."""
    try:
        from transformers import AutoModelForCausalLM

        from kunlunbaize.hf import KunlunBaizeForCausalLM
    except ImportError:
        print("transformers is not installed: skipping the HF generate comparison")
        return None
    twin = KunlunBaizeForCausalLM.from_kunlunbaize(model, eos_token_id=None, pad_token_id=0)
    with tempfile.TemporaryDirectory() as folder:
        twin.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder).to(device).eval()


if __name__ == "__main__":
    main()
