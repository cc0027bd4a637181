"""Qwen2.5-VL and Qwen3-VL through their stock classes: mole's forward against the stock model fed as its
own processing feeds it, the text-only vision path, and surgery on the real 7-8B shapes (meta device)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from mole.backbones import qwen_vl
from mole.spec import AdapterSpec
from mole.surgery import apply_mole
from tests.helpers import REPO

MODELS = {"qwen2_5_vl": REPO / "models" / "tiny-qwen2_5-vl", "qwen3_vl": REPO / "models" / "tiny-qwen3-vl"}
SETTINGS = dict(num_experts=3, routing="scaled", aux_loss="switch", r=4, alpha=8.0, dropout=0.0,
                attn_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                mlp_targets=("gate_proj", "up_proj", "down_proj"), train_projector=True)
CONVERSATIONS = [
    ("What color is the main object?", "red"),
    ("How many objects are there?", "two"),
]
IMAGES = [Image.new("RGB", (64, 64), (220, 40, 40)), Image.new("RGB", (130, 60), (40, 170, 60))]


def stock_inputs(processor: qwen_vl.QwenProcessor, images: list[Image.Image] | None) -> dict:
    """The batch ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` would return for the chat-templated
    conversations (one image each, or none): the image processor on all images at once,
    ``<|image_pad|>`` repeated per image by its grid, right padding, ``mm_token_type_ids``."""
    tokenizer = processor.tokenizer
    texts = []
    for index, (question, answer) in enumerate(CONVERSATIONS):
        content = ([{"type": "image"}] if images else []) + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    out = {}
    if images:
        out = dict(processor.image_processor(images=images, return_tensors="pt"))
        merge = processor.image_processor.merge_size ** 2
        texts = [text.replace(qwen_vl.IMAGE_TOKEN, qwen_vl.IMAGE_TOKEN * int(grid.prod() // merge))
                 for text, grid in zip(texts, out["image_grid_thw"])]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    image_token_id = tokenizer.convert_tokens_to_ids(qwen_vl.IMAGE_TOKEN)
    return {**encoded, **out, "mm_token_type_ids": (encoded["input_ids"] == image_token_id).int()}


@pytest.fixture(scope="module", params=list(MODELS))
def family(request):
    """(family, stock model, MoLE model with its adapters at zero, processor), fp32."""
    path = MODELS[request.param]
    stock = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    surgery = apply_mole(model, AdapterSpec.from_base(model.config, **SETTINGS))
    return request.param, stock, model, surgery, qwen_vl.load_processor(str(path))


def masked_max_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[mask.bool()].abs().max())


def test_images_of_two_sizes_take_different_token_counts(family):
    _, _, _, _, processor = family
    per_image = [qwen_vl.QwenImages(processor.image_processor, "native")(image) for image in IMAGES]
    counts = [qwen_vl.image_tokens(processor.image_processor, image["image_grid_thw"]) for image in per_image]
    stock = stock_inputs(processor, IMAGES)
    assert counts[0] != counts[1], f"both images take {counts[0]} tokens; the test needs two sizes"
    assert [int(row.sum()) for row in stock["mm_token_type_ids"]] == counts
    batched = qwen_vl.batch_images(per_image)
    assert torch.equal(batched["pixel_values"], stock["pixel_values"]), "per-image processing differs from the batched processor"
    assert torch.equal(batched["image_grid_thw"], stock["image_grid_thw"])


def test_forward_with_adapters_at_zero_equals_stock_logits_on_an_image_batch(family):
    name, stock, model, _, processor = family
    inputs = stock_inputs(processor, IMAGES)
    with torch.no_grad():
        expected = stock(**inputs).logits
        got = qwen_vl.forward(model, inputs["input_ids"], inputs["attention_mask"], None,
                              inputs["pixel_values"], inputs["image_grid_thw"]).logits
        stock.model.rope_deltas = None
        flat = stock(inputs_embeds=stock.get_input_embeddings()(inputs["input_ids"]),  # embeddings alone: 1-D positions
                     attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"]).logits
    difference = masked_max_difference(got, expected, inputs["attention_mask"])
    assert difference < 1e-5, f"{name}: mole's forward differs from the stock model's by {difference:.2e}"
    one_dimensional = masked_max_difference(flat, expected, inputs["attention_mask"])
    assert one_dimensional > 1e-4, f"{name}: 1-D positions give the same logits ({one_dimensional:.1e}); the check cannot fail"


def test_forward_with_adapters_at_zero_equals_stock_logits_on_a_text_only_batch(family):
    name, stock, model, _, processor = family
    inputs = stock_inputs(processor, None)
    with torch.no_grad():
        expected = stock(**inputs).logits
        got = qwen_vl.forward(model, inputs["input_ids"], inputs["attention_mask"], None).logits
    difference = masked_max_difference(got, expected, inputs["attention_mask"])
    assert difference < 1e-5, f"{name}: text-only logits differ from the stock model's by {difference:.2e}"


def test_text_only_batch_runs_the_whole_vision_path_and_reaches_its_projectors(family):
    """Blocks, merger and (Qwen3-VL) every DeepStack merger run; the trainable ones get (zero) gradients."""
    name, _, model, _, processor = family
    inputs = stock_inputs(processor, None)
    visual = model.model.visual
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    ran = []
    hooks = [module.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, module in enumerate([*visual.blocks, *mergers])]
    try:
        model.zero_grad()
        for module in mergers:
            module.requires_grad_(True)
        qwen_vl.forward(model, inputs["input_ids"], inputs["attention_mask"], inputs["input_ids"]).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(ran) == list(range(len(visual.blocks) + len(mergers))), f"{name}: vision modules run: {sorted(ran)}"
    for index, module in enumerate(mergers):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), f"{name}: merger {index} is not in the graph of a text-only batch"
        assert all(float(g.abs().max()) == 0 for g in grads), f"{name}: merger {index} got a non-zero gradient from no image"


# -------------------------------------------------------------------------- real shapes, meta device

QWEN2_5_VL_7B = dict(
    vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                       in_channels=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2),
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                     tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
"""``Qwen/Qwen2.5-VL-7B-Instruct``'s config.json values (its ``rope_scaling`` as 5.x's ``rope_parameters``)."""
QWEN3_VL_8B = dict(
    vision_config=dict(depth=27, hidden_act="gelu_pytorch_tanh", hidden_size=1152, intermediate_size=4304, num_heads=16,
                       in_channels=3, out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True},
                     bos_token_id=151643, eos_token_id=151645),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
"""``Qwen/Qwen3-VL-8B-Instruct``'s config.json values."""


@pytest.mark.parametrize("config_class, model_class, values", [
    (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, QWEN2_5_VL_7B),
    (Qwen3VLConfig, Qwen3VLForConditionalGeneration, QWEN3_VL_8B),
], ids=["qwen2_5_vl_7b", "qwen3_vl_8b"])
def test_surgery_on_the_real_shapes_adds_the_parameters_the_config_implies(config_class, model_class, values):
    config = config_class(**values)
    with torch.device("meta"):
        model = model_class(config)
    base_params = sum(p.numel() for p in model.parameters())
    spec = AdapterSpec.from_base(config, **{**SETTINGS, "train_projector": False})
    surgery = apply_mole(model, spec)

    text = config.text_config
    hidden, inner, layers, k, r = text.hidden_size, text.intermediate_size, text.num_hidden_layers, spec.num_experts, spec.r
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    q_out, kv_out = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    experts = 3 * k * r * (hidden + inner)  # gate, up (hidden -> inner) and down (inner -> hidden), K experts each
    router = hidden * k + k
    attention = r * ((hidden + q_out) + 2 * (hidden + kv_out) + (q_out + hidden))  # q, k, v, o
    expected = layers * (experts + router + attention)

    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    added = sum(p.numel() for p in model.parameters()) - base_params
    assert len(surgery.mole_layers) == layers and len(surgery.lora_layers) == 4 * layers
    assert sum(trainable.values()) == expected == added, (
        f"trainable {sum(trainable.values()):,}, added {added:,}, expected from the config {expected:,}")
    assert not any("visual" in name for name in trainable), "the vision tower must stay frozen"
    assert 7e9 < base_params < 9e9, f"{base_params:,} base parameters: not the 7-8B model"
