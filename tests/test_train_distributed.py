"""Real 2-rank DeepSpeed runs of the tiny model: routing modes, plain LoRA, ZeRO-3 == ZeRO-2.

The runs are session fixtures shared by the assertions (one launch costs 10-15 s before any work).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (REPO, TINY_MODEL, SHORT_RUN_STEPS as STEPS, launch_training, read_rank_log, run_group, step_records,
                           text_sample, training_command, write_shard)

pytestmark = pytest.mark.distributed



@pytest.fixture(scope="session")
def equivalence_runs(tmp_path_factory):
    """The same data and seed under ZeRO-3 (nothing kept whole) and ZeRO-2, with SGD.

    One domain is text-only, and with one sample per micro-batch the ranks see text-only and image
    batches at different steps, and route their different tokens differently.
    """
    root = tmp_path_factory.mktemp("equivalence")
    text_shard = write_shard(
        root / "text" / "train-000000.tar",
        [text_sample(f"t{i}", f"How many sides has shape {i}?", f"{3 + i % 4} sides") for i in range(40)],
    )
    zero3_path = REPO / "ds_configs" / "zero3_partition_all.json"
    zero3 = json.loads(zero3_path.read_text())["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_param_persistence_threshold"] == 0, "must partition every tensor"
    domains = (
        f'data.domains=[{{name: shapes, shards: "{REPO}/data_shards/shapes/train-{{000000..000001}}.tar"}},'
        f' {{name: text, shards: "{text_shard}"}}]'
    )
    common = [f"train.max_steps={STEPS}", "train.optimizer=sgd", "train.lr=0.05", "train.projector_lr=0.05",
              "train.micro_batch_size=1", "lora.dropout=0.0", "train.warmup_steps=0", domains]
    runs = {}
    for name, ds in {"zero3": zero3_path, "zero2": REPO / "ds_configs" / "zero2.json"}.items():
        out = root / name
        launch_training(out, f"train.ds_config={ds}", *common)
        runs[name] = out
    return runs


def assert_routing_differs_across_ranks(out):
    rank0, rank1 = step_records(out, 0), step_records(out, 1)
    assert len(rank0) == len(rank1) == STEPS, "both ranks must run every step"
    differs = [a["expert_load"] != b["expert_load"] for a, b in zip(rank0, rank1)]
    assert any(differs), "ranks routed identically; the test would not exercise divergent routing"


@pytest.mark.parametrize("mode", ["scaled", "hard", "dense"])
def test_routing_mode_trains_with_routing_differing_across_ranks(mode_runs, mode):
    out = mode_runs[mode]
    assert_routing_differs_across_ranks(out)
    config = json.loads((out / "adapter" / "mole_config.json").read_text())
    assert config["routing"] == mode and config["num_experts"] == 3
    losses = [r["loss"] for r in step_records(out, 0)]
    assert all(torch.isfinite(torch.tensor(losses))), losses


def test_plain_lora_run_has_no_router_and_no_aux_loss(mode_runs):
    out = mode_runs["lora"]
    weights = load_file(out / "adapter" / "adapter.safetensors")
    assert not any("router" in k for k in weights), "K=1 must not create routers"
    assert all(r["aux_loss"] == 0.0 for r in step_records(out, 0))
    expert_a = [v for k, v in weights.items() if k.endswith("experts.gate_proj.lora_A")]
    assert expert_a and all(v.shape[0] == 1 for v in expert_a)


def test_adapter_holds_every_trainable_tensor(mode_runs):
    weights = load_file(mode_runs["hard"] / "adapter" / "adapter.safetensors")
    kinds = {"experts": 0, "router": 0, "self_attn": 0, "multi_modal_projector": 0}
    for key in weights:
        for kind in kinds:
            kinds[kind] += kind in key
    assert all(kinds.values()), f"adapter is missing a kind of trainable tensor: {kinds}"
    start = read_rank_log(mode_runs["hard"], 0)[0]["parameters"]
    assert sum(v.numel() for v in weights.values()) == start["trainable"], "saved != trainable parameter count"


def test_zero3_partitions_the_model(equivalence_runs):
    start = read_rank_log(equivalence_runs["zero3"], 0)[0]
    counts = start["parameters"]
    assert counts["partitioned"] == counts["tensors"], f"ZeRO-3 kept some tensors whole: {counts}"
    layers = json.loads((TINY_MODEL / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert counts["zero3_leaf_modules"] == layers, f"every MoLE MLP should be a ZeRO-3 leaf module: {counts}"


def test_ranks_saw_text_only_and_image_batches_at_the_same_step(equivalence_runs):
    out = equivalence_runs["zero3"]
    mixed = [a["images"] != b["images"] for a, b in zip(step_records(out, 0), step_records(out, 1))]
    assert any(mixed), "no step had one rank text-only and the other with an image: precondition unmet"
    assert_routing_differs_across_ranks(out)


def test_zero3_equals_zero2_on_the_same_data(equivalence_runs):
    z3, z2 = equivalence_runs["zero3"], equivalence_runs["zero2"]
    for rank in (0, 1):
        for a, b in zip(step_records(z3, rank), step_records(z2, rank)):
            assert a["expert_load"] == b["expert_load"], f"routing differs at step {a['step']} rank {rank}"
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), f"loss at step {a['step']} rank {rank}"
    w3 = load_file(z3 / "adapter" / "adapter.safetensors")
    w2 = load_file(z2 / "adapter" / "adapter.safetensors")
    assert w3.keys() == w2.keys()
    base = load_file(TINY_MODEL / "model.safetensors")
    moved = 0
    for key in w3:
        torch.testing.assert_close(w3[key], w2[key], rtol=1e-4, atol=1e-6, msg=f"{key} differs between ZeRO-3 and ZeRO-2")
        moved += "lora_B" in key and w3[key].abs().sum() > 0
    assert moved > 0, "training did not move the LoRA B matrices: nothing was compared"
    assert base  # the base checkpoint stays untouched and loadable


@pytest.mark.distributed
def test_first_mole_mlp_trains_when_nothing_below_it_does(tmp_path):
    """No attention LoRA and a frozen projector: the first MoLE MLP's input carries no gradient of its
    own. ZeRO-3 (each MLP a leaf module) must still give that layer's experts the gradients ZeRO-2 gives."""
    common = ["train.max_steps=3", "train.optimizer=sgd", "train.lr=0.05", "train.warmup_steps=0", "lora.dropout=0.0",
              "train.eval_every=0", "train.log_routing_every=0", "lora.attn_targets=[]", "train.train_projector=false"]
    weights = {}
    for name in ("zero3_partition_all", "zero2"):
        launch_training(tmp_path / name, f"train.ds_config={REPO / 'ds_configs' / f'{name}.json'}", *common)
        weights[name] = load_file(tmp_path / name / "adapter" / "adapter.safetensors")
    first = [key for key in weights["zero2"] if ".layers.0." in key and "lora_B" in key]
    assert first and all(weights["zero2"][key].abs().sum() > 0 for key in first), "layer 0's experts did not train"
    for key, value in weights["zero2"].items():
        torch.testing.assert_close(weights["zero3_partition_all"][key], value, rtol=1e-4, atol=1e-6, msg=f"{key}: ZeRO-3 != ZeRO-2")


def test_skipped_nonfinite_micro_batches_keep_the_ranks_in_step_under_zero3(tmp_path):
    """With ``train.on_nonfinite=skip`` a non-finite loss makes a forward without a backward on every
    rank. Under ZeRO-3 with every tensor partitioned, the ranks must keep issuing matching gathers
    through such forwards (a learning rate of 1e30 makes every loss after the first step non-finite)
    and stop together after the limit in a row, saying so, instead of hanging."""
    from mole.train.trainer import MAX_NONFINITE_IN_A_ROW

    cmd = training_command(tmp_path, "train.on_nonfinite=skip", "train.lr=1e30", "train.grad_clip=0",
                           "train.optimizer=sgd", "train.max_steps=6", "train.eval_every=0",
                           f"train.ds_config={REPO / 'ds_configs' / 'zero3_partition_all.json'}")
    proc = run_group(cmd, 300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    message = f"{MAX_NONFINITE_IN_A_ROW} non-finite micro-batches in a row at step 2"
    assert message in output, f"the ranks must stop on the same micro-batch, saying so:\n{output[-3000:]}"
    assert [len(step_records(tmp_path, rank)) for rank in (0, 1)] == [1, 1], "the first step trains on both ranks"
