"""The routing diagnosis's probe (experiments.router_probe): it finds the domain where a linear map can
read it, stays near chance where it cannot, and scores a router's choices by their NMI."""

from __future__ import annotations

import torch

from experiments.router_probe import diagnose


def collected(features: torch.Tensor, domain: torch.Tensor, choice: torch.Tensor | None) -> dict:
    samples = torch.arange(len(domain)) // 3  # three tokens per sample: halves split by sample, not by token
    return {"features": [features], "choice": [choice], "domain": domain, "sample": samples,
            "answer": torch.arange(len(domain)) % 3 == 2}


def test_the_probe_reads_a_linearly_coded_domain_and_not_noise_and_the_nmi_scores_the_router():
    generator = torch.Generator().manual_seed(0)
    domains, width, tokens = 3, 16, 1800
    domain = torch.randint(domains, (tokens,), generator=generator)
    noise = torch.randn(tokens, width, generator=generator)
    coded = noise.clone()
    coded[:, :domains] += 4.0 * torch.nn.functional.one_hot(domain, domains)  # the domain, linearly readable
    routed_by_domain = diagnose(collected(coded, domain, domain.clone()), domains)["layers"][0]
    assert routed_by_domain["probe_accuracy_answer"] > 0.95 and routed_by_domain["probe_accuracy_all"] > 0.95
    assert routed_by_domain["router_nmi_all"] > 0.99, "a router choosing the domain's expert has NMI 1"
    blind = diagnose(collected(noise, domain, torch.randint(domains, (tokens,), generator=generator)), domains)
    row = blind["layers"][0]
    assert abs(row["probe_accuracy_all"] - 1 / 3) < 0.08, f"noise carries no domain: {row}"
    assert row["router_nmi_all"] < 0.02 and blind["chance"] == 1 / 3
    assert diagnose(collected(noise, domain, None), domains)["layers"][0].keys() == {
        "layer", "probe_accuracy_answer", "tokens_answer", "probe_accuracy_all", "tokens_all"}, "LoRA: no router, no NMI"
