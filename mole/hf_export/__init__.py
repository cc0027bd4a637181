"""``--format hf``: a trained adapter as a model directory plain transformers loads, experts and routers included.

The directory holds the base weights and the adapter in one safetensors set, the processor, the
generation config, and ``modeling_mole.py`` (this package's file, written for the adapter's family),
which defines the config and model classes with torch and transformers alone. ``config.json`` gets
the model type ``mole_<family>`` and names both classes in ``auto_map``, so

    AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True)

returns the MoLE model without mole installed, and without ``trust_remote_code`` transformers refuses
to load it (it does not know the model type) rather than return the base without its experts.

Every backbone family mole trains exports (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL,
Qwen3-VL): one :data:`FAMILIES` entry each, its stock config and model classes, which
``modeling_mole.py`` subclasses. The file is the same for every family: each keeps its LLM's decoder
layers at ``model.language_model.layers`` with LLaMA-style MLPs, and the stock forward and ``generate``
(image scatter, AnyRes, M-RoPE, DeepStack) are inherited unchanged. The processor saved beside is
the one mole's inference loads (:func:`mole.export.save_processor`): for LLaVA-OneVision and Qwen-VL,
whose combined processors need torchvision, the PIL image processor and the tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mole.choices import DType, Family
from mole.spec import AdapterSpec

MODELING_FILE = Path(__file__).with_name("modeling_mole.py")
CONFIG_CLASS, MODEL_CLASS = "MoleConfig", "MoleForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": f"modeling_mole.{CONFIG_CLASS}",
    "AutoModelForImageTextToText": f"modeling_mole.{MODEL_CLASS}",
}


@dataclass(frozen=True)
class HfFamily:
    """The transformers classes of a backbone family that the exported classes subclass."""

    config_class: str
    model_class: str


FAMILIES: dict[Family, HfFamily] = {
    "llava": HfFamily("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": HfFamily("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
    "llava_onevision": HfFamily("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
    "qwen2_5_vl": HfFamily("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": HfFamily("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
}

_FAMILY_IMPORTS = re.compile(
    r"^from transformers import \w+ as FamilyConfig\nfrom transformers import \w+ as FamilyForConditionalGeneration\n",
    re.MULTILINE,
)
_PEFT_NAME = re.compile(r"(?P<module>.*)\.(?:base_layer\.(?P<base>weight|bias)|(?P<lora>lora_[AB])\.default\.weight)")


def modeling_source(family: Family) -> str:
    """``modeling_mole.py`` with its two family imports naming ``family``'s transformers classes."""
    classes = FAMILIES[family]
    source = MODELING_FILE.read_text()
    imports = (f"from transformers import {classes.config_class} as FamilyConfig\n"
               f"from transformers import {classes.model_class} as FamilyForConditionalGeneration\n")
    rendered, count = _FAMILY_IMPORTS.subn(imports, source)
    assert count == 1, f"{MODELING_FILE} lost its family imports"
    return rendered


def exported_name(name: str) -> str:
    """A mole model's parameter name as the exported model's: peft's attention LoRA
    (``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight``) becomes ``q_proj.weight``,
    ``q_proj.lora_A``; every other name is unchanged."""
    match = _PEFT_NAME.fullmatch(name)
    if match is None:
        return name
    return f"{match['module']}.{match['base'] or match['lora']}"


def check_exportable(spec: AdapterSpec) -> None:
    """An :class:`~mole.export.ExportError` for an adapter ``modeling_mole.py`` cannot compute: a family
    without a :data:`FAMILIES` entry, or a routing mode the file does not implement."""
    from mole.export import ExportError
    from mole.hf_export.modeling_mole import ROUTINGS

    if spec.family not in FAMILIES:
        raise ExportError(f"--format hf does not support the {spec.family!r} family yet (it supports "
                          f"{', '.join(FAMILIES)}); use --format mole")
    if spec.routing == "domain":
        raise ExportError(f"--format hf cannot export routing 'domain': its experts are chosen by the caller's domain "
                          f"({', '.join(spec.domains)}), which a transformers model is not given; use --format mole")
    if spec.router_input != "token":
        raise ExportError(f"--format hf cannot export router_input {spec.router_input!r}: its modelling file routes each "
                          "token by its own hidden state; use --format mole")
    if spec.routing not in ROUTINGS:
        raise ExportError(f"--format hf cannot export routing {spec.routing!r}: its modelling file routes each token "
                          f"by its hidden state ({', '.join(ROUTINGS)}); use --format mole")


def export_hf(adapter_dir: str, out_dir: str, base_dir: str | None = None, allow_remote: bool = False,
              dtype: DType = "fp32") -> str:
    """Write the transformers model directory of an adapter (on ``base_dir``, else its recorded base)
    to ``out_dir``, its weights in ``dtype``; returns ``out_dir``. The adapter is checked as
    :func:`mole.load_model` checks it, and the exported model must take every tensor of the mole model
    by name (strict), so nothing is left at its initial value."""
    from mole.adapter import read_adapter_spec
    from mole.adapter_check import resolve_base
    from mole.export import save_processor
    from mole.inference import load_model

    spec = read_adapter_spec(adapter_dir)
    check_exportable(spec)
    named_by = "--base" if base_dir else f"base_model in {os.path.join(adapter_dir, 'mole_config.json')}"
    base_dir = resolve_base(base_dir or spec.base_model, named_by, allow_remote)
    model = load_model(base_dir, adapter_dir, dtype=dtype, allow_remote=allow_remote)

    os.makedirs(out_dir, exist_ok=True)
    modeling_path = os.path.join(out_dir, MODELING_FILE.name)
    with open(modeling_path, "w") as handle:
        handle.write(modeling_source(spec.family))
    classes = _import_classes(modeling_path)
    settings = {key: value for key, value in model.config.to_dict().items()
                if key not in ("model_type", "architectures", "auto_map", "transformers_version")}
    config = classes.MoleConfig(**settings, mole=spec.to_dict())
    config.architectures, config.auto_map = [MODEL_CLASS], dict(AUTO_MAP)
    with torch.device("meta"):
        exported = classes.MoleForConditionalGeneration(config)
    state = {exported_name(name): tensor for name, tensor in model.state_dict().items()}
    exported.load_state_dict(state, strict=True, assign=True)
    exported.generation_config = model.generation_config  # the base's
    exported.save_pretrained(out_dir)
    save_processor(base_dir, spec, out_dir)
    return out_dir


def _import_classes(path: str):
    """The module at ``path`` (a written ``modeling_mole.py``), imported under a name of its own."""
    name = f"_mole_export_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclass fields resolve their module through sys.modules
    try:
        module_spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module
