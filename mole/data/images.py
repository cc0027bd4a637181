"""Image bytes -> model pixels, defensively: broken files and decompression bombs are bad samples.

LLaVA-1.5 pads an image to a square with the processor's mean colour before resizing
(``image_aspect: pad``); a centre crop (``crop``) would cut off chart and document edges.

Two ways to the same pixels, both driven by the model's own image processor (size, crop, resample
filter, rescale factor, mean and std all come from it):

- :class:`ProcessorPixels` calls the image processor itself (transformers' PIL backend without
  torchvision: resize with Pillow, then centre crop, rescale and normalise in NumPy float64/32);
- :class:`FastPixels` does the same steps on a uint8 tensor with torch's antialiased resize, which
  implements Pillow's filters in vectorised integer arithmetic, run in the order Pillow runs its two
  passes. It matches the processor to within ``FAST_MAX_LEVELS`` uint8 levels per pixel before
  normalisation (at most 1 level on all but ~1e-5 of pixels, measured on photos, documents and noise)
  and is several times faster; ``make_pixel_transform`` checks that on probe images before using it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mole.choices import ImageAspect, ImageBackend, options
from mole.data.errors import BadSample

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # far above any real photo or document page; beyond it we refuse to decode
MAX_ASPECT_RATIO = 100  # at 336 px a longer strip keeps under 4 px of content; beyond it we refuse to resize
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""Pillow formats decoded from data, whatever a member's extension says (real sets hold GIFs named ``.jpg``).
An allow-list, because Pillow's open tries every plugin it has, and some hand the bytes to another
program (EPS runs Ghostscript)."""
FAST_MAX_LEVELS = 2  # the fast path's largest difference from the processor, in uint8 levels
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}

PixelTransform = Callable[[Image.Image], torch.Tensor]  # RGB image -> (3, H, W) float32


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, *, square: bool = False) -> Image.Image:
    """Decode and fully load an RGB image, or raise ``BadSample`` naming why not.

    The caps are checked on the header, before any pixel is decoded, so a small file that declares a
    huge canvas (a decompression bomb) costs nothing. They bound the memory the image path will
    really use: with ``square`` (the image will be padded to a square) the square's pixels count, and
    an extreme aspect ratio is refused because resizing the short side to the model's input would
    blow the long one up (a 20000x1 strip cropped to 336 px is a 336x6.7M image).
    """
    try:
        with warnings.catch_warnings(), _pillow_pixel_cap_at_least(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            held = max(width, height) ** 2 if square else width * height
            if held > max_pixels:
                padded = f" (padded to a square, {max(width, height)}^2)" if square else ""
                raise BadSample("image_too_large", f"{width}x{height}{padded} exceeds {max_pixels} pixels")
            if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
                raise BadSample("image_too_large", f"{width}x{height}: aspect ratio over {MAX_ASPECT_RATIO}:1")
            image.load()  # a truncated file fails here, not later in a worker's collate
            return image if image.mode == "RGB" else image.convert("RGB")
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("image_too_large", str(err)) from None
    except Image.UnidentifiedImageError:
        raise BadSample("broken_image", f"not an image in one of the formats {', '.join(IMAGE_FORMATS)}") from None
    except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise BadSample("broken_image", f"{type(err).__name__}: {err}") from None


@contextlib.contextmanager
def _pillow_pixel_cap_at_least(max_pixels: int):
    """Pillow's own bomb check (on the same header, in ``open``) raised to ``max_pixels`` while we open
    an image, so that a configured ``data.max_image_pixels`` above Pillow's default (~89 MP) is the
    cap that applies; put back after."""
    previous = Image.MAX_IMAGE_PIXELS
    if previous is not None and max_pixels > previous:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's mean as a uint8 colour: what LLaVA-1.5 pads images with."""
    return tuple(int(round(channel * 255)) for channel in image_processor.image_mean)


class ProcessorPixels:
    """(3, H, W) pixel values from the model's own image processor: the reference."""

    def __init__(self, image_processor, aspect: str):
        self.image_processor, self.aspect = image_processor, aspect
        self.fill = mean_colour(image_processor)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.aspect == "pad":
            image = pad_to_square(image, self.fill)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class FastPixels:
    """The processor's resize -> centre crop -> rescale -> normalise, on uint8 tensors.

    Supports what CLIP-style processors (LLaVA-1.5's included) do: ``size`` as ``shortest_edge`` or
    ``height``/``width``, bicubic or bilinear resampling, an optional centre crop no larger than the
    resized image. ``FastPixels.supports`` says whether a processor is of that kind.
    """

    def __init__(self, image_processor, aspect: str):
        if not self.supports(image_processor):
            raise ValueError(f"FastPixels does not reproduce {type(image_processor).__name__} with this config")
        ip = image_processor
        self.aspect, self.fill = aspect, mean_colour(ip)
        self.size = dict(ip.size)
        self.crop = (ip.crop_size["height"], ip.crop_size["width"]) if ip.do_center_crop else None
        self.mode = _TORCH_MODES[Image.Resampling(ip.resample)]
        scale = torch.full((3,), float(ip.rescale_factor) if ip.do_rescale else 1.0)
        mean = torch.tensor(ip.image_mean if ip.do_normalize else [0.0] * 3, dtype=torch.float64)
        std = torch.tensor(ip.image_std if ip.do_normalize else [1.0] * 3, dtype=torch.float64)
        self.multiplier = (scale / std).float().view(3, 1, 1)  # (x * rescale - mean) / std = x * m + b
        self.offset = (-mean / std).float().view(3, 1, 1)

    @staticmethod
    def supports(ip) -> bool:
        size = dict(getattr(ip, "size", None) or {})
        crop = dict(getattr(ip, "crop_size", None) or {})
        sized = set(size) == {"shortest_edge"} or set(size) == {"height", "width"}
        sized = sized and all(isinstance(v, int) for v in size.values()) and getattr(ip, "do_resize", False)
        cropped = not getattr(ip, "do_center_crop", False) or (
            set(crop) == {"height", "width"}
            and max(crop.values()) <= size.get("shortest_edge", min(size.get("height", 0), size.get("width", 0)))
        )
        resample = getattr(ip, "resample", None)
        known = resample is not None and Image.Resampling(resample) in _TORCH_MODES
        plain = not getattr(ip, "do_pad", False) and len(getattr(ip, "image_mean", ())) == 3
        return bool(sized and cropped and known and plain)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.aspect == "pad":
            image = pad_to_square(image, self.fill)
        width, height = image.size
        out_h, out_w = self._resized_size(height, width)
        pixels = resize_like_pillow(image, out_w, out_h, self.mode)  # (3, out_h, out_w) uint8
        if self.crop is not None:
            crop_h, crop_w = self.crop
            top, left = (out_h - crop_h) // 2, (out_w - crop_w) // 2
            pixels = pixels[:, top : top + crop_h, left : left + crop_w]
        return pixels.contiguous().float().mul_(self.multiplier).add_(self.offset)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' ``get_resize_output_image_size`` (``default_to_square=False``)."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_like_pillow(image: Image.Image, width: int, height: int, mode: str) -> torch.Tensor:
    """``image.resize((width, height), BICUBIC|BILINEAR)`` as a (3, height, width) uint8 tensor, computed by
    torch's antialiased uint8 kernel (the same filter, in integer arithmetic like Pillow's).

    Both libraries resize in two 1-D passes and clip to uint8 in between, so on high-contrast content
    (text, charts) the pass order changes pixels by tens of levels. torch always runs the horizontal
    pass first; Pillow 13 runs the vertical pass first when the height shrinks more than twice as
    much as the width. Where Pillow would go vertical-first we transpose, so torch does too.
    """
    src_w, src_h = image.size
    if _pillow_goes_vertical_first(src_w, src_h, width, height):
        pixels = _interpolate(image.transpose(Image.Transpose.TRANSPOSE), height, width, mode)
        return pixels.transpose(1, 2)
    return _interpolate(image, width, height, mode)


def _interpolate(image: Image.Image, width: int, height: int, mode: str) -> torch.Tensor:
    array = np.asarray(image)  # (H, W, 3) uint8, a fresh read-only copy of the image's pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": torch only reads it
        hwc = torch.from_numpy(array)
    pixels = hwc.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last in memory: torch's fast path
    if pixels.shape[-2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode=mode, antialias=True)
    return pixels[0]


def _pillow_goes_vertical_first(src_w: int, src_h: int, width: int, height: int) -> bool:
    shrink_h, shrink_w = src_h - height, src_w - width
    return shrink_h > 0 and shrink_h > 2 * shrink_w and _pillow_orders_passes()


@functools.cache
def _pillow_orders_passes() -> bool:
    """Whether the installed Pillow picks its pass order (13.0 does; older ones always go horizontal first),
    asked of Pillow itself on a black-and-white noise image, where the order shows in the result."""
    rng = np.random.default_rng(0)
    probe = Image.fromarray((rng.integers(0, 2, (64, 16, 3)) * 255).astype(np.uint8))
    direct = probe.resize((8, 16), Image.Resampling.BICUBIC)
    vertical_first = probe.resize((16, 16), Image.Resampling.BICUBIC).resize((8, 16), Image.Resampling.BICUBIC)
    return direct.tobytes() == vertical_first.tobytes()


def probe_images() -> list[Image.Image]:
    """Images on which the fast path must match the processor: a photo-like landscape, a black-and-white
    'document' taller than 2:1 and wider than 336 px (where the resize pass order shows when cropping),
    and a small image to upscale."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    photo = np.stack([np.sin(x / (9 + c) + y / 13) * 90 + 128 + rng.normal(0, 12, x.shape) for c in range(3)], -1)
    document = (rng.integers(0, 2, (1000, 400, 1)) * 255).repeat(3, -1)
    small = rng.integers(0, 256, (23, 31, 3))
    return [Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)) for a in (photo, document, small)]


def max_level_difference(a: torch.Tensor, b: torch.Tensor, image_processor) -> float:
    """Largest difference between two normalised pixel tensors, in uint8 levels of the input image."""
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    scale = float(image_processor.rescale_factor)
    return float(((a - b).abs() * std / scale).max())


def make_pixel_transform(image_processor, aspect: ImageAspect, backend: ImageBackend = "fast") -> PixelTransform:
    """The image path a sample processor uses: ``fast`` when it reproduces ``processor`` on the probe
    images within ``FAST_MAX_LEVELS``, else (with a warning) the processor itself."""
    reference = ProcessorPixels(image_processor, aspect)
    if backend == "processor":
        return reference
    if backend != "fast":
        raise ValueError(f"unknown image backend {backend!r}; expected one of {options(ImageBackend)}")
    if not FastPixels.supports(image_processor):
        log.warning("image backend 'fast' cannot reproduce %s with this config; using the processor", type(image_processor).__name__)
        return reference
    fast = FastPixels(image_processor, aspect)
    worst = max(max_level_difference(fast(img), reference(img), image_processor) for img in probe_images())
    if worst > FAST_MAX_LEVELS + 0.01:
        log.warning("image backend 'fast' differs from the processor by %.1f levels (> %d); using the processor",
                    worst, FAST_MAX_LEVELS)
        return reference
    return fast
