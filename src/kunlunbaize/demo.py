"""End-to-end smoke job: train a byte-level KunlunBaize on the Python standard library, evaluate, generate.

Bytes are the tokens (vocabulary 256), so no tokenizer is needed; the corpus is the ``.py`` source of
the running interpreter's standard library, present on every machine.
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import torch

from .arch import DEFAULT
from .config import ModelConfig
from .infer import generate
from .model import KunlunBaize
from .train.optim import build_optimizer
from .train.plan import set_lr
from .train.step import precision, resolve_dtype, train_step


def stdlib_bytes(limit: int = 4_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/validation byte tensors from the standard library's ``.py`` files (every 20th file held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise RuntimeError(f"no .py files under {root}: cannot build the demo corpus")
    train, val, total = bytearray(), bytearray(), 0
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if i % 20 == 0 else train).extend(data)
        total += len(data)
        if total >= limit:
            break
    return (torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long())


def _batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([data[i:i + seq_len] for i in idx.tolist()])


@torch.no_grad()
def evaluate(model: KunlunBaize, data: torch.Tensor, seq_len: int, batches: int = 8) -> dict[str, float]:
    """Mean main and per-depth MTP losses on fixed validation windows."""
    model.eval()
    gen = torch.Generator().manual_seed(1)
    main, mtp = 0.0, [0.0] * model.config.mtp_depth
    for _ in range(batches):
        x = _batch(data, 8, seq_len, gen)
        out = model(x, labels=x)
        main += out.main_loss.item() / batches
        for j, term in enumerate(out.mtp_losses):
            mtp[j] += term.item() / batches
    model.train()
    return {"main": main, **{f"mtp{j + 1}": v for j, v in enumerate(mtp)}}


def demo_lr_factor(step: int, steps: int) -> float:
    """The demo's LR multiplier at step ``step`` (0-based) of ``steps``: linear warm-up over a tenth of the run,
    then a cosine down to 10%."""
    warmup = max(1, steps // 10)
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))


def check_demo_args(cfg: ModelConfig, steps: int, batch_size: int, seq_len: int, lr: float, prompt: str,
                    max_new_tokens: int) -> None:
    """Refuse arguments the demo cannot run with (SystemExit with a one-line ``kunlun demo:`` message)."""
    problems = [(steps >= 1, f"--steps {steps}: must be >= 1"),
                (batch_size >= 1, f"--batch-size {batch_size}: must be >= 1"),
                (2 <= seq_len <= cfg.max_seq_len,
                 f"--seq-len {seq_len}: must be between 2 and the preset's max_seq_len {cfg.max_seq_len}"),
                (math.isfinite(lr) and lr > 0, f"--lr {lr}: must be a finite number > 0"),
                (max_new_tokens >= 1, f"--max-new-tokens {max_new_tokens}: must be >= 1"),
                (prompt != "", "--prompt is empty: give at least one character")]
    for ok, message in problems:
        if not ok:
            raise SystemExit(f"kunlun demo: {message}")


def run_demo(cfg: ModelConfig, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
             prompt: str, max_new_tokens: int) -> dict[str, float]:
    if cfg.vocab_size != 256:
        print(f"demo is byte-level: vocab_size {cfg.vocab_size} -> 256")
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": 256})
    check_demo_args(cfg, steps, batch_size, seq_len, lr, prompt, max_new_tokens)
    torch.manual_seed(seed)
    try:
        train, val = stdlib_bytes()
    except RuntimeError as e:
        raise SystemExit(f"kunlun demo: {e}") from None
    if min(train.numel(), val.numel()) <= seq_len:
        raise SystemExit(f"kunlun demo: the corpus is too small for --seq-len {seq_len} — lower it")
    print(f"corpus: Python {sysconfig.get_python_version()} standard library, "
          f"{train.numel():,} train / {val.numel():,} validation bytes")
    model = KunlunBaize(cfg)
    print(f"model: {model.num_params():,} parameters  dense_residual={cfg.dense_residual} "
          f"transformerx={cfg.transformerx} mtp_depth={cfg.mtp_depth}")

    opt = build_optimizer(model, lr)  # AdamW (0.9, 0.95), weight decay 0.1 on matrices only
    device = next(model.parameters()).device
    autocast = precision(device, resolve_dtype("auto", device))  # as kunlun train: fp32 on the CPU

    before = evaluate(model, val, seq_len)
    print("validation before: " + "  ".join(f"{k}={v:.3f}" for k, v in before.items()))
    gen = torch.Generator().manual_seed(seed)
    t0, tokens = time.time(), 0
    for step in range(1, steps + 1):
        x = _batch(train, batch_size, seq_len, gen)
        set_lr(opt, lr * demo_lr_factor(step - 1, steps))
        result = train_step(model, opt, [x], grad_clip=1.0, autocast=autocast, loss_kwargs=DEFAULT.train_kwargs())
        if not result.finite:
            what = "loss" if not math.isfinite(result.loss) else "gradient"
            raise SystemExit(f"kunlun demo: non-finite {what} at step {step}; lower --lr")
        tokens += x.numel()
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:>5}/{steps}  loss {result.loss:.3f}  main {result.main_loss:.3f}  "
                  f"grad-norm {result.grad_norm.item():.2f}  {tokens / (time.time() - t0):,.0f} tok/s", flush=True)
    after = evaluate(model, val, seq_len)
    print("validation after:  " + "  ".join(f"{k}={v:.3f}" for k, v in after.items()))

    W = model.dense_residual_weights()
    if W is not None:
        print("dense-residual weights (row l: weights on H_0 … H_l):")
        for row in W.tolist():
            print("  " + " ".join(f"{v:.2f}" for v in row))
    betas = [p.item() for n, p in model.named_parameters() if n.endswith("beta") and p.numel() == 1]
    if betas:
        print(f"eSwish β: mean {sum(betas) / len(betas):.3f}, range [{min(betas):.3f}, {max(betas):.3f}]")
    out = generate(model, [list(prompt.encode())], max_new_tokens, truncate=True)  # clipped to the context
    text = bytes(out.tokens[0]).decode("utf-8", errors="replace")
    print(f"greedy continuation of {prompt!r} (cached decoding):\n{prompt}{text}")
    return {"before": before["main"], "after": after["main"]}
