"""Each backbone family through mole: the training forward against the stock model, real shapes on the
meta device, and the family chosen from the model's config."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from mole.backbones import FAMILIES, UnsupportedBackbone, backbone_for
from mole.config import load_config
from mole.data.collate import collate
from mole.data.conversation import parse_conversation, render_conversation
from mole.data.sample import SampleProcessor
from mole.model import TrainingModel, build_mole_model
from mole.spec import AdapterSpec
from mole.surgery import apply_mole
from tests.helpers import REPO, TINY_CONFIG, one_thread_for_the_module, text_sample  # noqa: F401

TINY_MODELS = {"llava": REPO / "models" / "tiny-llava", "llava_next": REPO / "models" / "tiny-llava-next"}
QUESTION = {"conversations": [{"from": "human", "value": "<image>\nWhat color is the main object?"},
                              {"from": "gpt", "value": "red"}]}


def image_bytes(size: tuple[int, int], seed: int) -> bytes:
    """A noisy RGB image of ``size`` (width, height) as PNG: every pixel and tile differs."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_family_is_described_and_an_unknown_one_is_a_one_line_error():
    from transformers import Qwen2VLConfig

    assert sorted(FAMILIES) == ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"]
    with pytest.raises(UnsupportedBackbone, match=r"^model_type 'qwen2_vl' is not a supported backbone family; "
                                                  r"supported: llava, llava_next, qwen2_5_vl, qwen3_vl$"):
        backbone_for(Qwen2VLConfig())


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family(request):
    """(family, MoLE training model with its adapters at zero, processor, stock model) of a tiny checkpoint."""
    name = request.param
    cfg = load_config(str(TINY_CONFIG), [f"model.name_or_path={TINY_MODELS[name]}", "lora.dropout=0.0",
                                          "train.train_projector=true"])
    llava, surgery, processor = build_mole_model(cfg, torch.float32)
    assert not any(p.abs().sum() for n, p in llava.named_parameters() if "lora_B" in n), "adapters start at zero"
    stock = backbone_for(llava.config).model_class.from_pretrained(TINY_MODELS[name], dtype=torch.float32).eval()
    return name, TrainingModel(llava, surgery, "switch", 0.0).eval(), processor, stock


def mole_logits(model: TrainingModel, batch: dict) -> torch.Tensor:
    """The logits of mole's training forward (read off the LM head as it runs)."""
    seen = []
    handle = model.llava.lm_head.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"],
                  batch["image_sizes"])
    finally:
        handle.remove()
    return seen[0]


def stock_inputs(processor, raws: list[dict]) -> dict:
    """What the family's own processing feeds the stock model: its processor on the rendered text and images."""
    texts, images = [], []
    for raw in raws:
        turns, _ = parse_conversation(raw["json"])
        has_image = "png" in raw
        texts.append(render_conversation(turns, has_image, processor.tokenizer)[0])
        if has_image:
            images.append(Image.open(io.BytesIO(raw["png"])).convert("RGB"))
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    return dict(inputs)


@pytest.mark.parametrize("kind", ["images", "text_only"])
def test_training_forward_with_zero_adapters_equals_the_stock_model(family, kind):
    """Aspect ``crop`` and the processor's own pixels: the stock processor's path, image for image."""
    name, model, processor, stock = family
    if kind == "images":  # sizes that take different numbers of tiles and image tokens
        raws = [{"json": json.dumps(QUESTION).encode(), "png": image_bytes(size, seed)}
                for seed, size in enumerate([(64, 48), (40, 90), (30, 30)])]
    else:
        raws = [{"json": json.dumps(text_sample(k, q, a)["json"]).encode()}
                for k, q, a in [("a", "How many sides has a square?", "four"), ("b", "Count?", "two")]]
    process = SampleProcessor(processor, 256, "crop", image_backend="processor", backbone=model.backbone)
    batch = collate([process(raw) for raw in raws], processor.tokenizer.pad_token_id)
    reference = stock_inputs(processor, raws)
    mask = batch["attention_mask"].bool()
    assert torch.equal(reference["input_ids"][mask], batch["input_ids"][mask]), f"{name}: tokens differ from the processor's"
    if kind == "images":
        assert batch["pixel_values"].shape[0] > 0 and batch["num_images"] == 3
        if name != "llava":
            tokens = (batch["input_ids"] == stock.config.image_token_id).sum(dim=1).tolist()
            assert len(set(tokens)) > 1, f"precondition: the images take different numbers of tokens, {tokens}"
    with torch.no_grad():
        expected = stock(**reference).logits
    got = mole_logits(model, batch)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5,
                               msg=f"{name}: mole's training forward differs from the stock model ({kind})")


def real_7b_config(family: str):
    """The family's 7B checkpoint's config, values typed in from its config.json (nothing downloaded)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    text = LlamaConfig(vocab_size=32064 if family == "llava_next" else 32064, hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    common = dict(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
    if family == "llava":  # llava-hf/llava-1.5-7b-hf
        return LlavaConfig(**common)
    # llava-hf/llava-v1.6-vicuna-7b-hf
    return LlavaNextConfig(**common, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_surgery_on_the_real_7b_shapes_adapts_every_layer_and_trains_what_the_sizes_say(name):
    config = real_7b_config(name)
    k, r, attn, mlp = 4, 16, ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")
    spec = AdapterSpec.from_base(config, num_experts=k, routing="scaled", aux_loss="switch", r=r, alpha=32.0,
                                 dropout=0.05, attn_targets=attn, mlp_targets=mlp, train_projector=True)
    backbone = backbone_for(config)
    with torch.device("meta"):
        model = backbone.model_class(config)
        surgery = apply_mole(model, spec)
    text, vision = config.text_config, config.vision_config
    h, i, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = text.num_key_value_heads * h // text.num_attention_heads
    experts = k * r * ((h + i) + (h + i) + (i + h))  # gate, up: h -> i; down: i -> h; A (r, in), B (out, r)
    router = k * h + k
    attention = r * (h + h) + r * (h + kv)  # q: h -> h, v: h -> kv
    projector = vision.hidden_size * h + h + h * h + h
    projector += h if name == "llava_next" else 0  # image_newline
    expected = layers * (experts + router + attention) + projector
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(surgery.mole_layers) == layers == 32, surgery.mole_layers[:3]
    assert len(surgery.lora_layers) == layers * len(attn), surgery.lora_layers[:3]
    assert trainable == expected, f"{name}: {trainable:,} trainable parameters, the sizes say {expected:,}"
    vision_trainable = [n for n, p in model.named_parameters() if p.requires_grad and backbone.vision_tower_prefix in n]
    assert not vision_trainable, vision_trainable[:3]
