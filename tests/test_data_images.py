"""The fast image path reproduces the model's image processor within its stated tolerance; the data bench runs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from benchmarks import data as data_bench
from mole.data.images import (
    FAST_MAX_LEVELS,
    FastPixels,
    ProcessorPixels,
    decode_image,
    make_pixel_transform,
    max_level_difference,
)
from tests.helpers import TINY_MODEL


@pytest.fixture(scope="module")
def llava15_image_processor():
    """llava-1.5-7b-hf's image processor: shortest edge 336, centre crop 336, bicubic, CLIP mean/std."""
    return data_bench.llava15_processor(str(TINY_MODEL)).image_processor


@pytest.fixture(scope="module")
def tiny_image_processor():
    return AutoProcessor.from_pretrained(TINY_MODEL).image_processor


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    """Photos both ways round, a black-and-white portrait 'document' (where the resize pass order
    shows), a wide chart, a tiny image to upscale and a square one."""
    rng = np.random.default_rng(0)
    coco = decode_image(data_bench.coco_like_jpeg(3))  # 640x480 photo-like JPEG
    document = Image.fromarray((rng.integers(0, 2, (1000, 500, 1)) * 255).astype(np.uint8).repeat(3, -1))  # portrait text-like
    chart = Image.new("RGB", (900, 300), "white")
    chart.paste((30, 60, 200), (100, 50, 160, 300))
    return {
        "coco_landscape": coco,
        "coco_portrait": coco.transpose(Image.Transpose.ROTATE_90),
        "document_portrait": document,
        "receipt": document.crop((0, 0, 400, 1000)),  # taller than 2:1: Pillow shrinks it vertical pass first
        "wide_chart": chart,
        "tiny_upscaled": Image.fromarray(rng.integers(0, 256, (31, 23, 3), dtype=np.uint8)),
        "square": coco.crop((0, 0, 480, 480)),
    }


@pytest.mark.parametrize("aspect", ["pad", "crop"])
@pytest.mark.parametrize("which", ["llava15", "tiny"])
def test_fast_pixels_match_the_image_processor_within_two_levels(llava15_image_processor, tiny_image_processor, images,
                                                                 aspect, which):
    """Tolerance: every normalised pixel within 2 uint8 levels of the processor's, i.e. |diff| <= 2/(255 std_c)
    (0.030 for CLIP's std); more than 1 level on at most 1 in 1,000 values."""
    image_processor = llava15_image_processor if which == "llava15" else tiny_image_processor
    fast, reference = FastPixels(image_processor, aspect), ProcessorPixels(image_processor, aspect)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    for name, image in images.items():
        a, b = fast(image), reference(image)
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        levels = max_level_difference(a, b, image_processor)
        assert levels <= FAST_MAX_LEVELS + 1e-3, f"{name} ({aspect}): {levels:.3f} levels from the processor"
        assert float((a - b).abs().max()) <= 2 / (255 * min(image_processor.image_std)) + 1e-5
        over_one = float(((a - b).abs() * std * 255 > 1.01).float().mean())
        assert over_one <= 1e-3, f"{name} ({aspect}): {over_one:.2e} of values differ by more than one level"


def test_resize_pass_order_matters_on_tall_documents(llava15_image_processor, images, monkeypatch):
    """Why FastPixels follows Pillow's pass order: on black-and-white text, the other order is far off."""
    receipt = images["receipt"]  # 400x1000, crop mode: 336x840, the height shrinks > 2x the width
    reference = ProcessorPixels(llava15_image_processor, "crop")(receipt)
    fast = FastPixels(llava15_image_processor, "crop")
    assert max_level_difference(fast(receipt), reference, llava15_image_processor) <= FAST_MAX_LEVELS + 1e-3
    monkeypatch.setattr("mole.data.images._pillow_goes_vertical_first", lambda *size: False)
    assert max_level_difference(fast(receipt), reference, llava15_image_processor) > 10, "the test image no longer shows the order"


def test_fast_path_is_chosen_for_clip_processors_and_the_processor_on_request(llava15_image_processor, tiny_image_processor):
    for image_processor in (llava15_image_processor, tiny_image_processor):
        assert isinstance(make_pixel_transform(image_processor, "pad"), FastPixels)
        assert isinstance(make_pixel_transform(image_processor, "pad", "processor"), ProcessorPixels)
    with pytest.raises(ValueError, match="unknown image backend"):
        make_pixel_transform(tiny_image_processor, "pad", "torchvision")


def test_padding_uses_the_mean_colour_and_keeps_the_whole_image(tiny_image_processor):
    wide = Image.new("RGB", (120, 40), (255, 0, 0))
    pixels = FastPixels(tiny_image_processor, "pad")(wide)  # (3, 56, 56): red band in the middle, mean colour above
    mean_row, middle_row = pixels[:, 2, 28], pixels[:, 28, 28]
    assert torch.allclose(mean_row, torch.zeros(3), atol=0.02), f"padding should normalise to ~0, got {mean_row}"
    assert middle_row[0] > 1.5 and middle_row[1] < -1.5, f"the image should survive in the middle, got {middle_row}"
    cropped = FastPixels(tiny_image_processor, "crop")(wide)
    assert cropped[0].min() > 1.5, "a centre crop of a red image is all red"


def test_data_bench_writes_both_rates_and_the_tolerance(tmp_path):
    out = tmp_path / "bench.json"
    data_bench.main(["--json", str(out), "--samples", "8", "--images", "2", "--repeats", "1", "--warmup", "0"])
    result = json.loads(out.read_text())
    assert result["samples_per_s_per_worker"] > 0 and result["processor_samples_per_s"] > 0, result
    assert result["tolerance"]["max_level_difference"] <= FAST_MAX_LEVELS + 1e-3, result["tolerance"]
    assert result["setup"]["machine"]["torch_threads"] == 1, "the bench measures one worker's single thread"


def test_pixel_cap_and_broken_bytes_are_bad_samples_not_crashes():
    from mole.data.errors import BadSample

    buffer = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buffer, format="PNG")
    with pytest.raises(BadSample) as err:
        decode_image(buffer.getvalue(), max_pixels=19_999)
    assert err.value.reason == "image_too_large"
    assert decode_image(buffer.getvalue(), max_pixels=20_000).size == (200, 100)
    with pytest.raises(BadSample) as err:
        decode_image(buffer.getvalue()[:60])
    assert err.value.reason == "broken_image"


def test_a_pixel_cap_above_pillows_own_applies(monkeypatch):
    """Pillow checks the same header against its MAX_IMAGE_PIXELS (about 89 MP) first: a configured
    ``data.max_image_pixels`` above that must still be the cap that applies."""
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 20,000 pixels: over Pillow's (scaled-down) cap
    assert decode_image(buffer.getvalue(), max_pixels=20_000).size == (200, 100)
