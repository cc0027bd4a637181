"""Non-finite gradients and weights in real 2-rank DeepSpeed runs: no update, checkpoint, adapter or
``done.json`` ever holds a NaN, and the ranks agree even when only one of them sees it.

The NaN gradients come from tests/nan_gradient_run.py (one element, one rank, one step: the loss
stays finite); the non-finite weights from a real learning rate far too high.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (REPO, TINY_CONFIG, cli_env, free_port, python, read_rank_log, run_group, step_records,
                           training_command)

QUIET = ["train.eval_every=0", "train.log_routing_every=0", "train.warmup_steps=0"]


def nan_gradient_command(output_dir: Path, nan_step: int, nan_rank: int, *overrides: str, loss_step: int = 0) -> list[str]:
    return [python(), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            str(REPO / "tests" / "nan_gradient_run.py"), str(nan_step), str(nan_rank), str(loss_step), "--config",
            str(TINY_CONFIG), f"output_dir={output_dir}", *QUIET, *overrides]


def local_events(output_dir: Path, rank: int, key: str) -> dict[int, object]:
    """What tests/nan_gradient_run.py logged of this rank's own share, by step."""
    return {r["at"]: r[key] for r in read_rank_log(output_dir, rank) if r.get("event") == "local" and key in r}


def assert_finite_adapter(output_dir: Path) -> dict:
    weights = load_file(output_dir / "adapter" / "adapter.safetensors")
    bad = [key for key, value in weights.items() if not torch.isfinite(value).all()]
    assert weights and not bad, f"the adapter holds non-finite tensors: {bad}"
    return weights


def committed_checkpoints(output_dir: Path) -> list[str]:
    root = output_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "complete.json").exists())


def zero(name: str) -> str:
    return f"train.ds_config={REPO / 'ds_configs' / name}"


@pytest.mark.distributed
def test_nonfinite_gradients_on_one_rank_skip_the_update_on_both_under_zero3(tmp_path):
    """Rank 0 makes a NaN that only rank 1's gradient partition holds: both ranks skip step 3's
    update (the weights do not move), count and log it, and the run finishes with a finite adapter.

    At step 2 rank 0's first micro-batch has a NaN loss: both ranks drop theirs and draw another, and
    every micro-batch the window trains is normalised by the answer tokens the window trains on both
    ranks, the replacements' counted and the dropped ones' not."""
    cmd = nan_gradient_command(tmp_path, 3, 0, "train.on_nonfinite=skip", "train.max_steps=4", "train.save_every=2",
                               "train.grad_accum=2", zero("zero3_partition_all.json"), loss_step=2)
    proc = run_group(cmd, 300, env=cli_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "non-finite loss at step 2 on some rank: micro-batch skipped on all ranks" in output, output[-3000:]
    forwards = [[r for r in read_rank_log(tmp_path, rank) if r.get("event") == "local" and "normaliser" in r]
                for rank in (0, 1)]
    for step in (1, 2, 3, 4):
        mine = [[r for r in f if r["at"] == step] for f in forwards]
        assert [len(m) for m in mine] == ([3, 3] if step == 2 else [2, 2]), f"forwards at step {step}: {mine}"
        assert [m[0]["poisoned"] for m in mine] == [step == 2, False], mine
        trained = [m[1:] if step == 2 else m for m in mine]  # step 2: the first forward's micro-batches were dropped
        tokens = sum(r["answer_tokens"] for m in trained for r in m)
        for r in (r for m in trained for r in m):
            assert r["normaliser"] * 2 * 2 == pytest.approx(tokens), (
                f"step {step}: the LM loss sum was divided by {r['normaliser']} x grad_accum x ranks, but the window "
                f"trained {tokens} answer tokens (forwards {mine})")
        if step == 2:
            dropped, replacement = (sum(m[i]["answer_tokens"] for m in mine) for i in (0, 1))
            assert dropped != replacement, f"precondition: replacements with the dropped ones' token count: {mine}"
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r.get("train/skipped_nonfinite_steps") for r in metrics if "train/loss" in r}
    assert logged == {1: 0, 2: 0, 3: 1, 4: 0}, f"step 3's update must be logged as skipped: {logged}"
    assert "non-finite gradients at step 3" in output, output[-3000:]
    for rank in (0, 1):
        skipped = {r["step"]: r.get("skipped_nonfinite_steps") for r in step_records(tmp_path, rank)}
        assert skipped == {1: 0, 2: 0, 3: 1, 4: 0}, f"rank {rank} must count step 3's update as skipped: {skipped}"
        checksum = local_events(tmp_path, rank, "weights_checksum")
        assert checksum[3] == checksum[2], f"rank {rank}: step 3's update was applied: {checksum}"
        assert checksum[4] != checksum[3] and math.isfinite(checksum[4]), f"rank {rank}: step 4 must train: {checksum}"
    seen = [local_events(tmp_path, rank, "gradients_finite") for rank in (0, 1)]
    assert [s.get(3) for s in seen] == [True, False], f"precondition: only rank 1 holds the NaN after reduction: {seen}"
    assert all(s[step] for s in seen for step in (1, 2, 4)), seen
    assert (tmp_path / "done.json").exists(), "a run that skipped an update still finishes"
    assert_finite_adapter(tmp_path)


@pytest.mark.distributed
def test_nonfinite_gradients_or_weights_stop_before_any_save_under_zero2(tmp_path):
    """``stop``: rank 0's NaN, held by rank 1 only, stops both ranks at step 3 before the update, with
    steps 1 and 2 checkpointed (keep 2). Resumed with a learning rate that makes step 3's weights
    infinite, the run stops naming step 3 even under ``skip``: the checkpoints, ``latest`` and the
    adapter stay those of step 2, and there is no ``done.json``."""
    common = [zero("zero2.json"), "train.save_every=1", "train.keep_checkpoints=2", "train.max_steps=5"]
    proc = run_group(nan_gradient_command(tmp_path, 3, 0, "train.on_nonfinite=stop", *common), 300, env=cli_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "non-finite gradients (with a finite loss) at step 3" in proc.stderr, proc.stderr[-3000:]
    seen = [local_events(tmp_path, rank, "gradients_finite") for rank in (0, 1)]
    assert [s.get(3) for s in seen] == [True, False], f"precondition: only rank 1 holds the NaN after reduction: {seen}"
    assert [len(step_records(tmp_path, rank)) for rank in (0, 1)] == [2, 2], "step 3 must not complete on any rank"
    assert committed_checkpoints(tmp_path) == ["step_1", "step_2"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert not (tmp_path / "done.json").exists()
    adapter = (tmp_path / "adapter" / "adapter.safetensors").read_bytes()
    assert_finite_adapter(tmp_path)

    cmd = training_command(tmp_path, "train.on_nonfinite=skip", "train.lr=1e300", "train.projector_lr=1e300",
                           *QUIET, *common)
    proc = run_group(cmd, 300, env=cli_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "resumed from" in output and "non-finite weights after the update of step 3" in proc.stderr, output[-3000:]
    assert committed_checkpoints(tmp_path) == ["step_1", "step_2"], "a checkpoint was written or pruned for step 3"
    assert not (tmp_path / "checkpoints" / "step_3").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert (tmp_path / "adapter" / "adapter.safetensors").read_bytes() == adapter, "the adapter was rewritten"
    assert not (tmp_path / "done.json").exists()


def test_a_nonfinite_adapter_is_refused_not_written(tmp_path):
    from mole.adapter import ADAPTER_WEIGHTS, save_adapter

    state = {"a.lora_A": torch.zeros(2, 3), "b.lora_B": torch.tensor([1.0, float("inf")]), "steps": torch.tensor([3])}
    with pytest.raises(FloatingPointError, match=r"non-finite values in 1 tensor\(s\) \(b\.lora_B\)"):
        save_adapter(str(tmp_path / "adapter"), state, spec=None)  # refused before the spec is read
    assert not (tmp_path / "adapter" / ADAPTER_WEIGHTS).exists()


def test_the_finite_check_sees_a_single_nan_or_inf_anywhere():
    from mole.train.finite import all_finite, any_rank

    assert all_finite([]) and all_finite([torch.ones(3), torch.zeros(2, 2)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensor = torch.ones(1000)
        tensor[-1] = bad
        assert not all_finite([torch.ones(3), tensor]), bad
    assert all_finite([torch.full((4,), 3e38)]), "large finite values are finite"
    assert any_rank(False, True) == [False, True], "without a process group the local flags are the answer"
