"""Image bytes -> model pixels, defensively: broken files and decompression bombs are bad samples.

LLaVA-1.5 pads an image to a square with the processor's mean colour before resizing
(``image_aspect: pad``); a centre crop (``crop``) would cut off chart and document edges.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

from mole.data.errors import BadSample

MAX_PIXELS = 64_000_000  # far above any real photo or document page; beyond it we refuse to decode
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode and fully load an RGB image, or raise ``BadSample`` naming why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise BadSample("image_too_large", f"{image.width}x{image.height} exceeds {max_pixels} pixels")
            image.load()  # a truncated file fails here, not later in a worker's collate
            return image.convert("RGB")
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("image_too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise BadSample("broken_image", f"{type(err).__name__}: {err}") from None


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def image_to_pixels(image: Image.Image, image_processor, aspect: str) -> torch.Tensor:
    """(3, H, W) pixel values with the model's own image processor (resize, crop, normalise)."""
    if aspect == "pad":
        mean = image_processor.image_mean
        image = pad_to_square(image, tuple(int(round(channel * 255)) for channel in mean))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]
