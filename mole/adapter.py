"""The saved adapter: every trainable tensor (experts, routers, attention LoRA, projector) + its spec.

``output_dir/adapter/`` holds ``adapter.safetensors`` and ``mole_config.json`` (the
:class:`~mole.spec.AdapterSpec`); it is the one format that loading, evaluation and export read.
Keys are the LLaVA model's own parameter names.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from torch import nn

from mole.spec import AdapterSpec, SpecError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "mole_config.json"


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


def check_finite(state: dict[str, torch.Tensor], what: str = "the adapter") -> None:
    """A ``FloatingPointError`` naming the tensors of ``state`` that hold a NaN or an infinity."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise FloatingPointError(f"{what} has non-finite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''}): not saved")


def save_adapter(directory: str, state: dict[str, torch.Tensor], spec: AdapterSpec) -> None:
    """Write weights then spec, each via a temporary file and rename, so a crash leaves no half file.
    Weights holding a NaN or an infinity are refused (:func:`check_finite`), never written."""
    check_finite(state)
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    # One metadata key: safetensors writes them in hash order, so two would make the same weights a
    # different file on every save. The format version is the spec's (mole_config.json).
    save_file(state, weights + ".tmp", metadata={"format": "mole"})
    os.replace(weights + ".tmp", weights)
    with open(os.path.join(directory, ADAPTER_CONFIG + ".tmp"), "w") as handle:
        handle.write(spec.to_json())
    os.replace(os.path.join(directory, ADAPTER_CONFIG + ".tmp"), os.path.join(directory, ADAPTER_CONFIG))


class AdapterError(ValueError):
    """An adapter directory that cannot be used as asked: missing files, a spec that is not valid or of
    a format version we do not read, or weights and spec that do not fit each other or the base model."""


def read_adapter_spec(directory: str) -> AdapterSpec:
    """The spec (``mole_config.json``) of an adapter directory, in any format version this mole reads."""
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
    return read_spec_file(path)


def read_spec_file(path: str) -> AdapterSpec:
    """The spec a ``mole_config.json`` file holds; an :class:`AdapterError` naming the file and field if none."""
    try:
        if os.path.getsize(path) > MAX_SPEC_BYTES:
            raise AdapterError(f"{path}: {os.path.getsize(path)} bytes, more than a mole_config.json holds ({MAX_SPEC_BYTES})")
        with open(path, "rb") as handle:
            return AdapterSpec.from_json(handle.read())
    except SpecError as err:
        raise AdapterError(f"{path}: {err}") from None
    except OSError as err:
        raise AdapterError(f"{path}: cannot be read ({err})") from None


MAX_SPEC_BYTES = 1 << 20


def load_adapter(directory: str, base_config=None) -> tuple[dict[str, torch.Tensor], AdapterSpec]:
    """(weights, spec) of an adapter directory, checked as untrusted input (:mod:`mole.adapter_check`)
    before a tensor is read: float tensors only, exactly those the spec describes (with ``base_config``,
    the Hugging Face config of the base: exactly those surgery creates on it, with their shapes), and
    then no NaN or infinity. Weights come from safetensors only (no pickle)."""
    from mole.adapter_check import checked_weights

    spec = read_adapter_spec(directory)
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise AdapterError(f"{directory!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    return checked_weights(path, spec, base_config), spec
