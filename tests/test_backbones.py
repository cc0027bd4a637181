"""Each backbone family through mole: the training forward against the stock model, real shapes on the
meta device, and the family chosen from the model's config."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mole.backbones import FAMILIES, UnsupportedBackbone, backbone_for
from mole.config import load_config
from mole.data.collate import collate
from mole.data.conversation import parse_conversation, render_conversation
from mole.data.sample import SampleProcessor
from mole.inference import Prompt, PromptEncoder, question_turns
from mole.model import TrainingModel, build_mole_model
from mole.spec import AdapterSpec
from mole.surgery import apply_mole
from tests.helpers import SHORT_RUN_STEPS as STEPS
from tests.helpers import (REPO, TINY_CONFIG, evaluated_answers, launch_module,  # noqa: F401
                           launch_trainings_together, logged_heldout_answers, noise_png, one_thread_for_the_module,
                           read_rank_log, read_shard_samples, step_records, text_sample, write_shard)

TINY_MODELS = {family: REPO / "models" / f"tiny-{family.replace('_', '-')}" for family in ("llava", "llava_next",
                                                                                          "llava_onevision")}
QUESTION = {"conversations": [{"from": "human", "value": "<image>\nWhat color is the main object?"},
                              {"from": "gpt", "value": "red"}]}


def test_every_family_is_described_and_an_unknown_one_is_a_one_line_error():
    from transformers import Qwen2VLConfig

    assert sorted(FAMILIES) == sorted([*TINY_MODELS, "qwen2_5_vl", "qwen3_vl"])  # Qwen-VL: tests/test_qwen_vl.py
    with pytest.raises(UnsupportedBackbone, match=r"^model_type 'qwen2_vl' is not a supported backbone family; "
                                                  r"supported: llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl$"):
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
        raws = [{"json": json.dumps(QUESTION).encode(), "png": noise_png(size, seed)}
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


def test_held_out_generation_from_the_familys_embeddings_is_the_stock_models(family):
    """Held-out answers during training start ``generate`` from :meth:`TrainingModel.prefill_inputs`, the
    embeddings (the vision path run on every rank): on a padded batch of images of different tile counts
    and a text-only question, the tokens the stock model generates from its own inputs."""
    name, model, processor, stock = family
    prompts = [Prompt(question_turns("What color is it?", True), Image.open(io.BytesIO(noise_png(size, seed))))
               for seed, size in enumerate([(64, 48), (40, 90)])] + [Prompt(question_turns("How many sides?", False))]
    batch = PromptEncoder(processor, "crop", "processor", backbone=model.backbone)(prompts)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              **model.backbone.generation_inputs(stock, batch["input_ids"], {"pixel_values": batch["pixel_values"],
                                                                            "image_sizes": batch["image_sizes"]})}
    settings = {"max_new_tokens": 4, "do_sample": False, "use_cache": True, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        expected = stock.generate(**inputs, **settings)[:, batch["input_ids"].shape[1]:]
        start = model.prefill_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
        assert set(start) == {"inputs_embeds"}, f"{name}: {sorted(start)}"
        got = model.llava.generate(**start, attention_mask=batch["attention_mask"], **settings)
    assert torch.equal(got, expected), f"{name}: generation from mole's embeddings differs:\n{got}\n{expected}"


def real_7b_config(family: str):
    """The family's 7B checkpoint's config, values typed in from its config.json (nothing downloaded)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig,
                              Qwen2Config, SiglipVisionConfig)

    if family == "llava_onevision":  # llava-hf/llava-onevision-qwen2-7b-ov-hf
        text = Qwen2Config(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                    num_attention_heads=16, image_size=384, patch_size=14)
        pinpoints = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
        return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=151646,
                                    video_token_id=151647, image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096,
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
    projector += h if name != "llava" else 0  # image_newline
    expected = layers * (experts + router + attention) + projector
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(surgery.mole_layers) == layers == (28 if name == "llava_onevision" else 32), surgery.mole_layers[:3]
    assert len(surgery.lora_layers) == layers * len(attn), surgery.lora_layers[:3]
    assert trainable == expected, f"{name}: {trainable:,} trainable parameters, the sizes say {expected:,}"
    vision_trainable = [n for n, p in model.named_parameters() if p.requires_grad and backbone.vision_tower_prefix in n]
    assert not vision_trainable, vision_trainable[:3]


# ------------------------------------------------------------------------- 2-rank training per family

TRAINED_FAMILIES = ["llava_next", "llava_onevision"]  # LLaVA-1.5's own runs are tests/test_train_distributed.py's
TILING = {"llava_next": ["data.image_grid_pinpoints=[[56,56],[28,56]]"],
          "llava_onevision": ["data.image_grid_pinpoints=[[56,56],[28,56]]", "data.vision_aspect_ratio=anyres_max_2"]}
"""Limits other than the tiny models' own (which add [56, 28] and, for OneVision, anyres_max_1): 2x2 tiles
still, but a tall image is tiled otherwise, so serving must take the adapter's record."""
NEW_TOKENS = 3


@pytest.fixture(scope="module", params=TRAINED_FAMILIES)
def family_runs(request, tmp_path_factory):
    """The same data and seed under ZeRO-3 (every tensor partitioned) and ZeRO-2, with SGD and one
    sample per micro-batch on a shapes domain and a text-only domain: the ranks see text-only and
    image batches at different steps. The tile limits are the run's own (:data:`TILING`). The ZeRO-3 run
    also answers the shapes domain's held-out questions at its last step, a text-only one on rank 0 and
    one with an image on rank 1 (``val``). (The run that fails without ``image_newline`` gathered for
    generation is tests/test_heldout_metrics.py's.)"""
    name = request.param
    root = tmp_path_factory.mktemp(f"runs_{name}")
    text_shard = write_shard(root / "text" / "train-000000.tar",
                             [text_sample(f"t{i}", f"How many sides has shape {i}?", f"{3 + i % 4} sides") for i in range(40)])
    domains = (f'data.domains=[{{name: shapes, shards: "{REPO}/data_shards/shapes/train-{{000000..000001}}.tar"}},'
               f' {{name: text, shards: "{text_shard}"}}]')
    common = [f"model.name_or_path={TINY_MODELS[name]}", f"train.max_steps={STEPS}", "train.optimizer=sgd",
              "train.lr=0.05", "train.projector_lr=0.05", "train.micro_batch_size=1", "lora.dropout=0.0",
              "train.warmup_steps=0", "train.eval_every=0", "train.log_routing_every=0", "train.save_every=4", domains,
              *TILING[name]]
    val = write_shard(root / "val" / "val-000000.tar", [text_sample("v0", "How many sides has a square?", "4 sides"),
                                                         *read_shard_samples(REPO / "data_shards" / "shapes" / "val-000000.tar", 1)])
    heldout = [domains.replace('.tar"}, ', f'.tar", val_shards: "{val}"}}, ', 1), f"train.eval_every={STEPS}", "train.eval_batches=1",
               f"train.eval_max_new_tokens={NEW_TOKENS}"]
    zero3 = f"train.ds_config={REPO / 'ds_configs' / 'zero3_partition_all.json'}"
    runs = {stage: root / stage for stage in ("zero3", "zero2", "resumed")}
    launch_trainings_together({runs["zero3"]: [zero3, *common, *heldout],
                               runs["zero2"]: [f"train.ds_config={REPO / 'ds_configs' / 'zero2.json'}", *common]})
    launch_trainings_together({runs["resumed"]: [zero3, *common, f"train.resume={runs['zero3']}/checkpoints/step_4"]})
    return name, runs


@pytest.mark.distributed
def test_family_trains_under_zero3_as_under_zero2_with_text_only_batches_beside_image_ones(family_runs):
    name, runs = family_runs
    z3, z2 = runs["zero3"], runs["zero2"]
    mixed = [a["images"] != b["images"] for a, b in zip(step_records(z3, 0), step_records(z3, 1))]
    assert any(mixed), f"{name}: no step had one rank text-only and the other with an image: precondition unmet"
    for rank in (0, 1):
        assert len(step_records(z3, rank)) == len(step_records(z2, rank)) == STEPS
        for a, b in zip(step_records(z3, rank), step_records(z2, rank)):
            assert a["expert_load"] == b["expert_load"], f"{name}: routing differs at step {a['step']} rank {rank}"
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), f"{name}: loss at step {a['step']} rank {rank}"
    w3, w2 = (load_file(out / "adapter" / "adapter.safetensors") for out in (z3, z2))
    assert w3.keys() == w2.keys()
    moved = 0
    for key in w3:
        torch.testing.assert_close(w3[key], w2[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}, ZeRO-3 != ZeRO-2")
        moved += "lora_B" in key and w3[key].abs().sum() > 0
    assert moved > 0, "training did not move the LoRA B matrices: nothing was compared"
    assert json.loads((z3 / "adapter" / "mole_config.json").read_text())["family"] == name


@pytest.mark.distributed
def test_held_out_answers_under_zero3_are_launch_eval_pys(family_runs):
    """Generation during training (ranks in step, one with a text-only question and one with an image,
    ``image_newline`` gathered around the embedding) answers as :func:`mole.evaluate.evaluate`, the path of
    ``launch/eval.py``, answers with the saved adapter on the same questions."""
    name, runs = family_runs
    logged = [json.loads(line) for line in (runs["zero3"] / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/normalized_match/shapes" in line for line in logged), f"{name}: no held-out metric logged"
    answers = logged_heldout_answers(runs["zero3"])
    val = runs["zero3"].parent / "val" / "val-000000.tar"
    assert len(answers) == 2 and ("v0", 0) in answers, f"{name}: held-out answers logged: {answers}"
    expected = evaluated_answers(TINY_MODELS[name], runs["zero3"], "shapes", val, NEW_TOKENS)
    assert answers == expected, f"{name}: held-out answers {answers}, launch/eval.py's {expected}"


@pytest.mark.distributed
def test_family_run_resumes_from_a_zero3_checkpoint(family_runs):
    name, runs = family_runs
    resumed = runs["resumed"]
    starts = [r for r in read_rank_log(resumed, 0) if r.get("event") == "start"]
    assert [s["from_step"] for s in starts] == [4], f"{name}: expected one start from step 4: {starts}"
    for rank in (0, 1):
        steps = [r["step"] for r in step_records(resumed, rank)]
        assert steps == list(range(5, STEPS + 1)), f"{name}: rank {rank} resumed steps {steps}"
    assert json.loads((resumed / "done.json").read_text())["step"] == STEPS
    weights = load_file(resumed / "adapter" / "adapter.safetensors")
    assert weights.keys() == load_file(runs["zero3"] / "adapter" / "adapter.safetensors").keys()


@pytest.mark.distributed
def test_trained_family_adapter_evaluates_per_domain_with_the_eval_cli(family_runs, tmp_path, capsys):
    name, runs = family_runs
    text_shard = runs["zero3"].parent / "text" / "train-000000.tar"
    args = ["--adapter", str(runs["zero3"] / "adapter"), "--out", str(tmp_path / "eval"), "--max-samples", "3",
            "--max-new-tokens", "3", "--shards", f"shapes={REPO}/data_shards/shapes/val-000000.tar", "--shards", f"text={text_shard}"]
    code = launch_module("eval").main(args)
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    for domain, expected in (("shapes", 3), ("text", 3), ("all", 6)):
        assert domain in rows, f"{name}: no table row for {domain}:\n{stdout}"
        samples, loss = int(rows[domain][1]), float(rows[domain][3])
        assert samples == expected and 0 < loss < 20, f"{name} {domain}: {samples} samples, loss {loss}"


@pytest.mark.distributed
def test_trained_family_adapter_loads_and_answers_with_images_prepared_as_in_training(family_runs):
    from mole.inference import Prompt, PromptEncoder, generate_answers, load_model, load_processor
    from mole.data.conversation import Turn

    name, runs = family_runs
    adapter = str(runs["zero3"] / "adapter")
    model = load_model(str(TINY_MODELS[name]), adapter)
    assert type(model).__name__ == backbone_for(model.config).model_class_name
    image = model.mole_spec.image
    assert image.image_grid_pinpoints == ((56, 56), (28, 56)) and model.config.image_grid_pinpoints == [[56, 56], [28, 56]], \
        f"{name}: the adapter records {image}, the model tiles by {model.config.image_grid_pinpoints}"
    assert name != "llava_onevision" or model.config.vision_aspect_ratio == image.vision_aspect_ratio == "anyres_max_2"
    processor, directory = load_processor(str(TINY_MODELS[name]), adapter_dir=adapter), load_processor(str(TINY_MODELS[name]))
    images = [Image.open(io.BytesIO(noise_png(size, seed))) for seed, size in enumerate([(64, 48), (30, 90)])]
    tall = [PromptEncoder(p, "crop", backbone=backbone_for(model.config)).pixels(images[1]).shape[0]
            for p in (processor, directory)]
    assert tall == [5, 3], f"{name}: a 30x90 image's tiles by the adapter's pinpoints ([56, 56]) and the directory's: {tall}"
    prompts = [Prompt([Turn("user", "<image>\nWhat shape is it?")], image) for image in images]
    prompts.append(Prompt([Turn("user", "How many sides has a square?")]))
    with pytest.raises(ValueError, match="the processor prepares images with image_grid_pinpoints"):
        generate_answers(model, directory, prompts, max_new_tokens=1)
    answers = generate_answers(model, processor, prompts, max_new_tokens=4, batch_size=3)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers), answers


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_plain_lora_adapter_of_a_family_exports_to_peft_and_merged_with_our_logits(name, tmp_path):
    """K=1: mole.load_model, peft's LoRA on the stock class and the merged export give the same logits."""
    from peft import PeftModel

    from mole.adapter import gather_trainable_state, save_adapter
    from mole.export import export_merged, export_peft
    from mole.inference import load_model

    cfg = load_config(str(TINY_CONFIG), [f"model.name_or_path={TINY_MODELS[name]}", "mole.num_experts=1",
                                          "lora.dropout=0.0", "train.train_projector=false"])
    trained, _, processor = build_mole_model(cfg, torch.float32)
    torch.manual_seed(3)
    for param_name, param in trained.named_parameters():  # B starts at zero: make the adapter matter
        if param.requires_grad and "lora_B" in param_name:
            torch.nn.init.normal_(param, std=0.2)
    save_adapter(str(tmp_path / "adapter"), gather_trainable_state(trained), trained.mole_spec)
    export_peft(str(tmp_path / "adapter"), str(tmp_path / "peft"))
    ours = load_model(str(TINY_MODELS[name]), str(tmp_path / "adapter"))
    stock_class = backbone_for(ours.config).model_class
    peft_model = PeftModel.from_pretrained(stock_class.from_pretrained(TINY_MODELS[name]), str(tmp_path / "peft")).eval()
    base = stock_class.from_pretrained(TINY_MODELS[name]).eval()
    raws = [{"json": json.dumps(QUESTION).encode(), "png": noise_png(size, seed)}
            for seed, size in enumerate([(64, 48), (40, 90)])]
    inputs = stock_inputs(processor, raws)
    with torch.no_grad():
        expected, got, unadapted = (model(**inputs).logits for model in (peft_model, ours, base))
    mask = inputs["attention_mask"].bool()
    assert (got - unadapted)[mask].abs().max() > 1e-3, "precondition: the adapter changes the logits"
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5, msg=f"{name}: K=1 != peft LoRA")
    export_merged(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = stock_class.from_pretrained(tmp_path / "merged").eval()
    reloaded = backbone_for(merged.config).load_processor(str(tmp_path / "merged"))
    assert torch.equal(stock_inputs(reloaded, raws)["input_ids"], inputs["input_ids"]), "the merged processor differs"
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits[mask], got[mask], rtol=1e-4, atol=1e-4, msg=f"{name}: merged != K=1 LoRA")
