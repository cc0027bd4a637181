"""Which domains go to which experts: domain x expert token counts per layer, shares, and NMI.

Counts come from the per-layer :class:`mole.experts.RoutingStats` of a forward (``count``: tokens
per sample and expert, padding excluded) and the batch's domain ids. They are sums, so they add up
over batches and ranks (``all_reduce``) before shares or mutual information are taken.
"""

from __future__ import annotations

import torch

from mole.experts import RoutingStats


def domain_expert_counts(stats: list[RoutingStats], domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """(layers, domains, K) float64 token counts of one forward: ``counts[l, d, e]`` is how many of
    domain ``d``'s tokens layer ``l`` routed to expert ``e``. ``domain``: (batch,) domain ids."""
    if not stats:
        return torch.zeros(0, num_domains, 0, dtype=torch.float64)
    num_experts = stats[0].count.shape[-1]
    counts = torch.zeros(len(stats), num_domains, num_experts, dtype=torch.float64)
    index = domain.to(torch.long).cpu()
    for layer, layer_stats in enumerate(stats):
        counts[layer].index_add_(0, index, layer_stats.count.detach().to("cpu", torch.float64))
    return counts


def domain_expert_shares(counts: torch.Tensor) -> torch.Tensor:
    """Each domain's token shares over experts (rows sum to 1; a domain without tokens is all zeros).

    ``counts``: (..., domains, K), e.g. the (layers, domains, K) output of :func:`domain_expert_counts`.
    """
    totals = counts.sum(dim=-1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1e-12), torch.zeros_like(counts))


def normalized_mutual_information(joint_counts: torch.Tensor) -> float:
    """NMI between domain (rows) and chosen expert (columns) of a (domains, K) count table.

    ``I(D; E) / ((H(D) + H(E)) / 2)``, the arithmetic normalisation (scikit-learn's default):
    0 when the expert tells nothing about the domain, 1 when each domain has its own expert(s) and
    no expert is shared. Defined as 0 when either marginal has zero entropy (one domain, or every
    token on one expert: no specialisation to measure).
    """
    joint = joint_counts.to(torch.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    p_domain, p_expert = p.sum(dim=1), p.sum(dim=0)
    h_domain, h_expert = _entropy(p_domain), _entropy(p_expert)
    if h_domain <= 0 or h_expert <= 0:
        return 0.0
    outer = p_domain[:, None] * p_expert[None, :]
    nonzero = p > 0
    mutual = float((p[nonzero] * (p[nonzero] / outer[nonzero]).log()).sum())
    return max(0.0, min(1.0, mutual / ((h_domain + h_expert) / 2)))


def layer_nmi(counts: torch.Tensor) -> list[float]:
    """:func:`normalized_mutual_information` of each layer of a (layers, domains, K) count tensor."""
    return [normalized_mutual_information(layer) for layer in counts]


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())
