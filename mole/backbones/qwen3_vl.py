"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): as Qwen2.5-VL (without window attention, with learned
position embeddings in the ViT) plus DeepStack: the features of a few ViT blocks, each through its own
merger, are added into the first LLM layers at the image positions. The DeepStack mergers are part of
the projection and train with the projector; see :mod:`mole.backbones.qwen_vl`."""

from __future__ import annotations

from mole.backbones.qwen_vl import QwenVLBackbone

QWEN3_VL = QwenVLBackbone(
    family="qwen3_vl",
    model_class_name="Qwen3VLForConditionalGeneration",
    projector_prefixes=("visual.merger", "visual.deepstack_merger_list"),
    vision_tower_prefix="visual.blocks",
    extra_image_inputs=("image_sizes",),
    fast_images=False,
    default_processor_backend="pil",
)
