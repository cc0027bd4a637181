"""Examples -> one padded batch: dynamic padding to the longest sample, images stacked, domain ids kept;
a batch -> the model's inputs on a device."""

from __future__ import annotations

import torch

from mole.data.conversation import IGNORE_INDEX
from mole.data.sample import Example

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "domain")
PACKED_INPUTS = ("position_ids", "sample_ids", "num_samples")  # only a packed batch has them (mole.data.packing)


def collate(examples: list[Example], pad_token_id: int) -> dict:
    """Right-pad to the batch's longest sample.

    ``pixel_values`` holds only the images that exist, in sample order (the model scatters them into
    the image-token positions), or is ``None`` for a text-only batch: (images, 3, H, W), or for a
    tiling family every image's tiles concatenated, (tiles, 3, H, W), with ``image_sizes`` (images, 2)
    saying where each image's tiles end (``None`` for a family without it), or for a dynamic-resolution
    family (Qwen-VL) every image's patches concatenated, (patches, patch_dim), with ``image_sizes``
    (images, 3) holding each image's patch grid (t, h, w). ``num_images`` counts them. ``domain`` carries each
    sample's domain index for per-domain metrics, routing analysis and routing ``domain``; ``keys`` the samples' tar keys;
    ``tokens`` how many real (not padding) tokens the batch holds.
    """
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        **image_inputs(examples),
        "domain": torch.tensor([example.domain for example in examples], dtype=torch.long),
        "keys": [example.key for example in examples],
        "tokens": sum(len(example.input_ids) for example in examples),
    }


def image_inputs(examples: list[Example]) -> dict:
    """``pixel_values``, ``image_sizes`` and ``num_images`` of the examples' images, in example order
    (see :func:`collate`)."""
    images = [example for example in examples if example.pixel_values is not None]
    tiles = [example.pixel_values.unsqueeze(0) if example.pixel_values.dim() == 3 else example.pixel_values
             for example in images]  # one (3, H, W) image is one tile; tiles and patches are concatenated as they are
    sizes = [example.image_size for example in images if example.image_size is not None]
    return {
        "pixel_values": torch.cat(tiles) if tiles else None,
        "image_sizes": torch.tensor(sizes, dtype=torch.long) if sizes else None,
        "num_images": len(images),
    }


def to_device(batch: dict, device: torch.device, pixel_dtype: torch.dtype | None = None) -> dict:
    """The model's inputs of a collated batch (``MODEL_INPUTS``, the image inputs possibly ``None``, and
    a packed batch's ``PACKED_INPUTS``) on ``device``, the images cast to ``pixel_dtype`` if given.
    Non-blocking: from pinned memory the copies overlap with compute, and kernels on the device's
    stream still see them complete."""
    names = [k for k in MODEL_INPUTS if k in batch] + [k for k in PACKED_INPUTS if batch.get(k) is not None]
    return {
        k: batch[k].to(device, dtype=pixel_dtype if k == "pixel_values" else None, non_blocking=True)
        if torch.is_tensor(batch[k]) else batch[k]
        for k in names
    }
