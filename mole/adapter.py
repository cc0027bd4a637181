"""The saved adapter: every trainable tensor (experts, routers, attention LoRA, projector) + its config.

``output_dir/adapter/`` holds ``adapter.safetensors`` and ``mole_config.json``; it is the one format
that loading, evaluation and export read. Keys are the LLaVA model's own parameter names.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "mole_config.json"
FORMAT_VERSION = 1


def gather_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters, gathered from ZeRO-3 shards where partitioned.

    Must run on every rank (the gathers are collectives), in the same parameter order.
    """
    import deepspeed

    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            state[name] = param.detach().to("cpu", copy=True).contiguous()
    return state


def adapter_config(cfg, llava_config) -> dict:
    """What a loader needs to rebuild the MoLE layers on a base model and to check it is the right one."""
    text = llava_config.text_config
    return {
        "format_version": FORMAT_VERSION,
        "base_model": cfg.model.name_or_path,
        **{key: getattr(text, key) for key in BASE_SHAPE_KEYS},
        "num_experts": cfg.mole.num_experts,
        "routing": cfg.mole.routing,
        "aux_loss": cfg.mole.aux_loss,
        "r": cfg.lora.r,
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
        "attn_targets": list(cfg.lora.attn_targets),
        "mlp_targets": list(cfg.lora.mlp_targets),
        "train_projector": cfg.train.train_projector,
        # how training turned images into pixels: inference must do the same (see image_settings)
        "image_aspect": cfg.data.image_aspect,
        "image_backend": cfg.data.image_backend,
    }


BASE_SHAPE_KEYS = ("hidden_size", "num_hidden_layers")
"""The base model's text-config shapes an adapter records: its tensors fit only a base that has them."""


def base_shape_mismatches(recorded: dict, text_config) -> list[tuple[str, object, object]]:
    """``(key, recorded, actual)`` for each of :data:`BASE_SHAPE_KEYS` that ``recorded`` (an adapter
    config) holds with another value than ``text_config`` (the base's ``config.text_config``)."""
    return [(key, recorded[key], getattr(text_config, key)) for key in BASE_SHAPE_KEYS
            if key in recorded and recorded[key] != getattr(text_config, key)]


def image_settings(config: dict, image_aspect: str | None = None, image_backend: str | None = None) -> tuple[str, str]:
    """The image aspect and backend to prepare prompts with: the caller's, else what the adapter was
    trained with (``config`` from :func:`read_adapter_config`), else the training defaults
    (``pad``, ``fast``) for adapters that predate the record. The two backends differ by up to 2 uint8
    levels per pixel; a crop instead of a pad shows the model other pixels altogether."""
    return image_aspect or config.get("image_aspect", "pad"), image_backend or config.get("image_backend", "fast")


def save_adapter(directory: str, state: dict[str, torch.Tensor], config: dict) -> None:
    """Write weights then config, each via a temporary file and rename, so a crash leaves no half file."""
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    save_file(state, weights + ".tmp", metadata={"format": "mole", "format_version": str(FORMAT_VERSION)})
    os.replace(weights + ".tmp", weights)
    with open(os.path.join(directory, ADAPTER_CONFIG + ".tmp"), "w") as handle:
        json.dump(config, handle, indent=2)
    os.replace(os.path.join(directory, ADAPTER_CONFIG + ".tmp"), os.path.join(directory, ADAPTER_CONFIG))


class AdapterError(ValueError):
    """An adapter directory that cannot be used as asked: missing files, a format version we do not
    read, or weights and config that do not fit each other or the base model."""


REQUIRED_CONFIG_KEYS = (
    "format_version", "hidden_size", "num_hidden_layers", "num_experts", "routing",
    "r", "alpha", "dropout", "attn_targets", "mlp_targets", "train_projector",
)


def read_adapter_config(directory: str) -> dict:
    """``mole_config.json`` of an adapter directory, checked for the keys and the format version we read."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory {directory!r} does not exist")
    if not os.path.isfile(path):
        inside = os.path.join(directory, "adapter", ADAPTER_CONFIG)
        hint = f" (a training output_dir? its adapter is {os.path.dirname(inside)!r})" if os.path.isfile(inside) else ""
        if not hint and (os.path.isfile(os.path.join(directory, "latest"))
                         or any(name.endswith("model_states.pt") for name in os.listdir(directory))):
            hint = " (a DeepSpeed checkpoint? consolidate it into an adapter with launch/export.py --format mole)"
        raise AdapterError(f"{directory!r} is not a mole adapter directory: it has no {ADAPTER_CONFIG}{hint}")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except ValueError as err:
        raise AdapterError(f"{path}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise AdapterError(f"{path}: missing keys {missing}")
    if config["format_version"] != FORMAT_VERSION:
        raise AdapterError(
            f"{path}: adapter format_version {config['format_version']} is not the version this mole reads ({FORMAT_VERSION})"
        )
    return config


def load_adapter(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, config) of an adapter directory; weights come from safetensors only (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(directory)
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise AdapterError(f"{directory!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    try:
        return load_file(path), config
    except SafetensorError as err:  # a truncated or overwritten file
        raise AdapterError(f"{path}: not a readable safetensors file ({err})") from None
