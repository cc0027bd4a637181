"""Turn a Hugging Face multimodal LLM into a MoLE one: experts in every LLM MLP, plain LoRA on attention.

Where the MLPs, attention projections and projector are is the family's (:mod:`mole.backbones`).

Surgery only moves module references and adds new modules; it never reads a frozen weight, so it
works the same on a model whose weights ZeRO-3 has already partitioned across ranks. It refuses
loudly when a target pattern matches nothing, rather than training an unadapted model.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

from torch import nn

from mole.backbones import Backbone, backbone_for
from mole.backbones.llava import LLAVA
from mole.experts import MoleMLP, RoutingContext
from mole.spec import AdapterSpec

MLP_PATTERN = re.compile(LLAVA.mlp_pattern)
"""LLaVA-1.5's (every family of the LLaVA line shares it); surgery reads the model's family's."""
PROJECTOR_PREFIX = LLAVA.projector_prefixes[0]
"""The multimodal projector's module name in every family of the LLaVA line."""


class SurgeryError(ValueError):
    """A target pattern that matched nothing, or a module that does not have the expected shape."""


@dataclass
class MoleSurgery:
    """What :func:`apply_mole` did: the shared routing context and the names it replaced or adapted."""

    context: RoutingContext
    mole_layers: list[str] = field(default_factory=list)
    lora_layers: list[str] = field(default_factory=list)


def apply_mole(model: nn.Module, spec: AdapterSpec) -> MoleSurgery:
    """Add MoLE experts to the LLM's MLPs and peft LoRA to its attention, as ``spec`` describes, then set
    what trains; the model keeps ``spec`` as ``model.mole_spec``.

    ``spec`` must describe this model's family and shapes (:meth:`AdapterSpec.on_base`). Afterwards
    exactly the experts, routers, attention LoRA and (if ``spec.train_projector``) the multimodal
    projector require gradients; the vision tower and the LLM stay frozen.
    """
    misfit = [change for change in spec.on_base(model.config).diff(spec) if change.impact == "shape"]
    if misfit:
        raise SurgeryError("the adapter spec does not describe this model: " + ", ".join(
            f"{c.field} {c.before!r} in the spec, {c.after!r} in the model" for c in misfit))
    backbone = backbone_for(model.config)
    for param in model.parameters():
        param.requires_grad_(False)
    surgery = MoleSurgery(context=RoutingContext())
    if spec.attn_targets:
        surgery.lora_layers = _add_attention_lora(model, backbone, list(spec.attn_targets), spec.r, spec.alpha,
                                                  spec.dropout)
    mlp_pattern = re.compile(backbone.mlp_pattern)
    for name, module in list(model.named_modules()):
        if not mlp_pattern.fullmatch(name):
            continue
        missing = [t for t in spec.mlp_targets if not isinstance(getattr(module, t, None), nn.Linear)]
        if missing:
            raise SurgeryError(f"{name} has no linear {missing}; lora.mlp_targets must name its projections")
        mole = MoleMLP(module, spec.hidden_size, spec.num_experts, spec.r, spec.alpha, spec.dropout, spec.routing,
                       surgery.context, spec.mlp_targets, router_input=spec.router_input)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, mole)
        surgery.mole_layers.append(name)
    if not surgery.mole_layers:
        raise SurgeryError(f"no module matches {mlp_pattern.pattern!r}: does this {backbone.family} model have "
                           "a LLaMA-style LLM?")
    model.register_forward_pre_hook(_remember_padding_mask(surgery.context), with_kwargs=True)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, spec.train_projector, backbone))
    model.mole_spec = spec
    return surgery


def is_trainable(name: str, train_projector: bool, backbone: Backbone = LLAVA) -> bool:
    """The one rule for what trains: experts, routers, LoRA, and optionally the projector (the
    family's projection modules, e.g. LLaVA-NeXT's ``image_newline`` too)."""
    if ".experts." in name or ".router." in name or "lora_" in name:
        return True
    return train_projector and backbone.is_projector(name)


def _add_attention_lora(model: nn.Module, backbone: Backbone, targets: list[str], r: int, alpha: float,
                        dropout: float) -> list[str]:
    """Plain LoRA on the LLM's attention projections, by peft itself."""
    from peft import LoraConfig, inject_adapter_in_model

    pattern = backbone.attention_regex(targets)
    matched = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    unmatched = [t for t in targets if not any(name.endswith(f".{t}") for name in matched)]
    if unmatched:
        raise SurgeryError(f"lora.attn_targets {unmatched} match no module of the LLM's attention ({pattern!r})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, model)
    return matched


def _remember_padding_mask(context: RoutingContext):
    """A pre-forward hook: the decoder calls ``mlp(x)`` with no mask, so hand it over via the context, with
    how many positions of the rows the forward continues (its KV cache's length)."""

    def hook(module, args, kwargs):
        # the KV cache is ``cache`` in transformers 5.x, ``past_key_values`` before
        mask, cache = kwargs.get("attention_mask"), kwargs.get("cache", kwargs.get("past_key_values"))
        if (mask is None or cache is None) and args:  # passed by position: bind them as the forward's signature says
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            mask = bound.get("attention_mask") if mask is None else mask
            cache = bound.get("cache", bound.get("past_key_values")) if cache is None else cache
        context.token_mask = mask
        # positions this forward continues (a KV cache's length), whether or not a mask says so
        context.cached_positions = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        return None

    return hook
