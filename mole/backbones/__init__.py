"""Backbone families mole adapts through their stock Hugging Face classes, one description each
(:class:`~mole.backbones.base.Backbone`); :func:`backbone_for` picks one from a base's config."""

from __future__ import annotations

from mole.backbones.base import Backbone, UnsupportedBackbone, backbone_for
from mole.backbones.llava import LLAVA
from mole.backbones.llava_next import LLAVA_NEXT
from mole.backbones.llava_onevision import LLAVA_ONEVISION

FAMILIES: dict[str, Backbone] = {backbone.family: backbone for backbone in (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION)}
"""Every described family, by ``model_type``."""

__all__ = ["FAMILIES", "Backbone", "UnsupportedBackbone", "backbone_for"]
