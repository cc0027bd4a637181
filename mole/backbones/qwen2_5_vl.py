"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a ViT with window attention (full attention in a
few blocks), a 2x2 patch merger as the projector, a Qwen2 LLM with M-RoPE; see :mod:`mole.backbones.qwen_vl`."""

from __future__ import annotations

from mole.backbones.qwen_vl import QwenVLBackbone

QWEN2_5_VL = QwenVLBackbone(
    family="qwen2_5_vl",
    model_class_name="Qwen2_5_VLForConditionalGeneration",
    projector_prefixes=("visual.merger",),
    vision_tower_prefix="visual.blocks",
    extra_image_inputs=("image_sizes",),
    fast_images=False,
    default_processor_backend="pil",
)
