"""Backbone families mole adapts through their stock Hugging Face classes, one description each
(:class:`~mole.backbones.base.Backbone`); :func:`backbone_for` picks one from a base's config."""

from __future__ import annotations

from mole.backbones.base import Backbone, UnsupportedBackbone, backbone_for
from mole.backbones.llava import LLAVA
from mole.backbones.llava_next import LLAVA_NEXT
from mole.backbones.llava_onevision import LLAVA_ONEVISION
from mole.backbones.qwen2_5_vl import QWEN2_5_VL
from mole.backbones.qwen3_vl import QWEN3_VL

FAMILIES: dict[str, Backbone] = {backbone.family: backbone
                                 for backbone in (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_5_VL, QWEN3_VL)}
"""Every described family, by ``model_type``."""

__all__ = ["FAMILIES", "Backbone", "UnsupportedBackbone", "backbone_for"]
