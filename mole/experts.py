"""The MoLE MLP: a frozen LLaMA MLP whose gate/up/down projections get K LoRA experts, one top-1 router.

LLaVA-MoLE (arXiv 2401.16160, Sec. 3): every decoder layer's MLP gets K LoRA experts; a router
``Linear(hidden, K, bias=True)`` on the MLP input (the post-attention-norm hidden state) picks one
expert per token, and that expert's LoRA is applied to all three projections. ``num_experts == 1``
is plain LoRA: no router, no auxiliary loss. Routing ``domain`` has no router either: each token goes to
the expert of its sample's domain, which the caller states per forward (:meth:`RoutingContext.route`).

This module is a plain ``nn.Module``: nothing here knows about DeepSpeed or the trainer. Two
properties make it safe under ZeRO-3 all the same, and are part of its contract:

* Each projection's K experts live in *one* stacked parameter pair (``lora_A``: (K, r, in),
  ``lora_B``: (K, out, r)) owned by a :class:`LoraExperts` module that is called on every forward,
  whatever the routing. ZeRO-3 gathers parameters per module call, so every rank gathers the same
  tensors in the same order even when its tokens go to different experts, and an expert with no
  tokens simply runs on an empty slice (its gradient slice is zero, never ``None``).
* Routing statistics are *overwritten* on each forward, never accumulated, so re-running a forward
  under gradient checkpointing does not count tokens twice.

Sparse compute: tokens are sorted by expert once per layer (a permutation whose backward is a gather),
then each projection adds its experts' deltas in place onto the frozen output, with the token weights
and the LoRA scaling applied to the rank-r intermediate. The per-expert matmuls run either as a loop
over host-side counts (one ``.tolist()`` per layer; CPU and older GPUs) or as ``torch._grouped_mm``
over device-side offsets (bf16 on Hopper+, no host sync); both are hand-written autograd functions in
:mod:`mole.expert_kernels`. ``docs/performance.md`` has the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mole.choices import RouterInput, Routing, options
from mole.expert_kernels import (
    GroupedLora,
    PermuteRows,
    SortedLora,
    aligned,
    grouped_lora,
    grouped_mm_supported,
    row_slices,
    sorted_lora,
)


@dataclass
class Routes:
    """How one MoLE forward dispatches tokens, shared by the gate/up/down expert banks.

    Sparse modes (``hard``/``scaled``) pass tokens *sorted by expert*: rows ``slices[e]`` belong to
    expert ``e`` (split on the host, once per layer for all three projections), or, on the grouped-GEMM path, ``offsets`` holds the same
    split on the device (int32 cumulative ends) so the host never waits for the routing.
    ``token_scale`` (sorted like the tokens) multiplies each token's delta: its router probability
    times the LoRA scaling alpha/r (``scaled``), computed once per layer for the three projections;
    ``None`` applies the bank's scaling alone (``hard``, plain LoRA). Dense mode passes tokens in their original order with
    ``dense_weights`` (tokens, K), the softmax over experts.
    """

    slices: list[slice] | None = None
    offsets: torch.Tensor | None = None  # (K,) int32
    idle: torch.Tensor | None = None  # (K,) bool, with ``offsets``: experts that got no token
    token_scale: torch.Tensor | None = None  # (tokens, 1)
    dense_weights: torch.Tensor | None = None  # (tokens, K)


@dataclass
class RoutingStats:
    """Per-sample routing sums of one layer, over non-padding tokens only (a packed row holds several
    samples: each is counted on its own).

    Kept as sums (not means) so the balance losses and the logged expert load can be pooled over
    samples, layers or ranks exactly.
    """

    prob_sum: torch.Tensor  # (batch, K) float32, differentiable: sum of router probabilities
    count: torch.Tensor  # (batch, K) float32: tokens whose top-1 is each expert
    tokens: torch.Tensor  # (batch,) float32: non-padding tokens
    entropy_sum: torch.Tensor | None = None
    """(batch,) float32: sum of each token's router entropy in nats (how undecided the router is; 0 under
    routing ``domain``), for the logged diagnostics: a router that stays near log K never commits."""


class RoutingContext:
    """State shared by the model and all its MoLE layers for one forward.

    The decoder calls ``mlp(hidden_states)`` with no padding mask, so a model-level pre-forward hook
    stores the batch's attention mask here (see :mod:`mole.surgery`), and each layer reads it: a padded
    batch's samples are its rows. A packed batch has no attention mask (several samples share a row);
    its forward sets ``sample_ids`` instead, so that routing is still counted per sample, never per row.
    Routing ``domain`` reads each sample's domain from ``domains`` (:meth:`route`), through the same
    token -> sample map.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None  # (batch, seq) bool, True = real token
        self.sample_ids: torch.Tensor | None = None  # (batch, seq) long: each token's sample, -1 = padding
        self.num_samples = 0  # how many samples ``sample_ids`` numbers (0 .. num_samples - 1)
        self.domains: torch.Tensor | None = None  # (samples,) long: each sample's domain; 0-d: every token's
        self.cached_positions = 0  # positions of the rows that earlier forwards held (a KV cache's length)
        self.layers: list[MoleMLP] = []

    def pack(self, sample_ids: torch.Tensor | None, num_samples: int = 0) -> None:
        """Count routing per sample by ``sample_ids`` (a packed batch) or, with ``None``, per row of the
        attention mask (a padded batch). Set before each forward: it holds until changed."""
        self.sample_ids, self.num_samples = sample_ids, num_samples

    def route(self, domains: torch.Tensor | int | None) -> None:
        """For routing ``domain``: each sample's domain index, (samples,) in the order of the batch's rows
        (padded) or ``sample_ids`` (packed), or one index for every token (a generation of one domain).
        Holds until changed; ``None`` clears it, and a domain-routed forward then refuses to run."""
        self.domains = None if domains is None else torch.as_tensor(domains, dtype=torch.long)

    def stats(self) -> list[RoutingStats]:
        """Routing statistics of every routed layer from the latest forward, in layer order."""
        return [layer.stats for layer in self.layers if layer.stats is not None]

    def clear(self) -> None:
        """Drop every layer's routing state (and the autograd graph it may still reference)."""
        for layer in self.layers:
            layer.clear_routing()

    def snapshot(self) -> tuple:
        """What says which sample each token of the current forward is: read by :func:`_token_samples`."""
        return self.sample_ids, self.num_samples, self.token_mask


def _token_samples(sample_ids: torch.Tensor | None, num_samples: int, mask: torch.Tensor | None, batch: int, seq: int,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """Each of a forward's ``batch x seq`` tokens' sample (flat, -1 = padding) and how many samples.

    From ``sample_ids`` when they describe this forward (a packed batch), else the rows of the attention
    ``mask`` (with a KV cache, its newest columns; without a mask every token is real)."""
    if sample_ids is not None and sample_ids.shape == (batch, seq):
        return sample_ids.reshape(-1).to(device), num_samples
    if mask is None or mask.shape[0] != batch or mask.shape[1] < seq:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, seq)
    return torch.where(mask[:, -seq:].to(device=device, dtype=torch.bool), rows, -1).reshape(-1), batch


class LoraExperts(nn.Module):
    """K LoRA adapters (A: in -> r, B: r -> out) for one frozen linear projection.

    Initialised as peft initialises LoRA (A Kaiming-uniform, B zero), so training starts at the
    base model. Called with the frozen projection's output ``base``, it returns ``base`` plus the LoRA
    delta, added *in place* (``base`` must not be needed by anything else: a linear layer's output is
    not); without ``base`` it returns the delta alone.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.num_experts, self.r, self.scaling = num_experts, r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r))
        if self.lora_A.device.type != "meta":  # built on the meta device only to list its tensors: no values to draw
            for expert in range(num_experts):
                nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, routes: Routes, base: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(x)  # (tokens, in)
        if routes.dense_weights is not None:
            delta = self._dense(x, routes.dense_weights)
            return delta if base is None else base + delta
        if base is None:
            base = x.new_zeros(x.shape[0], self.lora_B.shape[1])
        # without autograd (generation, evaluation) the functions' forward math runs directly: the
        # autograd.Function machinery is host time a decode step spends per projection
        direct = not torch.is_grad_enabled()
        if routes.offsets is not None:
            args = (aligned(x), base, aligned(self.lora_A), aligned(self.lora_B), routes.token_scale, routes.offsets)
            return grouped_lora(*args, self.scaling)[0] if direct else GroupedLora.apply(*args, routes.idle, self.scaling)
        args = (x, base, self.lora_A, self.lora_B, routes.token_scale)
        if direct:
            return sorted_lora(*args, routes.slices, self.scaling)[0]
        return SortedLora.apply(*args, routes.slices, self.scaling)

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
        routing: Routing,
        context: RoutingContext,
        targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
        router_input: RouterInput = "token",
    ):
        super().__init__()
        if routing not in options(Routing):
            raise ValueError(f"routing must be one of {options(Routing)}, got {routing!r}")
        if router_input not in options(RouterInput):
            raise ValueError(f"router_input must be one of {options(RouterInput)}, got {router_input!r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.gate_proj, self.up_proj, self.down_proj = base_mlp.gate_proj, base_mlp.up_proj, base_mlp.down_proj
        self.act_fn = base_mlp.act_fn
        self.num_experts, self.routing, self.scaling = num_experts, routing, alpha / r
        learned = num_experts > 1 and routing != "domain"
        self.router = nn.Linear(hidden_size, num_experts, bias=True) if learned else None
        if router_input != "token" and not learned:
            raise ValueError(f"router_input {router_input!r} needs a learned router (K > 1, routing not 'domain')")
        self.router_input = router_input
        self._prefix: tuple[torch.Tensor, torch.Tensor, int] | None = None
        """prefix_mean: each row's running sum and count of MLP inputs after the latest forward, and the
        positions it covered; a forward that continues those rows (a decode step under a KV cache) adds to it."""
        self.experts = nn.ModuleDict(
            {
                name: LoraExperts(proj.in_features, proj.out_features, num_experts, r, alpha, dropout)
                for name in targets
                for proj in [getattr(self, name)]
            }
        )
        self.context = context  # not a submodule: shared, holds no parameters
        self._stats: RoutingStats | None = None
        self._routing: tuple | None = None  # what the statistics are computed from, until asked
        self._expert_ids: torch.Tensor | None = None  # arange(K) on the routing's device, made once
        self.grouped_mm = "auto"
        """Sparse dispatch: ``auto`` uses ``torch._grouped_mm`` (no host sync) where
        :func:`grouped_mm_supported`, else a per-expert loop over host-side counts; ``always`` /
        ``never`` force one (``always`` needs a torch whose ``_grouped_mm`` runs on that device)."""
        self._widths = sorted({w for bank in self.experts.values() for w in (*bank.lora_A.shape[1:], bank.lora_B.shape[1])})
        context.layers.append(self)

    @property
    def stats(self) -> RoutingStats | None:
        """This layer's routing statistics from its latest forward (``None`` for plain LoRA). Under routing
        ``domain`` the "probabilities" are the one-hot domain assignment: the statistics count each
        domain's tokens on its expert (a diagonal domain x expert table) and carry no gradient.

        Computed on first access: training asks every step (the balance loss), generation never does,
        and a decode step then saves the host the ops that would compute them in every layer.
        """
        if self._stats is None and self._routing is not None:
            probs, top_expert, snapshot, batch, seq = self._routing
            # one-hot by scatter: F.one_hot reads its input's range back to the host (on a CPU)
            chosen = torch.zeros_like(probs).scatter_(1, top_expert.unsqueeze(1), 1.0)  # (tokens, K)
            self._stats = _routing_stats(probs, chosen, *_token_samples(*snapshot, batch, seq, probs.device))
            self._routing = None
        return self._stats

    def clear_routing(self) -> None:
        """Forget the latest forward's routing (statistics and what they would be computed from)."""
        self._stats = self._routing = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: (batch, seq, hidden)
        batch, seq, width = hidden.shape
        tokens = hidden.reshape(batch * seq, width)
        routes, order, inverse = self._route(tokens, batch, seq)
        if order is not None:  # group tokens by expert: each expert's tokens become one contiguous slice
            tokens = PermuteRows.apply(tokens, order, inverse)
        gate = self._project("gate_proj", tokens, routes)
        up = self._project("up_proj", tokens, routes)
        out = self._project("down_proj", self.act_fn(gate) * up, routes)
        if order is not None:
            out = PermuteRows.apply(out, inverse, order)  # back to the original token order
        return out.reshape(batch, seq, -1)

    def _project(self, name: str, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        out = getattr(self, name)(x)
        if name in self.experts:
            out = self.experts[name](x, routes, base=out)
        return out

    def _route(self, tokens: torch.Tensor, batch: int, seq: int) -> tuple[Routes, torch.Tensor | None, torch.Tensor | None]:
        """Pick each token's expert, record the statistics, and say how to dispatch: the routes, and the
        permutation that sorts the tokens by expert with its inverse (``None`` when nothing moves)."""
        if self.routing == "domain":
            top_expert = self._domain_experts(batch, seq, tokens.device)
            probs = torch.zeros(tokens.shape[0], self.num_experts, device=tokens.device).scatter_(
                1, top_expert.unsqueeze(1), 1.0)  # (tokens, K) one-hot
            top_prob = probs.new_ones(tokens.shape[0])
        elif self.router is None:
            return Routes(slices=[slice(0, tokens.shape[0])]), None, None
        else:
            features = tokens if self.router_input == "token" else self._prefix_mean(tokens, batch, seq)
            probs = self.router(features).float().softmax(dim=-1)  # (tokens, K)
            top_prob, top_expert = probs.max(dim=-1)
        self._stats, self._routing = None, (probs, top_expert, self.context.snapshot(), batch, seq)
        if self.routing == "dense":
            return Routes(dense_weights=probs.to(tokens.dtype)), None, None
        # one token (a decode step of one sequence) is sorted already: no permutation to make or undo
        order = inverse = None
        sorted_experts = top_expert
        if tokens.shape[0] > 1:
            sorted_experts, order = torch.sort(top_expert, stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
        # each expert's end row in the sorted tokens, found on the device: torch.bincount would read its
        # input's min and max back to the host (on a GPU, two waits for the device per layer, and the
        # host could no longer run ahead)
        if self._expert_ids is None or self._expert_ids.device != top_expert.device:
            self._expert_ids = torch.arange(self.num_experts, device=top_expert.device)
        ends = torch.searchsorted(sorted_experts, self._expert_ids, right=True, out_int32=True)  # (K,)
        scale = None
        if self.routing == "scaled":  # once per layer for the three projections, LoRA scaling included
            top_prob = top_prob.unsqueeze(1) if order is None else PermuteRows.apply(top_prob.unsqueeze(1), order, inverse)
            scale = (top_prob * self.scaling).to(tokens.dtype)  # (tokens, 1)
        if self._grouped(tokens):
            # which experts got no token: only the backward needs it (their weight gradients are zeroed)
            idle = ends == F.pad(ends[:-1], (1, 0)) if torch.is_grad_enabled() else None
            routes = Routes(offsets=ends, idle=idle, token_scale=scale)
        else:
            routes = Routes(slices=row_slices(ends.tolist()), token_scale=scale)  # .tolist() waits for the device
        return routes, order, inverse

    def _prefix_mean(self, tokens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """(tokens, hidden): each token's mean of its sample's MLP inputs up to and including it, padding
        excluded, without a host sync. Samples are contiguous runs of a row (one per row when padded,
        several when packed). A forward that continues cached positions (its KV cache's length, or an
        attention mask longer than its tokens: a decode step) continues the rows of the previous forward:
        their stored sums are added, and
        a continuation of positions this layer did not see is refused rather than routed on a part of
        its sample. Rows are assumed to stay in place across decode steps (greedy or sampled generation;
        beam search reorders them)."""
        samples, _ = _token_samples(*self.context.snapshot(), batch, seq, tokens.device)
        samples = samples.view(batch, seq)
        real = (samples >= 0).unsqueeze(-1).float()  # (batch, seq, 1); sums in fp32: bf16 counts stop at 256
        hidden = tokens.view(batch, seq, -1).float()
        sums, counts = (hidden * real).cumsum(dim=1), real.cumsum(dim=1)
        # each token's sample's first position: where the sample id changes along the row
        previous = F.pad(samples[:, :-1], (1, 0), value=-2)
        positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
        first = torch.where(samples != previous, positions, 0).cummax(dim=1).values  # (batch, seq)
        before_sums, before_counts = F.pad(sums, (0, 0, 1, 0))[:, :-1], F.pad(counts, (0, 0, 1, 0))[:, :-1]
        sums = sums - before_sums.gather(1, first.unsqueeze(-1).expand_as(sums))
        counts = counts - before_counts.gather(1, first.unsqueeze(-1))
        mask, sample_ids = self.context.token_mask, self.context.sample_ids
        if sample_ids is not None and sample_ids.shape == (batch, seq):
            earlier = 0  # a packed training batch: whole samples
        else:  # the cache's length; without one a mask longer than the forward says it too
            earlier = max(self.context.cached_positions, 0 if mask is None else mask.shape[1] - seq)
        if earlier > 0:
            if self._prefix is None or self._prefix[0].shape[0] != batch or self._prefix[2] != earlier:
                raise RuntimeError(f"router_input prefix_mean: this forward continues {earlier} earlier positions of "
                                   f"{batch} rows that this layer did not see; run the whole sequence (or its prompt "
                                   "first, as generate does)")
            prior_sums, prior_counts, _ = self._prefix
            sums, counts = sums + prior_sums.unsqueeze(1), counts + prior_counts.unsqueeze(1)
        self._prefix = (sums[:, -1].detach(), counts[:, -1].detach(), earlier + seq)
        return (sums / counts.clamp(min=1)).reshape(batch * seq, -1).to(tokens.dtype)

    def _domain_experts(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """(tokens,) each token's expert under routing ``domain``: its sample's domain (padding takes
        sample 0's; its output is never read)."""
        domains = self.context.domains
        if domains is None:
            raise RuntimeError("this adapter routes by domain (mole.routing: domain): say each sample's domain "
                               "before the forward (RoutingContext.route)")
        if domains.dim() == 0:
            return domains.to(device).expand(batch * seq).contiguous()
        samples, count = _token_samples(*self.context.snapshot(), batch, seq, device)
        if domains.shape != (count,):
            raise RuntimeError(f"routing domain: {domains.numel()} sample domains given for a forward of {count} samples")
        return domains.to(device)[samples.clamp(min=0)]

    def _grouped(self, tokens: torch.Tensor) -> bool:
        if self.grouped_mm == "auto":
            return grouped_mm_supported(tokens, *self._widths)
        return self.grouped_mm == "always"


def _routing_stats(probs: torch.Tensor, chosen: torch.Tensor, samples: torch.Tensor, num_samples: int) -> RoutingStats:
    """Sum probabilities and top-1 choices (``chosen``, one-hot) per sample over the tokens that belong to
    one: ``samples`` (tokens,) holds each token's sample, -1 for padding (summed into a dropped extra row)."""
    num_experts = probs.shape[-1]
    index = torch.where(samples < 0, num_samples, samples)  # (tokens,)
    ones = torch.ones(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
    entropy = -torch.special.xlogy(probs.detach(), probs.detach()).sum(dim=1, keepdim=True)  # (tokens, 1); 0 log 0 = 0
    sums = probs.new_zeros(num_samples + 1, 2 * num_experts + 2).index_add(
        0, index, torch.cat([probs, chosen, entropy, ones], 1))
    return RoutingStats(prob_sum=sums[:num_samples, :num_experts],
                        count=sums[:num_samples, num_experts:2 * num_experts].detach(),
                        tokens=sums[:num_samples, -1].detach(), entropy_sum=sums[:num_samples, -2].detach())
