"""Checkpoints that survive kill -9, resume, signals, TensorBoard: with real 2-rank DeepSpeed runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from mole.train.checkpoint import COMPLETE, CheckpointError, find_resumable, resolve_resume
from tests.helpers import (REPO, TINY_CONFIG, TINY_MODEL, read_rank_log, step_records, text_sample, training_command,
                           write_shard)

STEPS, SAVE_EVERY = 12, 4
DOMAINS = ("shapes", "charts", "tissue")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run did not finish:\n{log.read_text()[-3000:]}") from None


@pytest.fixture(scope="session")
def killed_then_resumed(tmp_path_factory):
    """A 12-step run (checkpoint every 4) killed with SIGKILL right after its step-8 checkpoint, then
    the same command again."""
    out = tmp_path_factory.mktemp("killed")
    cmd = training_command(out, f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.eval_every=4",
                           "train.log_routing_every=4", "train.eval_batches=2", "train.micro_batch_size=8")
    latest = out / "checkpoints" / "latest"
    proc = start(cmd, out / "first.log")
    wait_until(lambda: latest.exists() and latest.read_text() == "step_8", proc, 300, "the step-8 checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "done.json").exists(), "the run finished before it was killed: the test proved nothing"
    killed_at = max(r["step"] for r in step_records(out, 0))
    resumed = start(cmd, out / "second.log")
    rc = finish(resumed, out / "second.log")
    assert rc == 0, (out / "second.log").read_text()[-3000:]
    return out, killed_at


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.distributed
def test_killed_run_resumes_from_its_step_8_checkpoint_and_ends_at_12(killed_then_resumed):
    out, killed_at = killed_then_resumed
    starts = [r for r in read_rank_log(out, 0) if r.get("event") == "start"]
    assert [s["from_step"] for s in starts] == [0, 8], f"expected a fresh start then a resume at 8: {starts}"
    for rank in (0, 1):
        steps = [r["step"] for r in step_records(out, rank)]
        assert steps == list(range(1, STEPS + 1)), f"rank {rank} log is not 1..12 exactly once: {steps}"
    assert json.loads((out / "done.json").read_text())["step"] == STEPS
    assert killed_at >= 8


@pytest.mark.distributed
def test_tensorboard_curves_continue_across_the_kill(killed_then_resumed):
    out, _ = killed_then_resumed
    loss = scalars(out)["train/loss"]
    assert [step for step, _ in loss] == list(range(1, STEPS + 1)), f"steps logged: {[s for s, _ in loss]}"
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in jsonl if "train/loss" in r}) == list(range(1, STEPS + 1))
    assert len([r for r in jsonl if "train/loss" in r]) == STEPS, "metrics.jsonl repeats steps after the resume"


@pytest.mark.distributed
def test_every_tensorboard_tag_is_written_and_finite(killed_then_resumed):
    out, _ = killed_then_resumed
    tags = scalars(out)
    expected = ["train/loss", "train/lm_loss", "train/aux_loss", "train/lr", "train/grad_norm", "perf/tokens_per_s",
                "perf/samples_per_s", "data/skipped"]
    expected += [f"data/samples/{d}" for d in DOMAINS] + [f"eval/loss/{d}" for d in DOMAINS]
    expected += [f"moe/load/layer_{layer}/expert_{e}" for layer in range(2) for e in range(3)]
    missing = [tag for tag in expected if tag not in tags]
    assert not missing, f"missing TensorBoard tags: {missing}"
    for tag in expected:
        assert all(math.isfinite(v) for _, v in tags[tag]), f"{tag} has a non-finite value"
    assert [s for s, _ in tags["eval/loss/shapes"]] == [4, 8, 12]
    load = [sum(v for s, v in tags[f"moe/load/layer_0/expert_{e}"] if s == 5) for e in range(3)]
    assert sum(load) == pytest.approx(1.0), f"expert load fractions of a layer must sum to 1: {load}"
    for layer in range(2):
        entropy = [v for _, v in tags[f"moe/router_entropy/layer_{layer}"]]
        assert len(entropy) == STEPS and all(0.0 < v <= math.log(3) + 1e-6 for v in entropy), entropy
        nmi = tags[f"moe/nmi/layer_{layer}"]
        assert [s for s, _ in nmi] == [4, 8, 12] and all(0.0 <= v <= 1.0 for _, v in nmi), nmi


@pytest.mark.distributed
def test_routing_heatmap_is_logged_as_an_image(killed_then_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = killed_then_resumed
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("moe/routing")
    assert [i.step for i in images] == [4, 8, 12]
    assert images[-1].width > 100 and images[-1].height > 50 and images[-1].encoded_image_string[:4] == b"\x89PNG"


@pytest.mark.distributed
def test_checkpoints_hold_only_the_adapter_and_its_optimizer_state(killed_then_resumed):
    out, _ = killed_then_resumed
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_12", "step_8"], f"keep_checkpoints=2 should keep the newest two: {kept}"
    adapter = (out / "adapter" / "adapter.safetensors").stat().st_size
    checkpoint = sum(f.stat().st_size for f in (out / "checkpoints" / "step_12").iterdir())
    base = (TINY_MODEL / "model.safetensors").stat().st_size
    # fp32 weights + two Adam moments = 3x the adapter, plus DeepSpeed's bookkeeping; a frozen
    # backbone in it would add the base model's size
    assert checkpoint < 4 * adapter, f"checkpoint {checkpoint} B vs adapter {adapter} B (base {base} B)"
    marker = json.loads((out / "checkpoints" / "step_12" / COMPLETE).read_text())
    assert "mole_config.json" in marker["files"], "the spec the tensors were trained under is part of the commit"
    assert (out / "checkpoints" / "step_12" / "mole_config.json").read_text() == \
        (out / "adapter" / "mole_config.json").read_text()


RESUMED_LR = 5e-4


@pytest.fixture(scope="session")
def signalled(killed_then_resumed, tmp_path_factory):
    """The finished 12-step run, continued as a 500-step run at another LR, where only rank 1 gets
    SIGUSR1 a few steps in: every rank must save at the same step and exit 0, and the earlier run's
    ``done.json`` must not make the stopped run look finished (SLURM would not requeue it)."""
    finished, _ = killed_then_resumed
    out = tmp_path_factory.mktemp("signalled") / "run"
    shutil.copytree(finished, out)
    assert (out / "done.json").exists(), "precondition: the run being continued had finished"
    cmd = training_command(out, "train.max_steps=500", "train.save_every=0", "train.eval_every=0",
                           "train.micro_batch_size=8", f"train.lr={RESUMED_LR}",
                           "train.log_every=5")  # a stop between logs writes the skip counts, on every rank
    proc = start(cmd, out / "run.log")
    rank_log = out / "logs" / "rank1.jsonl"
    wait_until(lambda: len(step_records(out, 1)) >= STEPS + 3, proc, 300, "three more steps")
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
    assert len(rank1) == 1 and rank_log.exists(), "could not find the rank-1 process"
    rank1[0].send_signal(signal.SIGUSR1)
    rc = finish(proc, out / "run.log")
    return out, rc


@pytest.mark.distributed
def test_a_signal_on_one_rank_checkpoints_all_ranks_at_the_same_step_and_exits_cleanly(signalled):
    out, rc = signalled
    assert rc == 0, (out / "run.log").read_text()[-3000:]
    assert not (out / "done.json").exists(), "a stopped run must not claim to be done"
    last = [step_records(out, rank)[-1]["step"] for rank in (0, 1)]
    assert last[0] == last[1], f"ranks stopped at different steps: {last}"
    assert (out / "checkpoints" / "latest").read_text() == f"step_{last[0]}"
    assert find_resumable(str(out / "checkpoints")).step == last[0]
    assert STEPS + 3 <= last[0] < 500


@pytest.mark.distributed
def test_a_resumed_run_follows_its_own_learning_rate_schedule(signalled):
    """The checkpoint's schedule ended at LR 0 (step 12 of 12); this run's is 500 steps at another LR."""
    from mole.config import load_config
    from mole.train.optim import warmup_cosine

    out, _ = signalled
    warmup = load_config(str(TINY_CONFIG), []).train.warmup_steps
    logged = {r["step"]: r["train/lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "train/lr" in r}
    for step in (STEPS + 1, STEPS + 2):
        expected = RESUMED_LR * warmup_cosine(warmup, 500)(step - 1)
        assert logged[step] == pytest.approx(expected, rel=1e-6), f"step {step}: lr {logged[step]}, expected {expected}"


@pytest.mark.distributed
def test_too_few_held_out_samples_for_the_ranks_fail_at_start_naming_the_domain(tmp_path):
    val = write_shard(tmp_path / "val.tar", [text_sample("only", "How many sides does a square have?", "four")])
    domains = (f"data.domains=[{{name: shapes, shards: '{REPO}/data_shards/shapes/train-000000.tar', "
               f"val_shards: '{val}'}}]")
    log = tmp_path / "run.log"
    proc = start(training_command(tmp_path / "run", domains, "train.eval_every=1", "train.max_steps=2"), log)
    assert finish(proc, log) != 0
    text = log.read_text()
    assert "data.domains[0].val_shards: domain 'shapes' has fewer usable held-out samples than the 2 ranks" in text, text[-3000:]
    assert not list((tmp_path / "run").glob("logs/*.jsonl")) or not step_records(tmp_path / "run", 0), "it trained first"


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (the SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (sig - 1) & 1)


def has_loaded_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def signal_rank1_while_it_loads_torch(proc: subprocess.Popen) -> bool:
    """Send SIGUSR1 to rank 1 of launcher ``proc`` as soon as torch shows up in its memory map; return
    whether the rank had a handler for it installed by then."""
    seen: dict[str, bool] = {}

    def rank1_is_loading_torch() -> bool:
        try:
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
            if len(ranks) != 1 or not has_loaded_torch(ranks[0].pid):
                return False
            seen["catches"] = catches(ranks[0].pid, signal.SIGUSR1)
            ranks[0].send_signal(signal.SIGUSR1)
            return True
        except (psutil.Error, OSError):
            return False  # a process that ended or was still starting between listing and reading

    wait_until(rank1_is_loading_torch, proc, 120, "rank 1 loading torch")
    return seen["catches"]


@pytest.mark.distributed
def test_a_signal_during_start_up_is_honoured_after_the_first_step(tmp_path):
    """The rank catches SIGUSR1 before its slow imports start (checked when torch first shows up in
    its memory map), and a SIGUSR1 sent then neither kills it nor is lost: both ranks take one step,
    checkpoint it and exit 0."""
    proc = start(training_command(tmp_path, "train.max_steps=500", "train.save_every=0", "train.eval_every=0"),
                 tmp_path / "run.log")
    caught = signal_rank1_while_it_loads_torch(proc)
    rc = finish(proc, tmp_path / "run.log")
    assert caught, "rank 1 was importing torch without a SIGUSR1 handler: a warning signal then kills it"
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert [step_records(tmp_path, rank)[-1]["step"] for rank in (0, 1)] == [1, 1]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_1"
    assert not (tmp_path / "done.json").exists()


@pytest.mark.distributed
def test_a_stop_signal_at_the_last_step_leaves_a_finished_run(tmp_path):
    """A stop that lands on the last step (SLURM's warning signal near the time limit, say) has
    nothing left to stop: the run must say it is done, or SLURM requeues a finished run."""
    proc = start(training_command(tmp_path, "train.max_steps=1", "train.eval_every=0"), tmp_path / "run.log")
    signal_rank1_while_it_loads_torch(proc)
    rc = finish(proc, tmp_path / "run.log")
    log = (tmp_path / "run.log").read_text()
    assert rc == 0, log[-3000:]
    assert "stop requested (SIGUSR1) at step 1" in log or "stop requested (another rank) at step 1" in log, log[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_1"
    assert json.loads((tmp_path / "done.json").read_text())["step"] == 1, "a run that reached max_steps is done"


# ----------------------------------------------------------------- checkpoint discovery (no DeepSpeed)


def fake_checkpoint(root: Path, step: int, world_size: int = 2, complete: bool = True) -> Path:
    directory = root / f"step_{step}"
    directory.mkdir(parents=True)
    files = {}
    for rank in range(world_size):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        (directory / name).write_bytes(b"x" * 100)
        files[name] = 100
    if complete:
        (directory / COMPLETE).write_text(json.dumps({"step": step, "world_size": world_size, "files": files}))
    return directory


def test_pruning_keeps_the_newest_and_drops_torn_saves_of_earlier_steps(tmp_path):
    """A save killed before its commit marker leaves a step directory nothing resumes from; once a
    later step is saved, pruning removes it with the checkpoints beyond ``keep``."""
    from mole.train.checkpoint import Checkpoints

    root = tmp_path / "checkpoints"
    for step in (2, 4, 8):
        fake_checkpoint(root, step)
    fake_checkpoint(root, 6, complete=False)  # killed mid-save, then resumed from step 4
    fake_checkpoint(root, 10, complete=False)  # a later step's torn save: not ours to judge yet
    Checkpoints(str(root), keep=2, rank=0, world_size=2)._prune(8)
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_4", "step_8"]


def test_resume_skips_a_checkpoint_without_its_commit_marker(tmp_path):
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8, complete=False)  # killed while saving
    assert find_resumable(str(tmp_path)).step == 4


def test_resume_falls_back_when_a_file_of_the_newest_checkpoint_is_truncated(tmp_path):
    fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 8)
    (newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    assert find_resumable(str(tmp_path)).step == 4


def test_resuming_with_another_world_size_says_what_to_do(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", 4, world_size=2)
    with pytest.raises(CheckpointError, match="written by 2 ranks but this run has 4.*universal"):
        resolve_resume("auto", str(tmp_path), world_size=4)


def test_resume_never_refuses_to_start_over_existing_checkpoints(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", 4)
    with pytest.raises(CheckpointError, match="resume=never"):
        resolve_resume("never", str(tmp_path), world_size=2)
    assert resolve_resume("never", str(tmp_path / "elsewhere"), world_size=2) is None


def test_resume_from_an_explicit_checkpoint_directory(tmp_path):
    source = tmp_path / "source_run" / "checkpoints"
    fake_checkpoint(source, 4)
    fake_checkpoint(source, 8)
    found = resolve_resume(str(source / "step_4"), str(tmp_path / "new_run"), world_size=2)
    assert (found.path, found.tag, found.step) == (str(source), "step_4", 4)


def test_an_explicit_resume_gives_way_to_the_runs_own_checkpoints_only_when_restarted(tmp_path):
    """Requeued, the same command must continue the run, not go back to where it began; going back
    inside the same output_dir is refused, not done silently either way."""
    from mole.train.checkpoint import record_start

    source = tmp_path / "source_run" / "checkpoints"
    fake_checkpoint(source, 4)
    run, own = tmp_path / "run", tmp_path / "run" / "checkpoints"
    start_at = str(source / "step_4")
    assert resolve_resume(start_at, str(run), world_size=2).path == str(source), "a first start takes the path"
    record_start(start_at, str(run))
    fake_checkpoint(own, 6)
    found = resolve_resume(start_at, str(run), world_size=2)
    assert (found.path, found.step) == (str(own), 6), "restarted, the run continues from its own checkpoint"
    shutil.rmtree(source / "step_4")
    assert resolve_resume(start_at, str(run), world_size=2).step == 6, "even once the start is gone"
    fake_checkpoint(own, 2)
    with pytest.raises(CheckpointError, match=r"already holds .* up to step 6.*start a new output_dir"):
        resolve_resume(str(own / "step_2"), str(run), world_size=2)
    fake_checkpoint(tmp_path / "other" / "checkpoints", 8)
    found = resolve_resume(str(tmp_path / "other" / "checkpoints"), str(run), world_size=2)
    assert found.step == 8, "a newer checkpoint from elsewhere is a fresh start"
    record_start(str(tmp_path / "other" / "checkpoints"), str(run))
    found = resolve_resume(str(tmp_path / "other" / "checkpoints"), str(run), world_size=2)
    assert (found.path, found.step) == (str(tmp_path / "other" / "checkpoints"), 8), \
        "requeued before its first save, the run must start again from the newer path, not its own older checkpoints"
    fake_checkpoint(own, 8)  # the output_dir's earlier lineage reached the same step
    assert resolve_resume(str(tmp_path / "other" / "checkpoints"), str(run), world_size=2).path == \
        str(tmp_path / "other" / "checkpoints"), "a checkpoint of the run's own at the same step is not newer"
    fake_checkpoint(own, 10)
    assert resolve_resume(str(tmp_path / "other" / "checkpoints"), str(run), world_size=2).step == 10, \
        "once the run has saved past the path, a requeue continues from its own checkpoints"
    with pytest.raises(CheckpointError, match="no complete checkpoint there"):
        resolve_resume(str(source / "step_2"), str(tmp_path / "fresh_run"), world_size=2)


def test_resuming_under_a_config_of_other_shapes_names_the_keys_before_anything_loads(tmp_path):
    from mole.config import load_config, save_config
    from mole.train.checkpoint import check_resumable_config

    save_config(load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}"]), str(tmp_path / "config.yaml"))
    fake_checkpoint(tmp_path / "checkpoints", 4)
    found = resolve_resume("auto", str(tmp_path), world_size=2)
    steering_only = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}", "train.lr=1e-5", "lora.dropout=0.2",
                                                   "mole.aux_loss=per_sample", "mole.aux_weight=0.5"])
    check_resumable_config(found, steering_only)
    reordered = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}", "lora.attn_targets=[v_proj,q_proj,o_proj,k_proj]"])
    check_resumable_config(found, reordered)
    other = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}", "lora.r=8", "train.optimizer=sgd"])
    with pytest.raises(CheckpointError, match=r"lora\.r: 16 in the checkpoint's run, 8 now; train\.optimizer: 'adamw'"):
        check_resumable_config(found, other)
    (tmp_path / "config.yaml").write_text("lora: {r: 16\n  mole")  # torn: not a reason to refuse
    check_resumable_config(found, other)


def test_a_resume_may_change_the_router_learning_rate_but_not_whether_routers_have_their_own(tmp_path):
    """``train.router_lr`` set gives the routers an optimizer parameter group: the checkpoint's optimizer
    state is laid out by the groups, so set/unset cannot change across a resume; the value can."""
    from mole.config import load_config, save_config
    from mole.train.checkpoint import check_resumable_config

    save_config(load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}", "train.router_lr=1e-3"]),
                str(tmp_path / "config.yaml"))
    fake_checkpoint(tmp_path / "checkpoints", 4)
    found = resolve_resume("auto", str(tmp_path), world_size=2)
    check_resumable_config(found, load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}", "train.router_lr=1e-2"]))
    with pytest.raises(CheckpointError, match=r"train\.router_lr: 0\.001 in the checkpoint's run, None now \(set or unset"):
        check_resumable_config(found, load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}"]))


def test_resuming_under_settings_that_change_what_the_weights_compute_is_refused_unless_accepted(tmp_path):
    """alpha, routing, the base model's path and the image preparation keep the checkpoint's meaning: a
    change is refused naming each key, unless train.resume_accept names it."""
    from mole.config import load_config, save_config
    from mole.train.checkpoint import check_resumable_config

    save_config(load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}"]), str(tmp_path / "config.yaml"))
    fake_checkpoint(tmp_path / "checkpoints", 4)
    found = resolve_resume("auto", str(tmp_path), world_size=2)
    changed = [f"output_dir={tmp_path}", "lora.alpha=3200", "mole.routing=dense", "data.image_aspect=crop"]
    with pytest.raises(CheckpointError) as refused:
        check_resumable_config(found, load_config(str(TINY_CONFIG), changed))
    message = str(refused.value)
    for key in ("lora.alpha: 32.0 in the checkpoint's run, 3200.0 now", "mole.routing: 'scaled' in the checkpoint's run",
                "data.image_aspect: 'pad' in the checkpoint's run, 'crop' now"):
        assert key in message, message
    with pytest.raises(CheckpointError, match=r"data\.image_aspect") as partly:
        check_resumable_config(found, load_config(str(TINY_CONFIG), [*changed, "train.resume_accept=[lora.alpha,mole.routing]"]))
    assert "lora.alpha" not in str(partly.value) and "mole.routing" not in str(partly.value), partly.value
    accept_all = "train.resume_accept=[lora.alpha,mole.routing,data.image_aspect]"
    check_resumable_config(found, load_config(str(TINY_CONFIG), [*changed, accept_all]))


def test_the_spec_saved_in_a_checkpoint_governs_its_resume_whatever_config_yaml_says(tmp_path):
    """A hand-edited config.yaml cannot talk the check into a resume DeepSpeed would fail on: the
    checkpoint carries the spec its tensors were trained under, and a malformed one is named."""
    from mole.config import load_config, save_config
    from mole.spec import AdapterSpec
    from mole.train.checkpoint import check_resumable_config
    from transformers import AutoConfig

    trained = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}"])
    step = fake_checkpoint(tmp_path / "checkpoints", 4)
    spec = AdapterSpec.from_config(trained, AutoConfig.from_pretrained(TINY_MODEL))
    (step / "mole_config.json").write_text(spec.to_json())
    edited = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}", "lora.r=8"])
    save_config(edited, str(tmp_path / "config.yaml"))  # the user "fixed" the run's record to match
    found = resolve_resume("auto", str(tmp_path), world_size=2)
    with pytest.raises(CheckpointError, match=r"lora\.r: 16 in the checkpoint's run, 8 now"):
        check_resumable_config(found, edited)
    check_resumable_config(found, trained)
    (step / "mole_config.json").write_text('{"format_version": 2, "r": "sixteen"}')
    with pytest.raises(CheckpointError, match=r"step_4/mole_config\.json: missing keys"):
        check_resumable_config(found, trained)


def test_resuming_under_other_pixel_or_tile_limits_is_refused_unless_accepted(tmp_path):
    """The checkpoint records the limits its images were prepared with (the model directory's, resolved,
    where the run set none): another limit is refused naming its key unless accepted, and the same
    limits spelled out, or left to the same directory, resume. A checkpoint from before the limits were
    recorded (null) takes any."""
    from mole.config import load_config
    from mole.model import run_spec
    from mole.train.checkpoint import check_resumable_config
    from transformers import AutoConfig

    qwen, next_ = REPO / "launch" / "configs" / "tiny_qwen2_5_vl.yaml", REPO / "models" / "tiny-llava-next"
    cases = [(str(qwen), [], ["data.max_pixels=6272"], "data.max_pixels: 12544 in the checkpoint's run, 6272 now",
              ["data.min_pixels=3136", "data.max_pixels=12544"]),
             (str(TINY_CONFIG), [f"model.name_or_path={next_}"], ["data.image_grid_pinpoints=[[28,28]]"],
              "data.image_grid_pinpoints: [[28, 56], [56, 28], [56, 56]] in the checkpoint's run, [[28, 28]] now",
              ["data.image_grid_pinpoints=[[28,56],[56,28],[56,56]]"])]
    for index, (config, base, changed, refusal, same) in enumerate(cases):
        out = tmp_path / str(index)
        trained = load_config(config, [*base, f"output_dir={out}"])
        step = fake_checkpoint(out / "checkpoints", 4)
        spec, _ = run_spec(trained, AutoConfig.from_pretrained(trained.model.name_or_path))
        (step / "mole_config.json").write_text(spec.to_json())
        found = resolve_resume("auto", str(out), world_size=2)
        key = refusal.split(":")[0]
        with pytest.raises(CheckpointError, match=re.escape(f"{refusal} (the saved weights would compute something "
                                                            f"else; train.resume_accept=[{key}] takes it)")):
            check_resumable_config(found, load_config(config, [*base, f"output_dir={out}", *changed]))
        check_resumable_config(found, load_config(config, [*base, f"output_dir={out}", *changed,
                                                           f"train.resume_accept=[{key}]"]))
        check_resumable_config(found, load_config(config, [*base, f"output_dir={out}", *same]))
        check_resumable_config(found, trained)
        unrecorded = {k: v for k, v in spec.to_dict().items() if k not in ("min_pixels", "max_pixels",
                      "image_grid_pinpoints", "vision_aspect_ratio", "image_processor_backend")}
        (step / "mole_config.json").write_text(json.dumps({**unrecorded, "format_version": 2}))
        check_resumable_config(found, load_config(config, [*base, f"output_dir={out}", *changed]))


def test_resuming_onto_a_base_model_of_other_shapes_is_refused_before_it_loads(tmp_path):
    """The checkpoint's run recorded its base model's shapes in the adapter it saved with the checkpoint;
    a config pointing at a backbone of other shapes is refused naming them, not failed on by DeepSpeed
    after the whole model has loaded."""
    from mole.config import load_config, save_config
    from mole.train.checkpoint import check_resumable_config
    from transformers import AutoConfig

    cfg = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    fake_checkpoint(tmp_path / "checkpoints", 4)
    found = resolve_resume("auto", str(tmp_path), world_size=2)
    check_resumable_config(found, cfg)  # no adapter recorded yet: nothing to compare
    text = AutoConfig.from_pretrained(TINY_MODEL).text_config
    (tmp_path / "adapter").mkdir()
    recorded = {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers}
    (tmp_path / "adapter" / "mole_config.json").write_text(json.dumps(recorded))
    check_resumable_config(found, cfg)
    recorded["num_hidden_layers"] += 30
    (tmp_path / "adapter" / "mole_config.json").write_text(json.dumps(recorded))
    with pytest.raises(CheckpointError, match=rf"model\.name_or_path: num_hidden_layers {recorded['num_hidden_layers']} "
                                              rf"in the checkpoint's base model, {text.num_hidden_layers} in "):
        check_resumable_config(found, cfg)


def test_a_run_whose_adapter_is_format_1_resumes_and_is_still_checked(tmp_path):
    """Runs trained before format 2 left a version-1 mole_config.json beside their checkpoints: it still
    records the base shapes the resume check compares, and the run settings still come from config.yaml
    (the fixture records hard routing, a computation change that refuses nothing)."""
    from mole.config import load_config, save_config
    from mole.train.checkpoint import check_resumable_config

    cfg = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    fake_checkpoint(tmp_path / "checkpoints", 4)
    found = resolve_resume("auto", str(tmp_path), world_size=2)
    (tmp_path / "adapter").mkdir()
    recorded = json.loads((REPO / "tests" / "data" / "mole_config_v1.json").read_text())
    assert recorded["format_version"] == 1, "precondition: the fixture is a version-1 file"
    (tmp_path / "adapter" / "mole_config.json").write_text(json.dumps(recorded))
    check_resumable_config(found, cfg)
    other = load_config(str(TINY_CONFIG), [f"output_dir={tmp_path}", "mole.num_experts=2"])
    with pytest.raises(CheckpointError, match=r"mole\.num_experts: 3 in the checkpoint's run, 2 now"):
        check_resumable_config(found, other)
    (tmp_path / "adapter" / "mole_config.json").write_text(json.dumps({**recorded, "hidden_size": 4096}))
    with pytest.raises(CheckpointError, match=r"model\.name_or_path: hidden_size 4096 in the checkpoint's base model, 64 in "):
        check_resumable_config(found, cfg)


def test_a_torn_last_line_in_a_metrics_log_does_not_stop_a_resume(tmp_path):
    from mole.train.metrics import truncate_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "loss": 1.8}\n{"step": 4, "lo')
    truncate_jsonl(str(log), after_step=2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_a_first_ctrl_c_asks_for_a_clean_stop_and_a_second_aborts():
    from mole.train.signals import StopRequest

    stop = StopRequest(ctrl_c=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT", "the first Ctrl-C must only ask the run to stop"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore_defaults()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_stays_an_abort_for_programs_that_train_in_process():
    """Only the command-line trainer turns Ctrl-C into a clean stop: a program calling ``run`` in-process
    (the conflict experiment) would otherwise take a run cut short for a finished one."""
    from mole.train.signals import StopRequest

    stop = StopRequest()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
    finally:
        stop.restore_defaults()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
