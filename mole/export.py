"""Export a trained adapter: as a standard peft LoRA (K=1), merged into the base (K=1), or as a
validated, self-contained mole adapter, also consolidated from a DeepSpeed ZeRO checkpoint. The
``hf`` format (any K, a model directory transformers loads) is :mod:`mole.hf_export`.

* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` with peft's key names, for
  ``PeftModel.from_pretrained(base, dir)``. Plain LoRA on attention and MLP projections, and the
  trained projector as a ``modules_to_save`` module. Written without loading the base model.
* ``merged``: the LoRA deltas merged into the base weights (by peft's ``merge_and_unload``), the
  trained projector in place; a normal Hugging Face model directory with the processor.
* ``mole``: ``adapter.safetensors`` + ``mole_config.json``, what :func:`mole.load_model` reads.

K>1 adapters have a router per layer choosing among expert LoRAs per token; peft has no such
layer, so only ``mole`` and ``hf`` export them.

DeepSpeed checkpoint files are ``torch.load``-ed by DeepSpeed with ``weights_only=False``, i.e.
unpickled: consolidate only checkpoints you trust (your own training runs' local files).
Everything else here reads safetensors.
"""

from __future__ import annotations

import os
import pickle
import re

import torch

from mole.adapter import ADAPTER_CONFIG, AdapterError, load_adapter, read_adapter_spec, read_spec_file, save_adapter
from mole.adapter_check import ATTN_KEY as _ATTN_KEY
from mole.adapter_check import EXPERT_KEY as _EXPERT_KEY
from mole.adapter_check import check_state, resolve_base
from mole.backbones import FAMILIES, backbone_for
from mole.spec import AdapterSpec
from mole.train.checkpoint import TAG, find_resumable

PEFT_PREFIX = "base_model.model."


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to do instead."""


# ------------------------------------------------------------------------------------ checks


def require_plain_lora(spec: AdapterSpec, fmt: str) -> None:
    """Refuse an adapter with several experts: peft and merged weights hold one LoRA (a domain-routed
    adapter of one domain is one)."""
    if spec.num_experts != 1 and spec.routing == "domain":
        raise ExportError(f"--format {fmt} cannot carry routing 'domain': its {spec.num_experts} experts serve the domains "
                          f"{', '.join(spec.domains)}, chosen by the caller, and {fmt} holds one LoRA; use --format mole")
    if spec.num_experts != 1:
        raise ExportError(
            f"--format {fmt} needs a plain LoRA adapter (K=1), but this one has K={spec.num_experts} experts with "
            f"routers, which have no {fmt} form; use --format hf (transformers with trust_remote_code) or --format mole "
            f"(read by mole.load_model)"
        )


# -------------------------------------------------------------------------------------- peft


def peft_state_and_config(state: dict[str, torch.Tensor], spec: AdapterSpec):
    """A K=1 mole adapter as a peft ``LoraConfig`` and a state dict with peft's saved key names."""
    from peft import LoraConfig

    require_plain_lora(spec, "peft")
    backbone = FAMILIES[spec.family]
    peft_state = {}
    for name, tensor in state.items():
        if match := _EXPERT_KEY.fullmatch(name):  # (1, r, in) / (1, out, r) -> (r, in) / (out, r)
            peft_state[f"{PEFT_PREFIX}{match['layer']}.{match['proj']}.lora_{match['ab']}.weight"] = tensor[0].contiguous()
        elif match := _ATTN_KEY.fullmatch(name):
            peft_state[f"{PEFT_PREFIX}{match['module']}.lora_{match['ab']}.weight"] = tensor.contiguous()
        elif any(f"{prefix}." in name for prefix in backbone.projector_prefixes):  # a projector module's tensor:
            # peft saves modules_to_save under the module's own name (a bare parameter has no peft form)
            peft_state[PEFT_PREFIX + name] = tensor.contiguous()
        else:
            raise AdapterError(f"tensor {name} has no peft equivalent")
    attn = "|".join(re.escape(t) for t in spec.attn_targets)
    mlp = "|".join(re.escape(t) for t in spec.mlp_targets)
    branches = [f"self_attn\\.({attn})"] if attn else []
    branches += [f"mlp\\.({mlp})"] if mlp else []
    lora_config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=rf".*language_model\.layers\.\d+\.({'|'.join(branches)})",
        modules_to_save=_projector_modules(state, backbone.projector_prefixes) or None,
        bias="none",
        base_model_name_or_path=spec.base_model,
        inference_mode=True,
    )
    return lora_config, peft_state


def _projector_modules(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> list[str]:
    """The projector modules whose tensors ``state`` holds, as peft's ``modules_to_save`` names them:
    each prefix, or each member of a prefix that is a module list (peft wraps modules, not lists)."""
    modules: list[str] = []
    for name in state:
        for prefix in prefixes:
            if f"{prefix}." in name:
                member = name.split(f"{prefix}.", 1)[1].split(".", 1)[0]
                module = f"{prefix}.{member}" if member.isdigit() else prefix
                if module not in modules:
                    modules.append(module)
    return modules


def export_peft(adapter_dir: str, out_dir: str) -> list[str]:
    """Write a standard peft adapter directory from a K=1 mole adapter; returns the files written."""
    from safetensors.torch import save_file

    state, spec = load_adapter(adapter_dir)  # checked against its spec (mole.adapter_check)
    refuse_image_settings_peft_drops(spec, adapter_dir)
    lora_config, peft_state = peft_state_and_config(state, spec)
    os.makedirs(out_dir, exist_ok=True)
    lora_config.save_pretrained(out_dir)
    save_file(peft_state, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return [os.path.join(out_dir, "adapter_config.json"), os.path.join(out_dir, "adapter_model.safetensors")]


def refuse_image_settings_peft_drops(spec: AdapterSpec, adapter_dir: str) -> None:
    """A peft adapter carries no image settings: whoever loads it prepares images with the base directory's
    processor (and, for AnyRes, tiles with its config). Refuse when the adapter recorded other settings
    than its base directory holds (a run's own ``data.image_grid_pinpoints``, ``data.max_pixels``...):
    served from peft it would see other pixels than it was trained on. Merged and hf exports carry them.
    A base that is not a local directory cannot be compared, and nothing is downloaded to do so."""
    if spec.base_model is None or not os.path.isfile(os.path.join(spec.base_model, "config.json")):
        return
    from mole.inference import image_preparation_difference

    backbone = FAMILIES[spec.family]
    difference = image_preparation_difference(spec.image, backbone, backbone.load_processor(spec.base_model))
    if difference is not None:
        name, recorded, held = difference
        raise ExportError(f"--format peft cannot carry the image settings {adapter_dir} was trained with: {name} "
                          f"{recorded!r}, but its base {spec.base_model} prepares images with {held!r}; use "
                          f"--format merged or hf, which save them, or --format mole")


def export_merged(adapter_dir: str, out_dir: str, base_dir: str | None = None, allow_remote: bool = False) -> str:
    """Merge a K=1 adapter into its base and save a Hugging Face LLaVA directory with the processor.
    The base is ``base_dir``, else the adapter's ``base_model``: a local directory unless ``allow_remote``."""
    from peft import get_peft_model, set_peft_model_state_dict

    from mole.inference import check_base_fits

    spec = read_adapter_spec(adapter_dir)
    require_plain_lora(spec, "merged")
    named_by = "--base" if base_dir else f"base_model in {os.path.join(adapter_dir, 'mole_config.json')}"
    base_dir = resolve_base(base_dir or spec.base_model, named_by, allow_remote)
    base_config = check_base_fits(spec, base_dir, adapter_dir)
    state, spec = load_adapter(adapter_dir, base_config)
    lora_config, peft_state = peft_state_and_config(state, spec)
    backbone = backbone_for(base_config)
    base = backbone.model_class.from_pretrained(base_dir, local_files_only=True)
    backbone.configure(base.config, spec.image)  # the saved config.json tiles as training did
    model = get_peft_model(base, lora_config)
    loaded = set_peft_model_state_dict(model, peft_state)
    if loaded.unexpected_keys:
        raise AdapterError(f"peft did not place tensors {loaded.unexpected_keys[:3]}")
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    save_processor(base_dir, spec, out_dir)
    return out_dir


def save_processor(base_dir: str, spec: AdapterSpec, out_dir: str) -> None:
    """The base's processor as its family loads it (:meth:`~mole.backbones.base.Backbone.load_processor`)
    into ``out_dir``, preparing images as the adapter's training did: its recorded backend and pixel or
    tile limits (:class:`~mole.spec.ImageSpec`), and for LLaVA-1.5 a padding image processor for
    ``data.image_aspect: pad``."""
    backbone = FAMILIES[spec.family]
    processor = backbone.load_processor(base_dir, image=spec.image)
    if spec.image.aspect == "pad" and backbone.family == "llava":
        processor.image_processor = padding_image_processor(processor.image_processor)
    processor.save_pretrained(out_dir)


def padding_image_processor(image_processor):
    """``image_processor`` as one that first pads an image to a square with its mean colour, as
    training's ``data.image_aspect: pad`` (LLaVA-1.5's own recipe) did: Hugging Face's
    ``LlavaImageProcessor`` with ``do_pad``, on the same resize, crop and normalisation settings. A
    CLIP processor alone centre-crops, and shows the model pixels it was not trained on."""
    from transformers import LlavaImageProcessorPil

    if getattr(image_processor, "do_pad", False):
        return image_processor
    settings = {key: value for key, value in image_processor.to_dict().items()
                if not key.startswith("_") and key not in ("image_processor_type", "processor_class")}
    return LlavaImageProcessorPil(**settings, do_pad=True)


# -------------------------------------------------------------------------------------- mole


def export_mole(source: str, out_dir: str, config_path: str | None = None) -> str:
    """A validated mole adapter in ``out_dir`` from an adapter directory or a DeepSpeed checkpoint.

    ``source`` may be an adapter directory, a checkpoint tag directory (``checkpoints/step_<N>``),
    a checkpoints root holding ``latest``, or a run's ``output_dir``. For a checkpoint the adapter
    spec comes from ``config_path`` (a ``mole_config.json`` or a run ``config.yaml``), else from the
    ``mole_config.json`` saved in the checkpoint, else (checkpoints saved before it was) from the run's
    ``config.yaml`` found above the checkpoint.
    """
    if os.path.isfile(os.path.join(source, "mole_config.json")) and os.path.isfile(os.path.join(source, "adapter.safetensors")):
        state, spec = load_adapter(source)  # checked against its spec (mole.adapter_check)
    else:
        root, tag = find_checkpoint(source)
        state = consolidate_checkpoint(root, tag)
        saved = os.path.join(root, tag, ADAPTER_CONFIG)  # the spec the checkpoint's tensors were trained under
        spec = checkpoint_adapter_spec(config_path or (saved if os.path.isfile(saved) else _find_run_config(root)))
        check_state(state, spec, f"checkpoint {root}/{tag}")  # as an adapter file is checked without its base
    save_adapter(out_dir, state, spec)
    return out_dir


def find_checkpoint(source: str) -> tuple[str, str]:
    """(checkpoints root, tag) for a tag directory, a checkpoints root, or a run's ``output_dir``.

    Under a root of the trainer's ``step_<N>`` checkpoints, the one a resume of that run would take
    (:func:`mole.train.checkpoint.find_resumable`: the newest with a valid commit marker and every file
    of its recorded size), whatever ``latest`` says; ``latest`` names the tag only for a DeepSpeed
    checkpoint root of other tags.
    """
    source = os.path.abspath(source.rstrip("/"))
    if not os.path.isdir(source):
        raise ExportError(f"{source!r} does not exist or is not a directory")
    if any(name.endswith("model_states.pt") for name in _listdir(source)):
        return os.path.dirname(source), os.path.basename(source)
    for root in (source, os.path.join(source, "checkpoints")):
        steps = sorted(name for name in _listdir(root) if TAG.fullmatch(name))
        if steps:
            found = find_resumable(root)
            if found is None:
                raise ExportError(f"{root!r} holds no complete checkpoint ({', '.join(steps[:3])}: no valid commit "
                                  f"marker, or files missing or cut short); a resume would start from scratch")
            return root, found.tag
        latest = _latest_tag(root)
        if latest is not None:
            return root, latest
    raise ExportError(
        f"{source!r} is neither a mole adapter directory (adapter.safetensors + mole_config.json) nor a DeepSpeed "
        f"checkpoint (a step_<N> directory with *model_states.pt, or a directory with a 'latest' file)"
    )


def _latest_tag(root: str) -> str | None:
    """The tag DeepSpeed's ``latest`` in ``root`` names, if it is a directory there."""
    try:
        with open(os.path.join(root, "latest")) as handle:
            tag = handle.read(4096).strip()
    except (OSError, ValueError):
        return None
    return tag if tag and os.path.basename(tag) == tag and tag not in (".", "..") and os.path.isdir(
        os.path.join(root, tag)) else None


def consolidate_checkpoint(root: str, tag: str) -> dict[str, torch.Tensor]:
    """The trainable weights of a ZeRO checkpoint, in fp32, keyed by LLaVA parameter names.

    Uses DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (which unpickles DeepSpeed's files:
    trusted local checkpoints only). The trainer's engine wraps the LLaVA model as
    ``TrainingModel.llava``, so checkpoint keys carry a ``llava.`` prefix, removed here.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, exclude_frozen_parameters=True)
    except (ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:  # files missing, torn or zeroed
        raise ExportError(f"checkpoint {root}/{tag} cannot be consolidated: {err}") from None
    stray = [name for name in state if not name.startswith("llava.")]
    if stray:
        raise ExportError(f"checkpoint {root}/{tag} has keys outside the trainer's 'llava.' module: {stray[:3]}")
    return {name.removeprefix("llava."): tensor.detach().clone().contiguous() for name, tensor in state.items()}


def checkpoint_adapter_spec(path: str) -> AdapterSpec:
    """The adapter spec for a checkpoint: a ``mole_config.json``, or built from a run ``config.yaml``."""
    if path.endswith(".json"):
        return read_spec_file(path)
    from transformers import AutoConfig

    from mole.config import load_config

    from mole.model import run_spec

    cfg = load_config(path, [])
    return run_spec(cfg, AutoConfig.from_pretrained(cfg.model.name_or_path))[0]


def _find_run_config(checkpoints_root: str) -> str:
    """``output_dir/config.yaml`` for ``output_dir/checkpoints`` (or the root itself)."""
    for directory in (os.path.dirname(checkpoints_root), checkpoints_root):
        if os.path.isfile(os.path.join(directory, "config.yaml")):
            return os.path.join(directory, "config.yaml")
    raise ExportError(f"no config.yaml found next to {checkpoints_root!r}; pass the run's config with --config")


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []
