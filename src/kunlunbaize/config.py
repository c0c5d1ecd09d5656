"""Model configuration: one validated dataclass, named presets, exact parameter and FLOP accounting.

The three ablation switches of the paper's Table 4 live here:

* ``dense_residual`` — learnable dense residual skip connections (LDRSCM, §3.1, eq. 1–2);
* ``transformerx`` — multi-scale causal convolution + cross-attention + eSwish MLPs (§3.2, eq. 4–12);
* ``mtp_depth`` — number of multi-token prediction interaction depths (MTPIM, §3.3, eq. 13–23).

All three off gives a standard LLaMA-style decoder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .rope_scaling import check_rope_scaling
from .rope_scaling import rope_parameters as _rope_parameters


@dataclass
class ModelConfig:
    """Shape and switches of a KunlunBaize model. Invalid values raise ``ValueError`` naming the field."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 128
    """Hidden size of the single SwiGLU MLP of a plain (``transformerx=False``) block."""
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling for a context beyond the pre-training one (:mod:`kunlunbaize.rope_scaling`): None, or
    transformers' ``rope_parameters`` without ``rope_theta``, e.g. ``{"rope_type": "yarn", "factor": 16.0,
    "original_max_position_embeddings": 256}``; types linear, dynamic, yarn, llama3."""
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False

    # --- LDRSCM (§3.1) ---
    dense_residual: bool = True
    dense_init: str = "uniform"
    """Initial dense-residual mix: ``"uniform"`` (the paper: logits 0, the average of all earlier outputs) or
    ``"identity"`` (DenseFormer's start: weight 0.95 on the latest output, so each layer begins as a plain
    residual)."""

    # --- TransformerX (§3.2) ---
    transformerx: bool = True
    conv_kernel_sizes: tuple[int, ...] = (3, 15)
    """One causal depthwise-separable convolution per kernel size: small = local order, large = segment."""
    scale_ffn_hidden: int | None = None
    """Hidden size of each per-scale MLP (eq. 9–12). ``None``: ``ffn_hidden // len(conv_kernel_sizes)``."""
    eswish_per_channel: bool = False
    """eSwish β (eq. 5) as one scalar per activation (False) or one value per channel (True)."""
    eswish_beta_init: float = 1.0
    """Initial eSwish β (eq. 5): 1 is Swish/SiLU; larger is closer to ReLU, near 0 closer to x/2."""
    conv_init: str = "normal"
    """Initial convolution weights (eq. 6–7): ``"normal"`` (the paper: N(0, init_std) like every weight) or
    ``"fan_in"`` (std 1/√k for the depthwise kernel, 1/√d for the pointwise one, so the features h_j start at the
    scale of their input instead of ~1% of it)."""

    # --- MTPIM (§3.3) ---
    mtp_depth: int = 1
    mtp_loss_weights: tuple[float, ...] | None = None
    """γ_j of eq. 22, one per depth. ``None``: 0.3 / D for every depth (DeepSeek-V3's λ)."""
    mtp_share_head: bool = False
    """Share the main output head across MTP depths instead of one independent head O_j per depth."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (e.g. the preset name); never affects the model."""

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        if isinstance(self.conv_kernel_sizes, list):
            self.conv_kernel_sizes = tuple(self.conv_kernel_sizes)
        if isinstance(self.mtp_loss_weights, list):
            self.mtp_loss_weights = tuple(self.mtp_loss_weights)
        self.validate()

    def _fail(self, name: str, msg: str) -> None:
        raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: {msg}")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                     "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                self._fail(name, "must be a positive integer")
        for name in ("dense_residual", "transformerx", "eswish_per_channel", "mtp_share_head",
                     "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "must be True or False")
        if self.dense_init not in ("uniform", "identity"):
            self._fail("dense_init", "must be 'uniform' (the paper) or 'identity'")
        if self.conv_init not in ("normal", "fan_in"):
            self._fail("conv_init", "must be 'normal' (the paper) or 'fan_in'")
        beta = self.eswish_beta_init
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
            self._fail("eswish_beta_init", "must be a finite number")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                self._fail(name, "must be a finite positive number")
        if self.d_model % self.n_heads:
            self._fail("n_heads", f"d_model={self.d_model} must be divisible by n_heads")
        if (self.d_model // self.n_heads) % 2:
            self._fail("n_heads", f"head_dim={self.d_model // self.n_heads} must be even for rotary embeddings")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            self._fail("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.transformerx:
            ks = self.conv_kernel_sizes
            if not isinstance(ks, tuple) or len(ks) == 0:
                self._fail("conv_kernel_sizes", "must be a non-empty list of kernel sizes when transformerx=True")
            for k in ks:
                if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                    self._fail("conv_kernel_sizes", f"kernel size {k!r} must be an integer >= 1")
        if self.scale_ffn_hidden is not None and (
            isinstance(self.scale_ffn_hidden, bool) or not isinstance(self.scale_ffn_hidden, int)
            or self.scale_ffn_hidden < 1
        ):
            self._fail("scale_ffn_hidden", "must be a positive integer or None")
        if isinstance(self.mtp_depth, bool) or not isinstance(self.mtp_depth, int) or self.mtp_depth < 0:
            self._fail("mtp_depth", "must be an integer >= 0 (0 disables multi-token prediction)")
        if self.mtp_loss_weights is not None:
            w = self.mtp_loss_weights
            if not isinstance(w, tuple) or len(w) != self.mtp_depth:
                self._fail("mtp_loss_weights", f"must have exactly mtp_depth={self.mtp_depth} entries")
            for g in w:
                if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0 or not math.isfinite(g):
                    self._fail("mtp_loss_weights", f"weight {g!r} must be a finite number >= 0")
        if not isinstance(self.extra, dict):
            self._fail("extra", "must be a dict")
        try:
            self.rope_scaling = check_rope_scaling(self.rope_scaling, self.max_seq_len)
        except ValueError as e:
            self._fail("rope_scaling", str(e))

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers' ``rope_parameters``: ``rope_type`` (``"default"`` unscaled), ``rope_theta`` and the scaling."""
        return _rope_parameters(self.rope_theta, self.rope_scaling)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_scales(self) -> int:
        return len(self.conv_kernel_sizes) if self.transformerx else 0

    @property
    def scale_hidden(self) -> int:
        """Resolved hidden size of each per-scale MLP."""
        if self.scale_ffn_hidden is not None:
            return self.scale_ffn_hidden
        return max(1, self.ffn_hidden // max(1, len(self.conv_kernel_sizes)))

    @property
    def gammas(self) -> tuple[float, ...]:
        """Resolved MTP loss weights γ_1..γ_D (eq. 22)."""
        if self.mtp_loss_weights is not None:
            return tuple(float(g) for g in self.mtp_loss_weights)
        return tuple(0.3 / self.mtp_depth for _ in range(self.mtp_depth))

    # ------------------------------------------------------------------ presets and (de)serialisation
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (``tiny``, ``small``, ``125m``, ``1b``, ``8b``, ``paper``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in fields:
                raise ValueError(f"ModelConfig has no field {key!r} (override of preset {name!r})")
        values.update(overrides)
        values.setdefault("extra", {})
        values["extra"] = {**values["extra"], "preset": name}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conv_kernel_sizes"] = list(self.conv_kernel_sizes)
        if self.mtp_loss_weights is not None:
            d["mtp_loss_weights"] = list(self.mtp_loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ------------------------------------------------------------------ accounting
    def param_breakdown(self) -> dict[str, int]:
        """Exact trainable-parameter count per component (matches the built module, tested)."""
        d, V, L = self.d_model, self.vocab_size, self.n_layers
        attn = 2 * d * d + 2 * d * self.kv_dim  # wq, wo, wk, wv (eq. 19 with learned projections)
        beta = d if self.eswish_per_channel else 1
        if self.transformerx:
            per_scale = (
                d  # pre-norm of the cross-attention
                + attn  # CrossAttn_j
                + d  # pre-norm of the MLP
                + 3 * d * self.scale_hidden + beta  # SwiGLU MLP_j gated by eSwish
            )
            convs = sum(k * d + d * d + beta for k in self.conv_kernel_sizes)  # DSConv_j + eSwish (eq. 6–8)
            block = d + attn + d + convs + per_scale * self.n_scales
        else:
            block = d + attn + d + 3 * d * self.ffn_hidden
        out = {
            "embedding": V * d,
            "blocks": L * block,
            "dense_residual": L * (L + 1) // 2 if self.dense_residual else 0,
            "final_norm": d,
            "head": 0 if self.tie_embeddings else V * d,
            "mtp": self.mtp_depth * (3 * d + attn + (0 if self.mtp_share_head else V * d)),
        }
        return out

    def num_params(self) -> int:
        return sum(self.param_breakdown().values())

    def flops_per_token(self, seq_len: int | None = None, training: bool = False) -> float:
        """Analytic matmul FLOPs per token: 2 × weights touched + attention scores over the causal context.

        Attention counts 2·2·d·ctx per attention op with ctx = (T+1)/2 (average causal context).
        Norms, activations, softmax and the dense-residual weighted sums (elementwise) are left out.
        Training = 3 × forward (backward ≈ 2 × forward).
        """
        T = seq_len or self.max_seq_len
        d, V, L = self.d_model, self.vocab_size, self.n_layers
        attn_w = 2 * d * d + 2 * d * self.kv_dim
        if self.transformerx:
            mm = attn_w + sum(d * d + k * d for k in self.conv_kernel_sizes) + self.n_scales * (
                attn_w + 3 * d * self.scale_hidden)
        else:
            mm = attn_w + 3 * d * self.ffn_hidden
        weights = L * mm + V * d  # blocks + main head (tied or not, the head matmul happens)
        weights += self.mtp_depth * (attn_w + V * d)
        attn_ops = L * (1 + self.n_scales) + self.mtp_depth
        ctx = (T + 1) / 2
        fwd = 2 * weights + attn_ops * 4 * d * ctx
        return 3 * fwd if training else fwd


def _llama(vocab: int, d: int, layers: int, heads: int, kv: int, ffn: int, **kw: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_hidden=ffn, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # runs a forward in milliseconds on CPU; for tests
    "tiny": _llama(256, 64, 2, 4, 2, 128, max_seq_len=128, conv_kernel_sizes=(3, 7), mtp_depth=2),
    # ~10M parameters, trains on a laptop CPU
    "small": _llama(8192, 256, 6, 8, 4, 512, max_seq_len=256, conv_kernel_sizes=(3, 15), mtp_depth=2,
                    tie_embeddings=True),
    # GPT-2-small / LLaMA-style shapes
    "125m": _llama(32000, 768, 12, 12, 4, 2048, max_seq_len=2048, conv_kernel_sizes=(3, 31), mtp_depth=2),
    # LLaMA-3.2-1B shapes
    "1b": _llama(128256, 2048, 16, 32, 8, 8192, max_seq_len=4096, rope_theta=500000.0,
                 conv_kernel_sizes=(3, 31), mtp_depth=2, tie_embeddings=True),
    # LLaMA-3.1-8B shapes
    "8b": _llama(128256, 4096, 32, 32, 8, 14336, max_seq_len=4096, rope_theta=500000.0,
                 conv_kernel_sizes=(3, 31), mtp_depth=2),
    # §5.2: LLaMA-3.1-405B shapes, 126 layers, d=16384, 128 heads (8 KV heads), V=128256, MTP depth 6,
    # init std 0.006. The paper gives no TransformerX widths; scale_ffn_hidden is calibrated so the
    # total lands on the paper's stated 450B (docs/ARCHITECTURE.md, "Paper preset").
    "paper": _llama(128256, 16384, 126, 128, 8, 53248, max_seq_len=4096, rope_theta=500000.0,
                    conv_kernel_sizes=(3, 31), scale_ffn_hidden=11776, mtp_depth=6, init_std=0.006),
}
