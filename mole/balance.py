"""Auxiliary load-balancing losses, computed from :class:`RoutingStats`.

Without a balancing term a top-1 router tends to collapse onto one expert, which turns MoLE back
into plain LoRA with extra parameters. Both losses below only ever see non-padding tokens: padding
is an artefact of batching and must not pull the router.
"""

from __future__ import annotations

import torch

from mole.choices import AuxLoss, options
from mole.experts import RoutingStats


def switch_loss(stats: list[RoutingStats]) -> torch.Tensor:
    """Switch-Transformer balance loss ``K * sum_e f_e * P_e`` per layer, averaged over layers.

    ``f_e`` is the fraction of the batch's tokens whose top-1 is expert ``e`` (no gradient) and
    ``P_e`` the mean router probability of ``e`` (Fedus et al. 2021, eq. 4). Equals 1 at perfect
    balance, K when one expert takes every token with certainty. ``stats`` come from one forward (every
    layer saw the same batch), and are reduced all at once: a fixed dozen ops for the model rather
    than as many per layer, which a host-bound GPU step would pay for.
    """
    prob_sum = torch.stack([layer.prob_sum for layer in stats])  # (layers, batch, K)
    count = torch.stack([layer.count for layer in stats])  # (layers, batch, K)
    total = torch.stack([layer.tokens for layer in stats]).sum(dim=1).clamp(min=1.0).unsqueeze(-1)  # (layers, 1)
    fraction = count.sum(dim=1) / total  # (layers, K)
    mean_prob = prob_sum.sum(dim=1) / total  # (layers, K)
    return prob_sum.shape[-1] * (fraction * mean_prob).sum(dim=-1).mean()


def per_sample_loss(stats: list[RoutingStats]) -> torch.Tensor:
    """The released LLaVA-MoLE code's form: per sample, tokens pooled over all layers,
    ``sum_j mean(p_j) * mean(1[top1 = j])``, averaged over the samples that have tokens.
    """
    prob_sum = torch.stack([layer.prob_sum for layer in stats]).sum(dim=0)  # (batch, K)
    count = torch.stack([layer.count for layer in stats]).sum(dim=0)  # (batch, K)
    tokens = torch.stack([layer.tokens for layer in stats]).sum(dim=0)  # (batch,)
    has_tokens = tokens > 0
    denom = tokens.clamp(min=1.0).unsqueeze(-1)
    per_sample = ((prob_sum / denom) * (count / denom)).sum(dim=-1)  # (batch,)
    # a product, not per_sample[has_tokens]: a boolean selection's size depends on the data, which on a
    # GPU makes the host wait for the device (samples without tokens contribute 0 either way)
    return (per_sample * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def aux_loss(stats: list[RoutingStats], kind: AuxLoss) -> torch.Tensor:
    """The configured balance loss; zero (a constant) when nothing is routed, e.g. plain LoRA."""
    if not stats:
        return torch.zeros(())
    if kind == "switch":
        return switch_loss(stats)
    if kind == "per_sample":
        return per_sample_loss(stats)
    raise ValueError(f"aux loss must be one of {options(AuxLoss)}, got {kind!r}")
