"""A MoLE model (LLaVA-MoLE, Chen et al. 2024, arXiv 2401.16160) that plain transformers loads.

Written beside the weights by mole's ``launch/export.py --format hf``; it needs only torch and
transformers. The model is the family's stock model (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL
or Qwen3-VL; its forward and ``generate`` unchanged) with, in every decoder layer of its LLM:

* the MLP's projections (``mole.mlp_targets``) each given K LoRA experts, and a router
  ``Linear(hidden, K)`` on the MLP input choosing one expert per token (``hard``: its LoRA delta;
  ``scaled``: its delta times its router probability; ``dense``: the softmax-weighted sum of every
  expert's delta); K=1 is plain LoRA with no router;
* plain LoRA on the attention projections (``mole.attn_targets``).

Every delta is scaled by alpha / r. Every token, padding included, is routed by its own hidden state
alone, so a batch, a padded batch and a KV-cached decode step compute each token alike. Weights keep
the stock model's names; the adapter's are the experts' ``experts.<proj>.lora_A`` (K, r, in) and
``lora_B`` (K, out, r), the routers' ``router.weight`` / ``router.bias``, and the attention
projections' ``lora_A`` (r, in) and ``lora_B`` (out, r). Inference only: no dropout, no balance loss.
"""

import torch
import torch.nn.functional as F
from torch import nn

# The backbone family: mole's export writes these two imports for the adapter's family.
from transformers import LlavaConfig as FamilyConfig
from transformers import LlavaForConditionalGeneration as FamilyForConditionalGeneration

MODEL_TYPE = "mole_" + FamilyConfig.model_type
ADAPTER_FORMAT_VERSION = 3
"""The version of mole's adapter format (``format_version`` in ``config.mole``) this file computes."""
ROUTINGS = ("hard", "scaled", "dense")
"""The routing modes this file computes."""


class MoleConfig(FamilyConfig):
    """The family's config plus ``mole``: the adapter's spec as mole saved it (``num_experts``, ``r``,
    ``alpha``, ``routing``, ``attn_targets``, ``mlp_targets``, ``format_version``, ...)."""

    model_type = MODEL_TYPE
    mole: dict | None = None


class LoraLinear(nn.Module):
    """A frozen linear layer plus one LoRA: ``W x + b + scaling * B A x`` (peft's LoRA at inference).
    Keeps the linear layer's own ``weight`` and ``bias``, so their names do not change."""

    def __init__(self, linear: nn.Linear, r: int, scaling: float):
        super().__init__()
        self.weight, self.bias, self.scaling = linear.weight, linear.bias, scaling
        self.lora_A = nn.Parameter(torch.zeros(r, linear.in_features))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class LoraExperts(nn.Module):
    """K LoRAs for one projection, stacked: ``lora_A`` (K, r, in), ``lora_B`` (K, out, r)."""

    def __init__(self, linear: nn.Linear, num_experts: int, r: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(num_experts, r, linear.in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, linear.out_features, r))


class MoleMLP(nn.Module):
    """A LLaMA-style MLP, ``down(act(gate(x)) * up(x))``, with MoLE experts on its ``targets``."""

    def __init__(self, mlp: nn.Module, hidden_size: int, num_experts: int, r: int, alpha: float, routing: str,
                 targets: list[str]):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.num_experts, self.routing, self.scaling = num_experts, routing, alpha / r
        self.router = nn.Linear(hidden_size, num_experts, bias=True) if num_experts > 1 else None
        self.experts = nn.ModuleDict({name: LoraExperts(getattr(self, name), num_experts, r) for name in targets})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (batch, seq, hidden)
        batch, seq, width = hidden.shape
        x = hidden.reshape(batch * seq, width)
        choice = self.route(x)
        gate = self.project("gate_proj", x, choice)
        up = self.project("up_proj", x, choice)
        return self.project("down_proj", self.act_fn(gate) * up, choice).reshape(batch, seq, -1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Per token (rows of ``x``): its expert (tokens,) and the weight of its rank-r intermediate, the
        LoRA scaling included: (tokens, 1) for ``scaled``, the scaling alone for ``hard`` and K=1; for
        ``dense``, every expert's router probability (tokens, K)."""
        if self.router is None:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device), self.scaling
        probs = self.router(x).float().softmax(dim=-1)  # (tokens, K)
        top_prob, top_expert = probs.max(dim=-1)
        if self.routing == "dense":
            return top_expert, probs.to(x.dtype)
        if self.routing == "scaled":
            return top_expert, (top_prob.unsqueeze(1) * self.scaling).to(x.dtype)
        return top_expert, self.scaling

    def project(self, name: str, x: torch.Tensor, choice: tuple[torch.Tensor, torch.Tensor | float]) -> torch.Tensor:
        out = getattr(self, name)(x)  # (tokens, out)
        if name not in self.experts:
            return out
        bank, (expert, weight) = self.experts[name], choice
        if self.routing == "dense" and self.router is not None:  # sum_e w_e B_e A_e x: every expert on every token
            xa = torch.einsum("ti,kri->tkr", x, bank.lora_A) * weight.unsqueeze(-1)  # (tokens, K, r)
            stacked_b = bank.lora_B.permute(0, 2, 1).reshape(-1, bank.lora_B.shape[1])  # (K*r, out)
            return out + (xa.reshape(x.shape[0], -1) @ stacked_b) * self.scaling
        for e in range(self.num_experts):  # each token through its own expert only
            rows = expert == e
            hs = (x[rows] @ bank.lora_A[e].t()) * (weight[rows] if torch.is_tensor(weight) else weight)  # (tokens_e, r)
            out[rows] = torch.addmm(out[rows], hs, bank.lora_B[e].t())
        return out


class MoleForConditionalGeneration(FamilyForConditionalGeneration):
    """The family's model with the MoLE layers of ``config.mole`` in its LLM (see the module docstring)."""

    config_class = MoleConfig

    def __init__(self, config: MoleConfig):
        super().__init__(config)
        adapter = config.mole or {}
        if adapter.get("format_version") != ADAPTER_FORMAT_VERSION:
            raise ValueError(f"config.mole: adapter format_version {adapter.get('format_version')!r}, but this modelling "
                             f"file computes version {ADAPTER_FORMAT_VERSION}; export the adapter again")
        if adapter["routing"] not in ROUTINGS:
            raise ValueError(f"config.mole: routing {adapter['routing']!r} is not one of {ROUTINGS}")
        r, alpha, num_experts = adapter["r"], adapter["alpha"], adapter["num_experts"]
        for layer in self.model.language_model.layers:
            for name in adapter["attn_targets"]:
                setattr(layer.self_attn, name, LoraLinear(getattr(layer.self_attn, name), r, alpha / r))
            layer.mlp = MoleMLP(layer.mlp, config.text_config.hidden_size, num_experts, r, alpha, adapter["routing"],
                                adapter["mlp_targets"])
