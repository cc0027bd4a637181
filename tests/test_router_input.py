"""``mole.router_input: prefix_mean`` in generation: under a KV cache each decode step sees one token,
yet it must be routed by its whole sequence so far, as a forward of the full sequence routes it. With
random experts and routers (so routing changes the output), greedy generation with the cache must give
the tokens that generation without it (the full sequence every step) gives, on every family."""

from __future__ import annotations

import inspect

import pytest
import torch
from PIL import Image

from tests.helpers import REPO

CONFIGS = ["tiny.yaml", "tiny_llava_next.yaml", "tiny_llava_onevision.yaml", "tiny_qwen2_5_vl.yaml", "tiny_qwen3_vl.yaml"]


def generated(model, processor, cache: bool) -> torch.Tensor:
    from mole.backbones import backbone_for
    from mole.data.conversation import Turn
    from mole.inference import Prompt, PromptEncoder

    backbone = backbone_for(model.config)
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    prompts = [Prompt([Turn("user", "<image>\nWhat color is it?")], image),
               Prompt([Turn("user", "<image>\nHow many objects are there in the picture, and which colours?")], image)]
    batch = PromptEncoder(processor, "pad", "fast", backbone=backbone)(prompts)  # left-padded: rows of two lengths
    images = {"pixel_values": batch["pixel_values"]}
    if batch["image_sizes"] is not None:
        images["image_sizes"] = batch["image_sizes"]
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         **backbone.generation_inputs(model, batch["input_ids"], images), max_new_tokens=8,
                         do_sample=False, use_cache=cache, pad_token_id=processor.tokenizer.pad_token_id,
                         eos_token_id=None)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("config", CONFIGS)
def test_cached_generation_routes_by_the_prefix_as_the_full_sequence_does(config, tmp_path):
    from mole.config import load_config
    from mole.inference import mole_layers, routing_context
    from mole.model import build_mole_model

    cfg = load_config(str(REPO / "launch" / "configs" / config), ["mole.router_input=prefix_mean", f"output_dir={tmp_path}"])
    model, _, processor = build_mole_model(cfg, torch.float32)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name or ".router." in name:  # B starts at zero: every expert would compute the same
            param.data.normal_(0, 0.5)
    model.eval()
    layers = mole_layers(model)
    assert layers and all(layer.router_input == "prefix_mean" for layer in layers)
    # a packed training forward's sample ids left behind must not make a decode step look like a whole sample
    routing_context(model).pack(torch.zeros(1, 3, dtype=torch.long), 1)
    with torch.no_grad():
        cached, recomputed = generated(model, processor, True), generated(model, processor, False)
        for layer in layers:
            layer.router_input = "token"
        by_token = generated(model, processor, True)
    assert torch.equal(cached, recomputed), f"{config}: with the cache {cached.tolist()}, without {recomputed.tolist()}"
    assert not torch.equal(cached, by_token), f"{config}: routing by the prefix changed nothing: the test shows nothing"


def test_a_decode_step_without_an_attention_mask_still_continues_its_prompt(tmp_path):
    """The continued positions come from the KV cache itself, not only from a mask longer than the step."""
    from mole.config import load_config
    from mole.model import build_mole_model

    cfg = load_config(str(REPO / "launch" / "configs" / "tiny.yaml"), ["mole.router_input=prefix_mean", f"output_dir={tmp_path}"])
    model, _, _ = build_mole_model(cfg, torch.float32)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name or ".router." in name:
            param.data.normal_(0, 0.5)
    model.eval()
    ids = torch.randint(3, 500, (1, 9))
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x: cache
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prompt = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], **{name: prompt[name]}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
