"""Real 2-rank DeepSpeed runs of the tiny Qwen2.5-VL and Qwen3-VL: ZeRO-3 == ZeRO-2 with a text-only domain,
and held-out answers generated under ZeRO-3 as ``launch/eval.py`` generates them.

Per family, one pair of launches started together and one resumed launch serve every assertion here
(a launch costs about half a minute of start-up on 2 cores before any work).
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig

from mole.backbones import backbone_for
from mole.evaluate import EvalDomain, evaluate
from mole.export import export_mole
from mole.inference import load_model, load_processor

from tests.helpers import (REPO, evaluated_answers, launch_training, launch_trainings_together, logged_heldout_answers,
                           read_rank_log, step_records, text_sample, write_shard)

pytestmark = pytest.mark.distributed

STEPS = 6
MODELS = {"qwen2_5_vl": REPO / "models" / "tiny-qwen2-5-vl", "qwen3_vl": REPO / "models" / "tiny-qwen3-vl"}
PROJECTOR = {"qwen2_5_vl": ("visual.merger.",), "qwen3_vl": ("visual.merger.", "visual.deepstack_merger_list.")}
SIZES = [(64, 48), (130, 60), (100, 100), (40, 90)]  # (width, height): each takes its own number of image tokens
MAX_PIXELS = {"qwen2_5_vl": 12 * 28**2, "qwen3_vl": 12 * 32**2}
"""12 image tokens at most, below the tiny models' own 16: the adapter must carry it to evaluation."""
NEW_TOKENS = 8


def image_sample(key: str, size: tuple[int, int], seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    conversation = [{"from": "human", "value": "<image>\nWhat color is the main object?"},
                    {"from": "gpt", "value": ["red", "green", "blue"][seed % 3]}]
    return {"__key__": key, "json": {"conversations": conversation}, "png": buffer.getvalue()}


@pytest.fixture(scope="session", params=sorted(MODELS))
def qwen_runs(request, tmp_path_factory):
    """(family, {"zero3": dir, "zero2": dir, "resumed": dir}): the same data and seed under ZeRO-3 (nothing
    kept whole) and ZeRO-2, SGD, one sample per micro-batch; one domain of images of four sizes, one
    text-only. The ZeRO-3 run also answers the images domain's held-out questions at its last step: a
    text-only one and one with an image on rank 0, two with images on rank 1 (``val``)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"equivalence_{family}")
    images = write_shard(root / "images" / "train-000000.tar",
                         [image_sample(f"i{i}", SIZES[i % len(SIZES)], i) for i in range(24)])
    text = write_shard(root / "text" / "train-000000.tar",
                       [text_sample(f"t{i}", f"How many sides has shape {i}?", f"{3 + i % 4} sides") for i in range(24)])
    val = write_shard(root / "val" / "val-000000.tar", [text_sample("v0", "How many sides has a square?", "4 sides"),
                                                         *(image_sample(f"v{i}", SIZES[i], 6 + i) for i in (1, 2, 3))])
    domains = f'data.domains=[{{name: images, shards: "{images}"}}, {{name: text, shards: "{text}"}}]'
    heldout = (f'data.domains=[{{name: images, shards: "{images}", val_shards: "{val}"}}, {{name: text, shards: "{text}"}}]',
               f"train.eval_every={STEPS}", "train.eval_batches=2", f"train.eval_max_new_tokens={NEW_TOKENS}")
    common = [f"model.name_or_path={MODELS[family]}", "data.image_aspect=crop", f"train.max_steps={STEPS}",
              f"data.max_pixels={MAX_PIXELS[family]}",
              "train.optimizer=sgd", "train.lr=0.01", "train.projector_lr=0.01", "train.micro_batch_size=1",
              "lora.dropout=0.0", "train.warmup_steps=0", "train.eval_every=0", "train.log_routing_every=0",
              "train.train_projector=true", domains]
    runs = {name: root / name for name in ("zero3", "zero2")}
    launch_trainings_together({runs[name]: [f"train.ds_config={REPO / 'ds_configs' / ds}", *common, *extra]
                               for name, ds, extra in (("zero3", "zero3_partition_all.json", heldout),
                                                       ("zero2", "zero2.json", ()))})
    runs["resumed"] = root / "resumed"  # the ZeRO-3 run's last checkpoint, two steps further in a new directory
    launch_training(runs["resumed"], f"train.ds_config={REPO / 'ds_configs' / 'zero3_partition_all.json'}",
                    *common, f"train.resume={runs['zero3'] / 'checkpoints' / f'step_{STEPS}'}", f"train.max_steps={STEPS + 2}")
    return family, runs


def test_zero3_partitions_every_tensor_and_ranks_mix_text_only_and_image_batches(qwen_runs):
    family, runs = qwen_runs
    counts = read_rank_log(runs["zero3"], 0)[0]["parameters"]
    assert counts["partitioned"] == counts["tensors"], f"{family}: ZeRO-3 kept some tensors whole: {counts}"
    rank0, rank1 = step_records(runs["zero3"], 0), step_records(runs["zero3"], 1)
    assert len(rank0) == len(rank1) == STEPS, f"{family}: both ranks must run every step"
    mixed = [a["images"] != b["images"] for a, b in zip(rank0, rank1)]
    assert any(mixed), f"{family}: no step had one rank text-only and the other with an image: precondition unmet"


def test_zero3_equals_zero2_on_the_same_data(qwen_runs):
    family, runs = qwen_runs
    for rank in (0, 1):
        for a, b in zip(step_records(runs["zero3"], rank), step_records(runs["zero2"], rank)):
            assert a["expert_load"] == b["expert_load"], f"{family}: routing differs at step {a['step']} rank {rank}"
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), f"{family}: loss at step {a['step']} rank {rank}"
    w3 = load_file(runs["zero3"] / "adapter" / "adapter.safetensors")
    w2 = load_file(runs["zero2"] / "adapter" / "adapter.safetensors")
    assert w3.keys() == w2.keys()
    moved = 0
    for key in w3:
        torch.testing.assert_close(w3[key], w2[key], rtol=1e-4, atol=1e-6,
                                   msg=f"{family}: {key} differs between ZeRO-3 and ZeRO-2")
        moved += "lora_B" in key and bool(w3[key].abs().sum() > 0)
    assert moved > 0, f"{family}: training did not move the LoRA B matrices: nothing was compared"


def test_the_adapter_holds_the_mergers_and_they_trained(qwen_runs):
    """The projector is the patch merger (and Qwen3-VL's DeepStack mergers): saved, and moved by training."""
    family, runs = qwen_runs
    weights = load_file(runs["zero3"] / "adapter" / "adapter.safetensors")
    base = backbone_for(AutoConfig.from_pretrained(MODELS[family])).model_class.from_pretrained(MODELS[family]).state_dict()
    for prefix in PROJECTOR[family]:
        saved = {key: value for key, value in weights.items() if prefix in key}
        assert saved, f"{family}: no {prefix} weights in the adapter"
        assert any(not torch.equal(value, base[key]) for key, value in saved.items()), f"{family}: {prefix} did not train"
    assert not any("visual.blocks." in key for key in weights), f"{family}: the vision tower must stay frozen"
    recorded = json.loads((runs["zero3"] / "adapter" / "mole_config.json").read_text())
    assert recorded["family"] == family and recorded["train_projector"] is True


def test_a_resumed_run_continues_from_the_checkpoint(qwen_runs):
    family, runs = qwen_runs
    records = step_records(runs["resumed"], 0)
    assert [r["step"] for r in records] == [STEPS + 1, STEPS + 2], f"{family}: resumed steps {[r['step'] for r in records]}"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    before = load_file(runs["zero3"] / "adapter" / "adapter.safetensors")
    after = load_file(runs["resumed"] / "adapter" / "adapter.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before), \
        f"{family}: the resumed run did not continue training the checkpoint's adapter"


def test_the_checkpoint_exports_to_the_adapter_and_loads_for_evaluation(qwen_runs, tmp_path):
    """export --format mole from the DeepSpeed checkpoint equals the saved adapter; load_model + evaluate use it."""
    family, runs = qwen_runs
    export_mole(str(runs["zero3"]), str(tmp_path / "exported"))
    saved = load_file(runs["zero3"] / "adapter" / "adapter.safetensors")
    exported = load_file(tmp_path / "exported" / "adapter.safetensors")
    assert saved.keys() == exported.keys()
    for key in saved:
        torch.testing.assert_close(exported[key], saved[key], rtol=0, atol=0, msg=f"{family}: {key}")
    shard = next((runs["zero3"].parent / "images").glob("*.tar"))
    model = load_model(str(MODELS[family]), str(tmp_path / "exported"))
    recorded = model.mole_spec.image
    directory_min = load_processor(str(MODELS[family])).image_processor.size["shortest_edge"]
    assert (recorded.min_pixels, recorded.max_pixels) == (directory_min, MAX_PIXELS[family]), \
        f"{family}: the adapter records {recorded}, trained with the directory's min_pixels and data.max_pixels"
    with pytest.raises(ValueError, match=r"prepares images with max_pixels .* but the adapter was trained with"):
        evaluate(model, load_processor(str(MODELS[family])), [EvalDomain("images", [str(shard)])], max_samples=1)
    processor = load_processor(str(MODELS[family]), adapter_dir=str(tmp_path / "exported"))
    assert processor.image_processor.size["longest_edge"] == MAX_PIXELS[family]
    results = evaluate(model, processor, [EvalDomain("images", [str(shard)])],
                       batch_size=4, max_new_tokens=2, max_samples=4)
    images = results["domains"]["images"]
    assert images["samples"] == 4 and images["loss"] is not None and images["loss"] < 20, f"{family}: {images}"
    assert results["routing"]["num_experts"] == 3


def test_held_out_answers_under_zero3_are_launch_eval_pys(qwen_runs, tmp_path):
    """Generation during training (ranks in step, one with a text-only question, one with an image,
    the model numbering its own M-RoPE positions) answers as :func:`mole.evaluate.evaluate`, the path of
    ``launch/eval.py``, answers with the saved adapter on the same questions."""
    family, runs = qwen_runs
    logged = [json.loads(line) for line in (runs["zero3"] / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/normalized_match/images" in line for line in logged), f"{family}: no held-out metric logged"
    answers = logged_heldout_answers(runs["zero3"])
    assert sorted(answers) == [(f"v{i}", 0) for i in range(4)], f"{family}: held-out answers logged: {answers}"
    assert any(answers.values()), f"{family}: every held-out answer is empty: nothing was compared"
    val = next((runs["zero3"].parent / "val").glob("*.tar"))
    expected = evaluated_answers(MODELS[family], runs["zero3"], "images", val, NEW_TOKENS)
    assert answers == expected, f"{family}: held-out answers {answers}, launch/eval.py's {expected}"
