"""An adapter carries the image preparation its training used (processor backend, pixel and tile limits)
to every way of serving it, whatever the model directory says."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mole.adapter import AdapterError, gather_trainable_state, save_adapter
from mole.backbones import backbone_for
from mole.config import ConfigError, load_config
from mole.data.conversation import Turn
from mole.inference import Prompt, PromptEncoder, generate_answers, load_model, load_processor
from mole.model import build_mole_model
from mole.spec import ImageSpec
from tests.helpers import REPO, TINY_CONFIG, noise_png, one_thread_for_the_module  # noqa: F401

NEW_KEYS = ("image_processor_backend", "min_pixels", "max_pixels", "image_grid_pinpoints", "vision_aspect_ratio")
CASES = {
    # family: (config, overrides of the directory's limits, what the adapter records where fixed)
    "llava_next": (TINY_CONFIG, [f"model.name_or_path={REPO / 'models' / 'tiny-llava-next'}",
                                 "data.image_grid_pinpoints=[[28,28]]"],
                   ImageSpec("pad", "fast", "pil", image_grid_pinpoints=((28, 28),))),
    "llava_onevision": (REPO / "launch" / "configs" / "tiny_llava_onevision.yaml",
                        ["data.image_grid_pinpoints=[[28,28],[28,56]]", "data.vision_aspect_ratio=anyres_max_2"],
                        None),
    "qwen2_5_vl": (REPO / "launch" / "configs" / "tiny_qwen2_5_vl.yaml", ["data.max_pixels=3136"],
                   ImageSpec("crop", "fast", "pil", min_pixels=3136, max_pixels=3136)),
}
IMAGE = (90, 60)  # (width, height): several tiles or tokens at the directories' defaults


@pytest.fixture(scope="module", params=sorted(CASES))
def limited(request, tmp_path_factory):
    """(family, base directory, adapter directory trained with other limits than the base directory's)."""
    config, overrides, _ = CASES[request.param]
    cfg = load_config(str(config), [*overrides, "mole.num_experts=2"])
    model, _, _ = build_mole_model(cfg, torch.float32)
    out = tmp_path_factory.mktemp(request.param)
    save_adapter(str(out), gather_trainable_state(model), model.mole_spec)
    return request.param, cfg.model.name_or_path, str(out)


def image_inputs(processor, model) -> dict:
    image = Image.open(io.BytesIO(noise_png(IMAGE, 0))).convert("RGB")
    batch = PromptEncoder(processor, "crop", backbone=backbone_for(model.config))(
        [Prompt([Turn("user", "<image>\nWhat is it?")], image)])
    tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    return {"pixel_values": tuple(batch["pixel_values"].shape), "image_tokens": tokens}


def test_the_adapter_records_the_limits_its_processor_used(limited):
    name, _, adapter = limited
    recorded = json.loads(Path(adapter, "mole_config.json").read_text())
    assert recorded["format_version"] == 3
    expected = CASES[name][2]
    if expected is not None:
        got = {key: recorded[key] for key in NEW_KEYS}
        want = json.loads(json.dumps({"image_processor_backend": expected.processor_backend,
                                      "min_pixels": expected.min_pixels, "max_pixels": expected.max_pixels,
                                      "image_grid_pinpoints": expected.image_grid_pinpoints,
                                      "vision_aspect_ratio": expected.vision_aspect_ratio}))
        assert got == want, f"{name}: recorded {got}, trained with {want}"
    else:
        assert recorded["image_grid_pinpoints"] == [[28, 28], [28, 56]] and recorded["vision_aspect_ratio"] == "anyres_max_2"
        assert recorded["min_pixels"] is None and recorded["image_processor_backend"] in ("pil", "torchvision")


def test_the_adapter_is_served_with_its_limits_not_the_model_directorys(limited):
    """load_model and load_processor(adapter_dir=...) prepare images as training did: fewer tiles (AnyRes)
    or tokens (Qwen) than the directory's own processor gives the same image, and generation runs on them."""
    name, base, adapter = limited
    model = load_model(base, adapter)
    ours, directory = load_processor(base, adapter_dir=adapter), load_processor(base)
    served, default = image_inputs(ours, model), image_inputs(directory, model)
    if name == "qwen2_5_vl":
        assert served["image_tokens"] == 2 and default["image_tokens"] == 6, \
            f"90x60 at max_pixels 3136 is 28x56 pixels, 2 tokens (the directory's 12544: 6): {served} vs {default}"
        assert served["pixel_values"][0] == 2 * 4, f"4 patches (one 2x2 merge) per token, {served}"
    else:
        assert served["pixel_values"][0] < default["pixel_values"][0], f"{name}: tiles {served} vs directory {default}"
        assert model.config.image_grid_pinpoints == [list(p) for p in model.mole_spec.image.image_grid_pinpoints], \
            f"{name}: the model splits tiles by other pinpoints than the processor cut"
    if name == "llava_next":
        assert served["pixel_values"][0] == 2, f"one 28x28 grid tile and the whole image, got {served}"
    answers = generate_answers(model, ours, [Prompt([Turn("user", "<image>\nWhat is it?")],
                                                    Image.open(io.BytesIO(noise_png(IMAGE, 1))))],
                               max_new_tokens=2)
    assert len(answers) == 1
    with pytest.raises(ValueError, match=r"the processor prepares images with \w+ .*but the adapter was trained with"):
        generate_answers(model, directory, [Prompt([Turn("user", "hi")])], max_new_tokens=1)


def test_an_adapter_of_format_version_2_takes_the_model_directorys_limits(limited):
    name, base, adapter = limited
    raw = json.loads(Path(adapter, "mole_config.json").read_text())
    old = {key: value for key, value in raw.items() if key not in NEW_KEYS}
    Path(adapter, "mole_config.json").write_text(json.dumps({**old, "format_version": 2}))
    try:
        model = load_model(base, adapter)
        assert image_inputs(load_processor(base, adapter_dir=adapter), model) == \
            image_inputs(load_processor(base), model), f"{name}: a version 2 adapter is served as before"
    finally:
        Path(adapter, "mole_config.json").write_text(json.dumps(raw))


def test_a_recorded_backend_that_cannot_be_built_is_one_line_naming_the_adapter(limited, tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed: the recorded backend can be built")
    _, base, adapter = limited
    raw = json.loads(Path(adapter, "mole_config.json").read_text())
    edited = tmp_path / "adapter"
    edited.mkdir()
    (edited / "mole_config.json").write_text(json.dumps({**raw, "image_processor_backend": "torchvision"}))
    with pytest.raises(AdapterError) as error:
        load_processor(base, adapter_dir=str(edited))
    message = str(error.value)
    assert message.startswith(f"adapter {str(edited)!r}: images must go through the torchvision image processor") \
        and "pip install torchvision" in message and "\n" not in message, message


def test_the_hf_export_prepares_and_tiles_images_with_the_recorded_limits(limited, tmp_path):
    """The exported directory's processor and config carry the adapter's limits, not the base's: plain
    transformers then cuts and reassembles the tiles (or resizes) as training did."""
    from transformers import AutoConfig, AutoImageProcessor

    from mole.hf_export import export_hf

    name, base, adapter = limited
    out = export_hf(adapter, str(tmp_path / "hf"), base)
    image = load_model(base, adapter).mole_spec.image
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    config = json.loads(Path(out, "config.json").read_text())
    assert config["mole"]["format_version"] == 3
    if name == "qwen2_5_vl":
        assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (image.min_pixels, image.max_pixels)
    else:
        pinpoints = [list(point) for point in image.image_grid_pinpoints]
        assert processor.image_grid_pinpoints == pinpoints and config["image_grid_pinpoints"] == pinpoints, name
        assert AutoConfig.from_pretrained(out, trust_remote_code=True).image_grid_pinpoints == pinpoints
    if name == "llava_onevision":
        assert config["vision_aspect_ratio"] == image.vision_aspect_ratio == "anyres_max_2"


ONEVISION = str(REPO / "launch" / "configs" / "tiny_llava_onevision.yaml")


@pytest.mark.parametrize("config, override, message", [
    (ONEVISION, "data.image_grid_pinpoints=[[28,56],[56]]", r"data.image_grid_pinpoints\[1\]: must hold 2 items, got \[56\]"),
    (ONEVISION, "data.image_grid_pinpoints=[[28,56,28]]", r"data.image_grid_pinpoints\[0\]: must hold at most 2 items"),
    (ONEVISION, "data.image_grid_pinpoints=[]", r"data.image_grid_pinpoints: must not be empty"),
    (ONEVISION, "data.image_grid_pinpoints=672", r"data.image_grid_pinpoints: expected list\[list\[int\]\], got 672"),
    (ONEVISION, "data.image_grid_pinpoints=[[28,0]]", r"data.image_grid_pinpoints\[0\]\[1\]: must be >= 1, got 0"),
    (ONEVISION, "data.image_grid_pinpoints=[[28,50]]",
     r"data.image_grid_pinpoints\[0\]: \[28, 50\] is not a multiple of the vision tower's image size 28"),
    (ONEVISION, "data.vision_aspect_ratio=anyres_9", r"data.vision_aspect_ratio: must be anyres_max_N .*got 'anyres_9'"),
    (ONEVISION, "data.vision_aspect_ratio=9", r"data.vision_aspect_ratio: expected str, got 9"),
    (ONEVISION, "data.image_processor_backend=cv2", r"data.image_processor_backend: must be one of pil, torchvision"),
    (ONEVISION, "data.max_pixels=3136", r"data.max_pixels: applies to dynamic-resolution families"),
    (str(TINY_CONFIG), "data.image_grid_pinpoints=[[336,672]]",
     r"data.image_grid_pinpoints: applies to AnyRes families \(llava_next, llava_onevision\); .* holds a 'llava' model"),
    (str(REPO / "launch" / "configs" / "tiny_llava_next.yaml"), "data.vision_aspect_ratio=anyres_max_4",
     r"data.vision_aspect_ratio: applies to AnyRes-max families \(llava_onevision\); .* 'llava_next' model"),
])
def test_a_bad_tile_or_backend_setting_is_one_line_naming_the_key(config, override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(config, [override])
    assert "\n" not in str(error.value), str(error.value)
