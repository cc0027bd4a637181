"""Qwen2.5-VL and Qwen3-VL through their stock classes: mole's forward against the stock model fed as its
own processing feeds it, the text-only vision path, and surgery on the real 7-8B shapes (meta device)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from PIL import Image
from peft import PeftModel
from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mole.adapter import gather_trainable_state, save_adapter
from mole.backbones import backbone_for
from mole.backbones.qwen_vl import IMAGE_TOKEN
from mole.config import ConfigError, load_config
from mole.data.collate import collate
from mole.data.conversation import parse_conversation, render_conversation
from mole.data.sample import SampleProcessor
from mole.evaluate import EvalDomain, evaluate
from mole.export import export_merged, export_peft
from mole.inference import Prompt, PromptEncoder, generate_answers, load_model, load_processor, question_turns
from mole.model import TrainingModel, build_mole_model
from mole.spec import AdapterSpec, ImageSpec
from mole.surgery import apply_mole
from tests.helpers import REPO, noise_png, one_thread_for_the_module, text_sample, write_shard  # noqa: F401

CONFIGS = {"qwen2_5_vl": REPO / "launch" / "configs" / "tiny_qwen2_5_vl.yaml",
           "qwen3_vl": REPO / "launch" / "configs" / "tiny_qwen3_vl.yaml"}
QUESTION = {"conversations": [{"from": "human", "value": "<image>\nWhat color is the main object?"},
                              {"from": "gpt", "value": "red"}]}
SIZES = [(64, 48), (130, 60), (100, 100)]  # (width, height): 4, 8-10 and 9-16 image tokens


def samples(kind: str) -> list[dict]:
    if kind == "images":
        return [{"json": json.dumps(QUESTION).encode(), "png": noise_png(size, seed)} for seed, size in enumerate(SIZES)]
    return [{"json": json.dumps(text_sample(k, q, a)["json"]).encode()}
            for k, q, a in [("a", "How many sides has a square?", "four"), ("b", "Count?", "two")]]


def stock_inputs(processor, raws: list[dict]) -> dict:
    """What ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` (which need torchvision) return for the rendered
    conversations and their images: the image processor on all images at once, ``<|image_pad|>``
    repeated per image by its grid, right padding, ``mm_token_type_ids`` 1 at image tokens."""
    texts, images = [], []
    for raw in raws:
        turns, _ = parse_conversation(raw["json"])
        texts.append(render_conversation(turns, "png" in raw, processor.tokenizer)[0])
        if "png" in raw:
            images.append(Image.open(io.BytesIO(raw["png"])).convert("RGB"))
    out = {}
    if images:
        out = dict(processor.image_processor(images=images, return_tensors="pt"))
        merge = processor.image_processor.merge_size ** 2
        grids = iter(out["image_grid_thw"])
        texts = [text.replace(IMAGE_TOKEN, IMAGE_TOKEN * (int(next(grids).prod()) // merge)) if IMAGE_TOKEN in text
                 else text for text in texts]
    encoded = dict(processor.tokenizer(texts, return_tensors="pt", padding=True))
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return {**encoded, **out, "mm_token_type_ids": (encoded["input_ids"] == image_token_id).int()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    """(family, MoLE training model with its adapters at zero, processor, stock model), fp32."""
    cfg = load_config(str(CONFIGS[request.param]), ["lora.dropout=0.0", "train.train_projector=true"])
    model, surgery, processor = build_mole_model(cfg, torch.float32)
    assert not any(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n), "adapters start at zero"
    stock = backbone_for(model.config).model_class.from_pretrained(cfg.model.name_or_path, dtype=torch.float32).eval()
    return request.param, TrainingModel(model, surgery, "switch", 0.0).eval(), processor, stock


def mole_batch(model: TrainingModel, processor, raws: list[dict]) -> dict:
    process = SampleProcessor(processor, 256, "crop", image_backend="processor", backbone=model.backbone)
    return collate([process(raw) for raw in raws], processor.tokenizer.pad_token_id)


def mole_logits(model: TrainingModel, batch: dict) -> torch.Tensor:
    seen = []
    handle = model.llava.lm_head.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"], batch["image_sizes"])
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["images", "text_only"])
def test_training_forward_with_zero_adapters_equals_the_stock_model(family, kind):
    """Images of three sizes (different token counts, several windows) and a text-only batch, from
    shards through mole's data path, against the stock model on its own processing's inputs."""
    name, model, processor, stock = family
    raws = samples(kind)
    batch = mole_batch(model, processor, raws)
    reference = stock_inputs(processor, raws)
    mask = batch["attention_mask"].bool()
    assert torch.equal(reference["input_ids"][mask], batch["input_ids"][mask]), f"{name}: tokens differ from the processor's"
    if kind == "images":
        assert torch.equal(batch["pixel_values"], reference["pixel_values"]), f"{name}: pixels differ from the processor's"
        assert torch.equal(batch["image_sizes"], reference["image_grid_thw"]), f"{name}: grids differ from the processor's"
        tokens = reference["mm_token_type_ids"].sum(dim=1).tolist()
        assert len(set(tokens)) == len(SIZES), f"precondition: each image takes its own number of tokens, {tokens}"
        with torch.no_grad():
            features = model.backbone.image_features(model.llava, batch["pixel_values"], image_sizes=batch["image_sizes"])
        assert features.shape == (sum(tokens), stock.config.text_config.hidden_size), f"{name}: {tuple(features.shape)}"
    with torch.no_grad():
        expected = stock(**reference).logits
    got = mole_logits(model, batch)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5,
                               msg=f"{name}: mole's training forward differs from the stock model ({kind})")
    if kind == "images":  # the check can fail: the same model fed embeddings alone numbers positions 0, 1, 2, ...
        with torch.no_grad():
            stock.model.rope_deltas = None
            flat = stock(inputs_embeds=stock.get_input_embeddings()(reference["input_ids"]),
                         attention_mask=reference["attention_mask"], pixel_values=reference["pixel_values"],
                         image_grid_thw=reference["image_grid_thw"]).logits
        assert float((flat - expected)[mask].abs().max()) > 1e-4, f"{name}: 1-D positions give the same logits"


def test_text_only_batch_runs_the_whole_vision_path_and_reaches_its_projectors(family):
    """Blocks, merger and (Qwen3-VL) every DeepStack merger run; the projector's parameters get (zero) gradients."""
    name, model, processor, _ = family
    batch = mole_batch(model, processor, samples("text_only"))
    visual = model.llava.model.visual
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    ran = []
    hooks = [module.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, module in enumerate([*visual.blocks, *mergers])]
    try:
        model.zero_grad()
        model(batch["input_ids"], batch["attention_mask"], batch["labels"])["loss"].backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(ran) == list(range(len(visual.blocks) + len(mergers))), f"{name}: vision modules run: {sorted(ran)}"
    for index, module in enumerate(mergers):
        grads = [(n, p.grad) for n, p in module.named_parameters()]
        assert all(p.requires_grad for p in module.parameters()), f"{name}: merger {index} does not train with the projector"
        assert all(g is not None for _, g in grads), f"{name}: merger {index} is not in the graph of a text-only batch"
        assert all(float(g.abs().max()) == 0 for _, g in grads), f"{name}: merger {index} got a non-zero gradient from no image"


def test_min_and_max_pixels_set_the_image_token_range(family):
    name, model, _, _ = family
    processor = model.backbone.load_processor(str(REPO / "models" / f"tiny-{name.replace('_', '-')}"),
                                              image=ImageSpec(min_pixels=1, max_pixels=(2 * 2 * 32) ** 2))
    batch = mole_batch(model, processor, samples("images"))
    tokens = (batch["input_ids"] == model.llava.config.image_token_id).sum(dim=1).tolist()
    assert max(tokens) <= 4 * 4, f"{name}: max_pixels did not cap the image tokens: {tokens}"
    with pytest.raises(ValueError, match="exceeds max_pixels"):
        model.backbone.load_processor(str(REPO / "models" / f"tiny-{name.replace('_', '-')}"),
                                      image=ImageSpec(max_pixels=10))


def test_fewest_image_tokens_read_min_pixels_as_an_area(family):
    """At the real checkpoints' limits an image takes at least 4 tokens (56x56 pixels, Qwen2.5-VL) or
    about 4 (64x64, Qwen3-VL): reading min_pixels as a side made that thousands, and training warned that
    every image sample would be skipped as too long."""
    name, model, _, _ = family
    factor = {"qwen2_5_vl": 28, "qwen3_vl": 32}[name]
    processor = model.backbone.load_processor(str(REPO / "models" / f"tiny-{name.replace('_', '-')}"),
                                              image=ImageSpec(min_pixels=4 * factor**2, max_pixels=16384 * factor**2))
    fewest = model.backbone.tile_image_tokens(processor)
    assert fewest == 4, f"{name}: an image takes at least 4 tokens at min_pixels {4 * factor**2}, got {fewest}"
    sizes = [(1, 1), (factor, factor), (10, 300), (2 * factor, factor)]
    counts = [model.backbone.image_tokens(processor, size) for size in sizes]
    assert min(counts) == fewest, f"{name}: token counts {counts} of images {sizes}: the fewest is not {fewest}"


@pytest.mark.parametrize("overrides, message", [
    ([f"model.name_or_path={REPO / 'models' / 'tiny-llava'}", "data.max_pixels=50000"],
     r"data.max_pixels: applies to dynamic-resolution families \(qwen2_5_vl, qwen3_vl\)"),
    (["data.min_pixels=9000", "data.max_pixels=3000"], r"data.min_pixels: 9000 exceeds data.max_pixels 3000"),
])
def test_pixel_limits_are_refused_where_they_cannot_apply(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(CONFIGS["qwen2_5_vl"]), overrides)


@pytest.mark.parametrize("kind", ["images", "text_only"])
def test_held_out_generation_from_the_prefill_inputs_is_the_stock_models(family, kind):
    """Held-out answers during training start ``generate`` from :meth:`TrainingModel.prefill_inputs`: the
    token ids (the model numbers its own M-RoPE positions) with the images encoded by mole, the vision
    path run even for a text-only batch. On a left-padded batch of images of different token counts
    beside a text-only question, and on a text-only batch, the tokens the stock model generates from
    its own inputs."""
    name, model, processor, stock = family
    prompts = [Prompt(question_turns("How many sides?", False)), Prompt(question_turns("Count them all?", False))]
    if kind == "images":
        prompts[1:] = [Prompt(question_turns("What color is it?", True), Image.open(io.BytesIO(noise_png(size, seed))))
                       for seed, size in enumerate(SIZES[:2])]
    batch = PromptEncoder(processor, "crop", "processor", backbone=model.backbone)(prompts)
    images = None if batch["pixel_values"] is None else {"pixel_values": batch["pixel_values"],
                                                         "image_sizes": batch["image_sizes"]}
    settings = {"attention_mask": batch["attention_mask"], "max_new_tokens": 4, "do_sample": False, "use_cache": True,
                "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        expected = stock.generate(input_ids=batch["input_ids"], **model.backbone.generation_inputs(
            stock, batch["input_ids"], images), **settings)
        got = model.llava.generate(**model.prefill_inputs(batch["input_ids"], batch["pixel_values"],
                                                          batch["image_sizes"]), **settings)
    assert torch.equal(got, expected), f"{name}: generation from mole's prefill inputs differs:\n{got}\n{expected}"


# --------------------------------------------------------------- a saved K=1 adapter: load, infer, eval, export


@pytest.fixture(scope="module")
def lora_adapter(family, tmp_path_factory):
    """(family, adapter directory, base directory, stock inputs of an image batch): a K=1 adapter with
    every LoRA B and the projector moved off the base, saved as training saves it (aspect crop)."""
    name = family[0]
    cfg = load_config(str(CONFIGS[name]), ["lora.dropout=0.0", "train.train_projector=true", "mole.num_experts=1"])
    model, _, processor = build_mole_model(cfg, torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in param_name or backbone_for(model.config).is_projector(param_name)):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp(f"adapter_{name}")
    save_adapter(str(out), gather_trainable_state(model), model.mole_spec)
    return name, out, cfg.model.name_or_path, stock_inputs(processor, samples("images"))


def loaded_logits(adapter, inputs) -> torch.Tensor:
    _, adapter_dir, base, _ = adapter
    model = load_model(base, str(adapter_dir))
    images = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_grid_thw"]}
    with torch.no_grad():
        return backbone_for(model.config).forward(model, inputs["input_ids"], inputs["attention_mask"], images).logits


def test_k1_adapter_equals_peft_lora_and_its_merged_export(lora_adapter, tmp_path):
    """K=1 is plain LoRA: mole.load_model, peft's PeftModel on the stock model and the merged stock model
    give the same logits on an image batch."""
    name, adapter_dir, base, inputs = lora_adapter
    mask = inputs["attention_mask"].bool()
    ours = loaded_logits(lora_adapter, inputs)
    stock_class = backbone_for(AutoConfig.from_pretrained(base)).model_class
    export_peft(str(adapter_dir), str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(stock_class.from_pretrained(base), str(tmp_path / "peft")).eval()
    export_merged(str(adapter_dir), str(tmp_path / "merged"))
    merged = stock_class.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        plain = stock_class.from_pretrained(base).eval()(**inputs).logits
        peft_logits, merged_logits = peft_model(**inputs).logits, merged(**inputs).logits
    assert float((ours - plain)[mask].abs().max()) > 1e-2, f"{name}: the adapter barely changes the logits"
    torch.testing.assert_close(peft_logits[mask], ours[mask], rtol=1e-5, atol=1e-5, msg=f"{name}: peft != mole (K=1)")
    torch.testing.assert_close(merged_logits[mask], ours[mask], rtol=1e-4, atol=1e-4, msg=f"{name}: merged != mole")
    assert not any("lora" in n for n, _ in merged.named_parameters()), f"{name}: LoRA modules left after merging"
    assert load_processor(str(tmp_path / "merged")).image_processor.size == load_processor(base).image_processor.size


def test_batched_generation_with_left_padding_equals_one_by_one(lora_adapter):
    """Left padding moves every prompt's M-RoPE positions: the model must number them past the padding."""
    name, adapter_dir, base, _ = lora_adapter
    model, processor = load_model(base, str(adapter_dir)), load_processor(base)
    images = [Image.open(io.BytesIO(noise_png(size, seed))).convert("RGB") for seed, size in enumerate(SIZES[:2])]
    prompts = [Prompt(question_turns("What color is the main object?", True), images[0]),
               Prompt(question_turns("How many sides has a square?", False)),
               Prompt(question_turns("What is it?", True), images[1])]
    batched = generate_answers(model, processor, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_answers(model, processor, [prompt], max_new_tokens=6)[0] for prompt in prompts]
    assert batched == alone, f"{name}: batched {batched} != one by one {alone}"
    assert any(batched), f"{name}: nothing generated"


def test_evaluate_scores_image_and_text_samples(lora_adapter, tmp_path):
    name, adapter_dir, base, _ = lora_adapter
    shard = write_shard(tmp_path / "eval.tar", [
        {"__key__": f"i{seed}", "json": QUESTION, "png": noise_png(size, seed)} for seed, size in enumerate(SIZES)
    ] + [text_sample("t0", "How many sides has a square?", "four")])
    results = evaluate(load_model(base, str(adapter_dir)), load_processor(base), [EvalDomain("mixed", [str(shard)])],
                       batch_size=2, max_new_tokens=4)
    domain = results["domains"]["mixed"]
    assert domain["samples"] == len(SIZES) + 1 and math.isfinite(domain["loss"]), f"{name}: {domain}"


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
    spec = AdapterSpec.from_base(config, num_experts=3, routing="scaled", aux_loss="switch", r=4, alpha=8.0,
                                 dropout=0.0, attn_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                 mlp_targets=("gate_proj", "up_proj", "down_proj"), train_projector=False)
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
