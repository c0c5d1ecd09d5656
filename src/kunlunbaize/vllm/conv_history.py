"""The causal convolutions' input history, kept in vLLM's paged KV cache.

A TransformerX block's depthwise convolutions read the last ``k − 1`` inputs ``c`` (the block's ``conv_norm``
output) before each token. :class:`ConvHistory` stores every token's ``c`` in KV-cache pages of its own
(a :class:`~.paged.PagedStore`). A token's window is then gathered by position from its request's block
table, so prefill, decoding, chunked prefill, continuous batching and prefix caching all see exactly the values the
tokens before them produced: ``c`` at position p depends only on tokens ≤ p, so a page reused by prefix caching holds
the right history too. (vLLM's own short-conv state — ``MambaBase``/``short_conv`` — keeps one rolling state per
request instead, which cannot be shared by prefix caching; see docs/guide-serve.md.)
"""

from __future__ import annotations

import torch

from .paged import PagedStore


class ConvHistory(PagedStore):
    """Every token's conv input ``c`` [d] in paged storage; :meth:`windows` gives each new token its last ``width``
    inputs (oldest first, the token itself last; zeros before a sequence start)."""

    def __init__(self, d_model: int, width: int, n_heads: int, n_kv_heads: int, head_dim: int, cache_config,
                 prefix: str) -> None:
        """Storage layers ``{prefix}0``, ``{prefix}1`` …, as many as ``d_model`` needs."""
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, cache_config, prefix)
        self.d_model = d_model
        self.window = width

    def windows(self, c: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N, window, d] for the N tokens of ``c`` [N, d] at ``positions`` [N]: writes ``c`` to the tokens' slots,
        then reads each token's window back from its request's pages."""
        out = c.new_zeros(c.shape[0], self.window, self.d_model)
        out[:, -1] = c
        step = self.step(positions)
        if step is None:
            return out
        self.write(step, c)
        want = step.positions[:, None] - torch.arange(self.window - 1, -1, -1, device=c.device)[None, :]
        valid = want >= 0
        history = self.read(step, want.clamp_min(0)).to(c.dtype)
        out[:step.n] = history * valid[..., None].to(c.dtype)
        return out
