"""Qwen2.5-VL and Qwen3-VL through their stock classes: dynamic resolution, M-RoPE and (Qwen3-VL) DeepStack.

What sets these families apart, and how mole keeps each exact:

- **Dynamic resolution.** The image processor resizes an image to a multiple of ``patch x merge``
  pixels between ``min_pixels`` and ``max_pixels`` (aspect ratio kept) and returns its patches
  flattened, ``pixel_values`` (patches, channels x temporal_patch x patch x patch), and its grid
  ``image_grid_thw`` (3,). An image takes ``t * h * w / merge^2`` image tokens, so images of
  different sizes take different numbers of tokens. A batch concatenates its images' patches and
  stacks their grids.
- **M-RoPE.** Position ids are (3, batch, seq): text tokens count on all three rows, an image's tokens
  take their (t, h, w) grid coordinates. The model computes them itself (``get_rope_index``) only
  when it is given ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw``; fed ``inputs_embeds``
  alone it silently numbers every token 0, 1, 2, ... (or, after a generation, reuses that
  generation's offsets). So :func:`forward` never hands the model embeddings: it runs the vision
  tower itself and passes the result as ``mm_encoder_outputs`` beside the token ids, and the stock
  forward embeds, scatters, adds DeepStack features and numbers positions exactly as it would from
  its own processor's inputs.
- **DeepStack (Qwen3-VL).** Features of several ViT blocks, each through its own merger, are added
  into the hidden states of the first LLM layers at the image positions; they travel in the same
  encoder output.

A text-only batch still runs the whole vision path (blocks, merger, DeepStack mergers) on a minimal
dummy image on every rank, as ZeRO-3 requires; its features join the graph multiplied by zero and cut
to no rows, so the stock forward scatters nothing and numbers the text 0, 1, 2, ... as it would.

The combined processor classes (``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) need torchvision for
their video processor; mole reads the tokenizer and the PIL image processor
(``Qwen2VLImageProcessorPil``) directly and expands ``<|image_pad|>`` as the processor would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from mole.data.images import mean_colour, pad_to_square

QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_TYPE = 1
"""``mm_token_type_ids`` value of an image token (text 0, video 2)."""


@dataclass(frozen=True)
class QwenProcessor:
    """What the data path reads of a processor: ``tokenizer``, ``image_processor``, ``image_token``."""

    tokenizer: object
    image_processor: object
    image_token: str = IMAGE_TOKEN


def load_processor(path: str, local_files_only: bool = True, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> QwenProcessor:
    """The family's tokenizer and PIL image processor from a model directory; ``min_pixels`` /
    ``max_pixels`` replace the directory's (the family's defaults) where given."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=local_files_only, backend="pil")
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
    image_processor.size = size
    return QwenProcessor(tokenizer, image_processor)


class QwenImages:
    """One decoded RGB image -> its model inputs ``{"pixel_values": (patches, patch_dim), "image_grid_thw": (3,)}``
    by the family's image processor, padded to a square with its mean colour first for ``aspect: pad``."""

    def __init__(self, image_processor, aspect: str):
        self.image_processor, self.aspect = image_processor, aspect
        self.fill = mean_colour(image_processor)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if self.aspect == "pad":
            image = pad_to_square(image, self.fill)
        out = self.image_processor(images=image, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"][0]}


def image_tokens(image_processor, image_grid_thw: torch.Tensor) -> int:
    """Image tokens of one image of grid (t, h, w): one per ``merge x merge`` patches, as the processor expands them."""
    return int(image_grid_thw.prod()) // image_processor.merge_size**2


def batch_images(images: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """A batch's image inputs, in image order: patches concatenated (patches, patch_dim), grids stacked (images, 3)."""
    if not images:
        return None
    return {"pixel_values": torch.cat([image["pixel_values"] for image in images]),
            "image_grid_thw": torch.stack([image["image_grid_thw"] for image in images])}


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """What the processor returns beside ``input_ids``: 1 at image tokens, 0 at text (batch, seq)."""
    return (input_ids == image_token_id).int() * IMAGE_TYPE


def dummy_image(config, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The smallest image the vision path takes: one ``merge x merge`` patch grid (one image token) of zeros."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {"pixel_values": torch.zeros(merge * merge, patch_dim, dtype=dtype, device=device),
            "image_grid_thw": torch.tensor([[1, merge, merge]], device=device)}


def forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
            pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None):
    """The stock model's forward on a batch as its processor would feed it, the vision path run on
    every call (a text-only batch's on :func:`dummy_image`, joined times zero).

    ``pixel_values`` (patches, patch_dim) and ``image_grid_thw`` (images, 3) hold the batch's images
    in image-token order, or are ``None`` for a text-only batch. Returns the stock output (``loss``
    when ``labels`` are given, ``logits``).
    """
    text_only = pixel_values is None
    if text_only:
        dummy = dummy_image(model.config, model.dtype, input_ids.device)
        pixel_values, grid = dummy["pixel_values"], dummy["image_grid_thw"]
    else:
        grid = image_grid_thw
    encoded = model.model.get_image_features(pixel_values, grid, return_dict=True)
    if text_only:
        encoded.pooler_output = (_none_of(encoded.pooler_output),)
        if getattr(encoded, "deepstack_features", None) is not None:
            encoded.deepstack_features = [(_none_of(level),) for level in encoded.deepstack_features]
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        mm_token_type_ids=mm_token_type_ids(input_ids, model.config.image_token_id),
        image_grid_thw=None if text_only else image_grid_thw,
        mm_encoder_outputs={"image": encoded},
        use_cache=False,
    )


def _none_of(features: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-image features as no rows at all, still computed from them: (0, hidden), zero gradient back."""
    return (torch.cat(features) * 0.0)[:0]
