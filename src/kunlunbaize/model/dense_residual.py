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


class DenseLogits(nn.ParameterList):
    """The logit vectors a_0 … a_{L−1}, one parameter per layer (names ``0`` … ``L−1``, as a ``ParameterList``).

    A module of its own, which holds the parameters directly: an initialiser that visits modules and initialises
    each one's own parameters (transformers' does, skipping modules without any) reaches them here."""

    def __init__(self, n_layers: int, init: str = "uniform") -> None:
        super().__init__(nn.Parameter(initial_logits(layer, init)) for layer in range(n_layers))
        self.init = init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer, p in enumerate(self):
            p.copy_(initial_logits(layer, self.init))


class DenseResidual(nn.Module):
    def __init__(self, n_layers: int, init: str = "uniform") -> None:
        super().__init__()
        self.init = init
        self.logits = DenseLogits(n_layers, init)

    def reset_parameters(self) -> None:
        self.logits.reset_parameters()

    def forward(self, layer: int) -> torch.Tensor:
        """softmax(a_layer) over H_0 … H_layer (eq. 2), in float32: :meth:`weights`, as a module call (so a
        parallel plan can hook it)."""
        return torch.softmax(self.logits[layer].float(), dim=0)

    def weights(self, layer: int) -> torch.Tensor:
        """softmax(a_layer) over H_0 … H_layer (eq. 2), in float32."""
        return self(layer)

    def mix(self, layer: int, states: list[torch.Tensor]) -> torch.Tensor:
        """Σ_i softmax(a_layer)_i · states[i] over the ``layer + 1`` stored outputs H_0 … H_layer (eq. 1–2).

        The reference: one multiply and one add per term, autograd through each. The trunk runs
        :class:`DenseStates`, which computes the same sums at a fraction of the memory traffic.
        """
        w = self.weights(layer).to(states[0].dtype)
        out = w[0] * states[0]
        for i in range(1, layer + 1):
            out = out + w[i] * states[i]
        return out

    def states(self, first: torch.Tensor) -> DenseStates:
        """The store of H_0 (= ``first``) … H_{L−1} for one forward, through which the trunk mixes."""
        return DenseStates(self, first)

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


class DenseStates:
    """H_0 … H_{L−1} of one forward kept in one buffer [L, …], and the mixes of eq. 1 over them.

    Every mix is one matrix–vector product over the buffer, forward and backward, instead of a multiply and an
    add per earlier output with a gradient tensor per term: at depth L the reference's O(L²) elementwise passes
    (each reading and writing a full [B, T, d] tensor) dominate the step (+50% at 48 layers, measured); here each
    term costs one read in the forward and two in the backward.

    Gradients (for M_l = Σ_{i≤l} W[l, i] H_i, W[l] = softmax(a_l)):
      ∂L/∂H_i gets Σ_{l≥i} W[l, i] ∂L/∂M_l from the mixes: mix i's backward sums it from the stored ∂L/∂M_l of
      every later mix, which autograd has already run (each later mix lies downstream of H_{i+1} = F_i + M_i);
      ∂L/∂W[l, i] = ⟨H_i, ∂L/∂M_l⟩ (then through the softmax by autograd).
    Autograd sees one edge per mix, to its latest state; the earlier states are read from the buffer.
    """

    def __init__(self, dense: DenseResidual, first: torch.Tensor) -> None:
        self.dense = dense
        self.n_layers = len(dense.logits)
        self.buffer = first.new_empty((self.n_layers, *first.shape), requires_grad=False)
        self.weights: list[torch.Tensor] = []  # W[l] of every mix so far (detached)
        self.grads: torch.Tensor | None = None  # ∂L/∂M_l, filled by the backward passes
        self.count = 0
        self.append(first)

    def append(self, h: torch.Tensor) -> None:
        """Store the next state H_count."""
        with torch.no_grad():
            self.buffer[self.count].copy_(h)
        self.count += 1

    def mix(self, layer: int, latest: torch.Tensor) -> torch.Tensor:
        """M_layer = Σ_{i≤layer} softmax(a_layer)_i · H_i (eq. 1–2); ``latest`` is H_layer (the last appended)."""
        if layer != self.count - 1:
            raise RuntimeError(f"mix {layer} needs H_0 … H_{layer} stored, {self.count} are")
        w = self.dense.weights(layer).to(self.buffer.dtype)
        self.weights.append(w.detach())
        return _DenseMix.apply(w, latest, self, layer)


class _DenseMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, latest: torch.Tensor, states: DenseStates, layer: int) -> torch.Tensor:
        ctx.states, ctx.layer = states, layer
        n = layer + 1
        with torch.autocast(states.buffer.device.type, enabled=False):  # in the states' dtype, as the reference
            return (w @ states.buffer[:n].view(n, -1)).view(latest.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        st, layer = ctx.states, ctx.layer
        buf = st.buffer
        if st.grads is None:
            st.grads = buf.new_zeros(buf.shape)
        st.grads[layer].copy_(grad)
        n, later = layer + 1, len(st.weights)  # mixes layer … later−1 read H_layer
        with torch.autocast(buf.device.type, enabled=False):
            grad_w = buf[:n].view(n, -1) @ st.grads[layer].view(-1) if ctx.needs_input_grad[0] else None
            coeffs = torch.stack([st.weights[m][layer] for m in range(layer, later)])
            grad_latest = (coeffs @ st.grads[layer:later].view(later - layer, -1)).view(grad.shape)
        return grad_w, grad_latest.to(grad.dtype), None, None
