"""Real 2-rank runs of the tiny models: packed batches under ZeRO-3 equal ZeRO-2 for every family (the
Qwen-VL ones number each packed sample's M-RoPE positions on their own), and the LM loss of
``grad_accum`` micro-batches equals one batch of their size (the loss is the global batch's mean).

All sixteen runs share one launch (``tests/several_runs.py``): the ranks start once.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (REPO, free_port, logged_heldout_answers, python, run_group, step_records, text_sample,
                           write_shard)

pytestmark = pytest.mark.distributed
STEPS = 3
FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl"]  # each family's tiny model, packed


@pytest.fixture(scope="session")
def packing_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    words = "how many sides has the shape with this many corners when drawn on paper".split()
    text_shard = write_shard(root / "text" / "train-000000.tar", [
        text_sample(f"t{i}", " ".join(words[: 2 + i % 12]), " ".join(words[i % 5 : i % 5 + 1 + i % 9])) for i in range(40)])
    domains = (f'data.domains=[{{name: shapes, shards: "{REPO}/data_shards/shapes/train-{{000000..000001}}.tar"}},'
               f' {{name: text, shards: "{text_shard}"}}]')
    zero3, zero2 = (f"train.ds_config={REPO / 'ds_configs' / name}.json" for name in ("zero3_partition_all", "zero2"))
    packed = ["data.packing=packed", "train.micro_batch_size=1", "train.grad_accum=2", "data.max_length=160"]
    plain = ["train.grad_clip=0", "mole.aux_weight=0", zero2]
    runs = {"zero3_packed": [zero3, *packed], "zero2_packed": [zero2, *packed]}
    for family in FAMILIES[1:]:
        model = [f"model.name_or_path={REPO / 'models' / ('tiny-' + family.replace('_', '-'))}"]
        model += ["data.image_aspect=crop"] if family.startswith("qwen") else []  # as Qwen takes images
        runs |= {f"{family}_zero3_packed": [zero3, *packed, *model], f"{family}_zero2_packed": [zero2, *packed, *model]}
    # routing domain, packed: each token's expert comes from its sample's domain through sample_ids; the
    # held-out loss and answers at the last step route each domain's samples to its own expert
    val = (f'data.domains=[{{name: shapes, shards: "{REPO}/data_shards/shapes/train-{{000000..000001}}.tar", '
           f'val_shards: "{REPO}/data_shards/shapes/val-000000.tar"}}, {{name: text, shards: "{text_shard}", '
           f'val_shards: "{text_shard}"}}]')
    by_domain = [*packed, "mole.routing=domain", "mole.num_experts=2", val, f"train.eval_every={STEPS}",
                 "train.eval_batches=1", "train.eval_max_new_tokens=3"]
    runs |= {"domain_zero3_packed": [zero3, *by_domain], "domain_zero2_packed": [zero2, *by_domain]}
    # routed by each sample's tokens so far: packed samples apart in training, and the held-out answers of the
    # last step generated with a KV cache on every rank in step (ZeRO-3's synced generation)
    by_prefix = [*packed, "mole.router_input=prefix_mean", val, f"train.eval_every={STEPS}", "train.eval_batches=1",
                 "train.eval_max_new_tokens=3"]
    runs |= {"prefix_zero3_packed": [zero3, *by_prefix], "prefix_zero2_packed": [zero2, *by_prefix]}
    runs |= {
        "accum2": [*plain, "train.micro_batch_size=2", "train.grad_accum=2"],
        "batch4": [*plain, "train.micro_batch_size=4", "train.grad_accum=1"],
    }
    common = ["--config", str(REPO / "launch" / "configs" / "tiny.yaml"), f"train.max_steps={STEPS}",
              "train.optimizer=sgd", "train.lr=0.05", "train.projector_lr=0.05", "lora.dropout=0.0",
              "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "train.log_routing_every=0", domains]
    cmd = [python(), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "several_runs.py"), str(root), json.dumps(runs), *common]
    proc = run_group(cmd, 420)
    assert proc.returncode == 0, f"runs failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {name: root / name for name in runs}


def assert_same_adapter(a, b, what: str) -> None:
    wa, wb = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    assert wa.keys() == wb.keys()
    base = [v for k, v in wa.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in base), "training did not move the LoRA B matrices: nothing was compared"
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=f"{key}: {what}")


def same_steps(z3, z2, what: str) -> list[tuple[dict, dict]]:
    """Every step of both ranks of a packed ZeRO-3 run and its ZeRO-2 twin: several samples per row, the same
    routing and the same loss. Returns the (ZeRO-3, ZeRO-2) step records, for checks of their own."""
    pairs = []
    for rank in (0, 1):
        records = step_records(z3, rank)
        assert len(records) == STEPS and all(r["samples"] > 2 for r in records), f"{what}: rows must hold several samples"
        for a, b in zip(records, step_records(z2, rank)):
            assert a["expert_load"] == b["expert_load"], f"{what}: routing differs at step {a['step']} rank {rank}"
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), f"{what}: loss at step {a['step']} rank {rank}"
            pairs.append((a, b))
    return pairs


def test_packed_rows_hold_different_numbers_of_samples_on_the_two_ranks(packing_runs):
    rank0, rank1 = (step_records(packing_runs["zero3_packed"], rank) for rank in (0, 1))
    assert len(rank0) == len(rank1) == STEPS
    assert any(a["samples"] != b["samples"] for a, b in zip(rank0, rank1)), "ranks packed the same sample counts"
    assert all(r["samples"] > 2 * 1 for r in rank0), "a packed micro-batch row should hold several samples"
    assert all(r["tokens"] <= r["slots"] <= 2 * 160 for r in rank0 + rank1), "rows exceed data.max_length"


@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_with_packing_equals_zero2(packing_runs, family):
    prefix = "" if family == "llava" else f"{family}_"
    z3, z2 = packing_runs[f"{prefix}zero3_packed"], packing_runs[f"{prefix}zero2_packed"]
    same_steps(z3, z2, family)
    assert any(r["images"] for rank in (0, 1) for r in step_records(z3, rank)), f"{family}: no step packed an image"
    assert json.loads((z3 / "adapter" / "mole_config.json").read_text())["family"] == family
    assert_same_adapter(z3, z2, f"{family}: packed ZeRO-3 != packed ZeRO-2")


def test_two_accumulated_micro_batches_train_as_one_batch_of_their_size(packing_runs):
    """aux weight 0: the LM loss alone, which is the mean over the global batch's answer tokens."""
    accum, whole = packing_runs["accum2"], packing_runs["batch4"]
    assert [r["samples"] for r in step_records(accum, 0)] == [r["samples"] for r in step_records(whole, 0)] == [4] * STEPS
    for a, b in zip(step_records(accum, 0), step_records(whole, 0)):
        assert a["domains"] == b["domains"], "the two runs must draw the same samples"
    metrics = [json.loads(line) for line in (accum / "metrics.jsonl").read_text().splitlines()]
    whole_metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(metrics, whole_metrics):
        if "train/lm_loss" in a:
            assert a["train/lm_loss"] == pytest.approx(b["train/lm_loss"], rel=1e-5), f"step {a['step']} LM loss"
    assert_same_adapter(accum, whole, "grad_accum=2 of 2 samples != 1 micro-batch of 4")


def test_domain_routing_under_zero3_equals_zero2_with_every_domain_on_its_own_expert(packing_runs):
    z3, z2 = packing_runs["domain_zero3_packed"], packing_runs["domain_zero2_packed"]
    for a, _ in same_steps(z3, z2, "routing domain"):
        assert a["aux_loss"] == 0.0, "routing domain has no router to balance"
        for expert, domain in enumerate(["shapes", "text"]):  # every layer: tokens on an expert iff its domain drew some
            assert all((load[expert] > 0) == (domain in a["domains"]) for load in a["expert_load"]), (a["domains"], a["expert_load"])
    assert any(len(r["domains"]) == 2 for r in step_records(z3, 0)), "no packed micro-batch mixed the two domains"
    spec = json.loads((z3 / "adapter" / "mole_config.json").read_text())
    assert spec["routing"] == "domain" and spec["domains"] == ["shapes", "text"], spec
    weights = load_file(z3 / "adapter" / "adapter.safetensors")
    assert not any("router" in key for key in weights), "routing domain trains no router"
    evals = [json.loads(line) for line in (z3 / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in evals if "eval/loss/text" in r]
    assert held and "eval/normalized_match/shapes" in held[-1], f"no held-out loss and answers per domain: {evals[-1]}"
    assert_same_adapter(z3, z2, "routing domain: packed ZeRO-3 != packed ZeRO-2")


def test_prefix_routing_under_zero3_equals_zero2_in_training_and_in_held_out_answers(packing_runs):
    z3, z2 = packing_runs["prefix_zero3_packed"], packing_runs["prefix_zero2_packed"]
    same_steps(z3, z2, "prefix_mean")
    assert_same_adapter(z3, z2, "prefix_mean: packed ZeRO-3 != packed ZeRO-2")
    answers = logged_heldout_answers(z3)
    assert answers and answers == logged_heldout_answers(z2), "held-out answers differ between ZeRO-3 and ZeRO-2"
    assert json.loads((z3 / "adapter" / "mole_config.json").read_text())["router_input"] == "prefix_mean"
