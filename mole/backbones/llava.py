"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP at a fixed resolution, one tile per image, a
fixed number of image tokens (576 at 336 px), a Vicuna (Llama) LLM."""

from __future__ import annotations

from mole.backbones.base import Backbone

LLAVA = Backbone(family="llava", model_class_name="LlavaForConditionalGeneration")
