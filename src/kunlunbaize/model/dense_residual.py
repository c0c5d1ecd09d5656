"""Learnable dense residual skip connections (LDRSCM, §3.1).

    H_{l+1} = F_l(H_l) + Σ_{i=0..l} softmax(a_l)_i · H_i            (eq. 1, with eq. 2's softmax)

``a_l`` ∈ R^{l+1} is one logit vector per layer, initialised to 0 so every layer starts from the
uniform average of all earlier outputs (H_0 = embedding output) — or, with ``init="identity"`` (a deviation
to measure, DenseFormer's start), so that the latest output H_l has weight 0.95: each layer then begins close to
a plain residual. The weights do not depend on the input, so the mix is a static weighted sum of stored layer
outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

IDENTITY_WEIGHT = 0.95  # weight on the latest output under init="identity"


def initial_logits(layer: int, init: str = "uniform") -> torch.Tensor:
    """``a_layer`` at initialisation: zeros (uniform), or zeros with the latest entry raised so that its
    softmax weight is :data:`IDENTITY_WEIGHT` (identity)."""
    logits = torch.zeros(layer + 1)
    if init == "identity" and layer > 0:  # e^x / (e^x + layer) = w  ⇔  x = ln(w · layer / (1 − w))
        logits[-1] = math.log(IDENTITY_WEIGHT * layer / (1 - IDENTITY_WEIGHT))
    return logits


class DenseResidual(nn.Module):
    def __init__(self, n_layers: int, init: str = "uniform") -> None:
        super().__init__()
        self.init = init
        self.logits = nn.ParameterList(nn.Parameter(initial_logits(layer, init)) for layer in range(n_layers))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer, p in enumerate(self.logits):
            p.copy_(initial_logits(layer, self.init))

    def mix(self, layer: int, states: list[torch.Tensor]) -> torch.Tensor:
        """Σ_i softmax(a_layer)_i · states[i] over the ``layer + 1`` stored outputs H_0 … H_layer (eq. 1–2)."""
        w = torch.softmax(self.logits[layer].float(), dim=0).to(states[0].dtype)
        # A running sum keeps memory at O(1) extra tensors per layer (a stack would save a copy for backward).
        out = w[0] * states[0]
        for i in range(1, layer + 1):
            out = out + w[i] * states[i]
        return out

    @torch.no_grad()
    def weight_matrix(self) -> torch.Tensor:
        """[L, L] lower-triangular matrix: row l holds softmax(a_l) over H_0 … H_l (zeros above).

        Under FSDP2 the logits are sharded and gathering them is a collective: call on every rank.
        """
        n = len(self.logits)
        m = torch.zeros(n, n)
        for layer, p in enumerate(self.logits):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            m[layer, : layer + 1] = torch.softmax(full.detach().float().cpu(), dim=0)
        return m
