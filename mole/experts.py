"""The MoLE MLP: a frozen LLaMA MLP whose gate/up/down projections get K LoRA experts, one top-1 router.

LLaVA-MoLE (arXiv 2401.16160, Sec. 3): every decoder layer's MLP gets K LoRA experts; a router
``Linear(hidden, K, bias=True)`` on the MLP input (the post-attention-norm hidden state) picks one
expert per token, and that expert's LoRA is applied to all three projections. ``num_experts == 1``
is plain LoRA: no router, no auxiliary loss.

This module is a plain ``nn.Module``: nothing here knows about DeepSpeed or the trainer. Two
properties make it safe under ZeRO-3 all the same, and are part of its contract:

* Each projection's K experts live in *one* stacked parameter pair (``lora_A``: (K, r, in),
  ``lora_B``: (K, out, r)) owned by a :class:`LoraExperts` module that is called on every forward,
  whatever the routing. ZeRO-3 gathers parameters per module call, so every rank gathers the same
  tensors in the same order even when its tokens go to different experts, and an expert with no
  tokens simply runs on an empty slice (its gradient slice is zero, never ``None``).
* Routing statistics are *overwritten* on each forward, never accumulated, so re-running a forward
  under gradient checkpointing does not count tokens twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTING_MODES = ("hard", "scaled", "dense")


@dataclass
class Routes:
    """How one MoLE forward dispatches tokens, shared by the gate/up/down expert banks.

    Sparse modes (``hard``/``scaled``) pass tokens *sorted by expert*: ``counts[e]`` consecutive
    rows belong to expert ``e``. ``token_weights`` (sorted like the tokens) scales each token's
    delta (``scaled``); ``None`` adds it unscaled (``hard``, plain LoRA). Dense mode passes tokens in
    their original order with ``dense_weights`` (tokens, K), the softmax over experts.
    """

    counts: list[int] | None = None
    token_weights: torch.Tensor | None = None  # (tokens,)
    dense_weights: torch.Tensor | None = None  # (tokens, K)


@dataclass
class RoutingStats:
    """Per-sample routing sums of one layer, over non-padding tokens only.

    Kept as sums (not means) so the balance losses and the logged expert load can be pooled over
    samples, layers or ranks exactly.
    """

    prob_sum: torch.Tensor  # (batch, K) float32, differentiable: sum of router probabilities
    count: torch.Tensor  # (batch, K) float32: tokens whose top-1 is each expert
    tokens: torch.Tensor  # (batch,) float32: non-padding tokens


class RoutingContext:
    """State shared by the model and all its MoLE layers for one forward.

    The decoder calls ``mlp(hidden_states)`` with no padding mask, so a model-level pre-forward hook
    stores the batch's attention mask here (see :mod:`mole.surgery`), and each layer reads it.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None  # (batch, seq) bool, True = real token
        self.layers: list[MoleMLP] = []

    def mask_for(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """The (batch, seq) mask of the tokens in this forward; with a KV cache only the newest columns."""
        mask = self.token_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < seq:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        return mask[:, -seq:].to(device=device, dtype=torch.bool)

    def stats(self) -> list[RoutingStats]:
        """Routing statistics of every routed layer from the latest forward, in layer order."""
        return [layer.stats for layer in self.layers if layer.stats is not None]


class LoraExperts(nn.Module):
    """K LoRA adapters (A: in -> r, B: r -> out) for one frozen linear projection.

    Initialised as peft initialises LoRA (A Kaiming-uniform, B zero), so training starts at the
    base model. Returns only the LoRA *delta*; the caller adds the frozen projection's output.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.num_experts, self.r, self.scaling = num_experts, r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r))
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, routes: Routes) -> torch.Tensor:  # x: (tokens, in)
        x = self.dropout(x)
        if routes.dense_weights is not None:
            return self._dense(x, routes.dense_weights)
        pieces = x.split(routes.counts)
        delta = torch.cat(
            [(piece @ self.lora_A[e].t()) @ self.lora_B[e].t() for e, piece in enumerate(pieces)]
        )  # (tokens, out)
        if routes.token_weights is not None:
            delta = delta * routes.token_weights.unsqueeze(-1)
        return delta * self.scaling

    def _dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_e w_e * B_e A_e x, as two matmuls: every expert on every token (K x the LoRA cost)."""
        num_experts, out_features, r = self.lora_B.shape
        xa = torch.einsum("ti,kri->tkr", x, self.lora_A) * weights.unsqueeze(-1)  # (tokens, K, r)
        b_stacked = self.lora_B.permute(0, 2, 1).reshape(num_experts * r, out_features)  # (K*r, out)
        return (xa.reshape(x.shape[0], num_experts * r) @ b_stacked) * self.scaling


class MoleMLP(nn.Module):
    """A LLaMA-style MLP (``down(act(gate(x)) * up(x))``) with MoLE experts on its projections.

    The frozen projections keep their original attribute names (``gate_proj``, ``up_proj``,
    ``down_proj``), so the base model's state-dict keys do not change. ``targets`` says which
    projections get experts; the others stay frozen as they are.
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        hidden_size: int,
        num_experts: int,
        r: int,
        alpha: float,
        dropout: float,
        routing: str,
        context: RoutingContext,
        targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
    ):
        super().__init__()
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.gate_proj, self.up_proj, self.down_proj = base_mlp.gate_proj, base_mlp.up_proj, base_mlp.down_proj
        self.act_fn = base_mlp.act_fn
        self.num_experts, self.routing = num_experts, routing
        self.router = nn.Linear(hidden_size, num_experts, bias=True) if num_experts > 1 else None
        self.experts = nn.ModuleDict(
            {
                name: LoraExperts(proj.in_features, proj.out_features, num_experts, r, alpha, dropout)
                for name in targets
                for proj in [getattr(self, name)]
            }
        )
        self.context = context  # not a submodule: shared, holds no parameters
        self.stats: RoutingStats | None = None
        context.layers.append(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: (batch, seq, hidden)
        batch, seq, width = hidden.shape
        tokens = hidden.reshape(batch * seq, width)
        routes, order = self._route(tokens, batch, seq)
        if order is not None:
            tokens = tokens[order]  # grouped by expert: each expert's tokens are one contiguous slice
        gate = self._project("gate_proj", tokens, routes)
        up = self._project("up_proj", tokens, routes)
        out = self._project("down_proj", self.act_fn(gate) * up, routes)
        if order is not None:
            out = out[torch.argsort(order)]  # back to the original token order
        return out.reshape(batch, seq, -1)

    def _project(self, name: str, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        out = getattr(self, name)(x)
        if name in self.experts:
            out = out + self.experts[name](x, routes)
        return out

    def _route(self, tokens: torch.Tensor, batch: int, seq: int) -> tuple[Routes, torch.Tensor | None]:
        """Pick each token's expert, record the statistics, and say how to dispatch."""
        if self.router is None:
            self.stats = None
            return Routes(counts=[tokens.shape[0]]), None
        probs = self.router(tokens).float().softmax(dim=-1)  # (tokens, K)
        top_prob, top_expert = probs.max(dim=-1)
        self.stats = _routing_stats(probs, top_expert, self.context.mask_for(batch, seq, tokens.device), batch)
        if self.routing == "dense":
            return Routes(dense_weights=probs.to(tokens.dtype)), None
        order = torch.argsort(top_expert, stable=True)
        counts = torch.bincount(top_expert, minlength=self.num_experts).tolist()
        weights = top_prob[order].to(tokens.dtype) if self.routing == "scaled" else None
        return Routes(counts=counts, token_weights=weights), order


def _routing_stats(probs: torch.Tensor, top_expert: torch.Tensor, mask: torch.Tensor, batch: int) -> RoutingStats:
    """Sum probabilities and top-1 choices per sample over the non-padding tokens."""
    num_experts = probs.shape[-1]
    keep = mask.reshape(-1, 1).to(probs.dtype)  # (tokens, 1)
    chosen = F.one_hot(top_expert, num_experts).to(probs.dtype) * keep
    return RoutingStats(
        prob_sum=(probs * keep).reshape(batch, -1, num_experts).sum(dim=1),
        count=chosen.reshape(batch, -1, num_experts).sum(dim=1).detach(),
        tokens=keep.reshape(batch, -1).sum(dim=1),
    )
