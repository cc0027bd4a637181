"""Storage faults say what they are: a full disk during a save, torn checkpoints and their space, commit
markers that cannot be read, and export taking the checkpoint a resume would. Real files; the full disk
is a real tmpfs of a few MiB under real 2-rank runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mole.export import find_checkpoint
from mole.train.checkpoint import COMPLETE, find_resumable, resolve_resume
from tests.helpers import cli_env, read_rank_log, run_group, training_command
from tests.test_trainer import fake_checkpoint

DISK_MIB = 2  # a tiny run's checkpoint is about 1.0 MiB, its adapter 0.3 MiB, the rest of its output_dir 0.1
ROOM_MIB = 2.1  # added for the resumed run: a checkpoint and an adapter, but not with the filler in the way too
FILLER_BYTES = 1536 << 10  # the torn save left in the way of the resumed run's next one
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # a file of fake_checkpoint's, 100 bytes


def mount_tmpfs(directory: Path, mib: float, remount: bool = False) -> None:
    options = f"{'remount,' if remount else ''}size={int(mib * 1024)}k"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """Three runs of one output_dir on a 2 MiB tmpfs: the first (4 steps, a save every 2) fills the disk at its
    step-4 save; with the disk grown by 2.1 MiB and a torn step_3 holding 1.5 MiB left in the way (and a
    newer step_5 whose marker is valid JSON of the wrong shape), the same command resumed. Yields the
    output_dir, the first run with what it left in ``checkpoints/`` and its ``latest``, and the resumed run."""
    disk = tmp_path_factory.mktemp("disk")
    mount_tmpfs(disk, DISK_MIB)
    out = disk / "run"
    cmd = training_command(out, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=1")
    try:
        full = run_group(cmd, 240, env=cli_env())
        left = sorted(p.name for p in (out / "checkpoints").iterdir())
        latest = (out / "checkpoints" / "latest").read_text()
        used = shutil.disk_usage(disk).used
        mount_tmpfs(disk, used / 2**20 + ROOM_MIB, remount=True)  # the resumed run's own room, whatever the first left
        torn = out / "checkpoints" / "step_3"
        torn.mkdir(parents=True, exist_ok=True)
        (torn / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes(FILLER_BYTES))
        newer = fake_checkpoint(out / "checkpoints", 5)
        (newer / COMPLETE).write_text(json.dumps({"step": 5, "world_size": 2, "files": ["mole_rank0.pt"]}))
        resumed = run_group(cmd, 240, env=cli_env())
        yield out, (full, left, latest), resumed
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.distributed
def test_a_full_disk_fails_the_save_on_every_rank_naming_enospc_the_path_and_the_free_space(small_disk):
    out, (full, left, latest), _ = small_disk
    logs = full.stdout + full.stderr
    step_4 = out / "checkpoints" / "step_4"
    assert full.returncode != 0, f"the run succeeded on a full disk:\n{logs[-3000:]}"
    errors = re.findall(r"error: saving checkpoint .*?\(on rank \d+\)", logs)  # the ranks' lines may interleave
    assert len(errors) == 2, f"expected one error per rank, got {errors}\n{logs[-3000:]}"
    for line in errors:
        assert "no space left on device (ENOSPC)" in line and str(step_4) in line and "MiB free" in line, line
    assert "step_4" not in left, f"the failed save was left behind: {left}"
    assert latest == "step_2", latest


@pytest.mark.distributed
def test_a_torn_save_is_reclaimed_before_the_next_save_needs_its_space(small_disk):
    out, _, resumed = small_disk
    logs = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, f"the resumed run failed (its next save found the torn one's space taken?):\n" \
                                    f"{logs[-3000:]}"
    assert not (out / "checkpoints" / "step_3").exists(), "the torn step_3 is still there"
    found = find_resumable(str(out / "checkpoints"))
    assert (found.tag, found.step) == ("step_4", 4), found
    assert (out / "checkpoints" / "step_5").exists(), "a later step's directory is not the resumed run's to remove"


@pytest.mark.distributed
def test_a_resume_skips_a_newer_checkpoint_whose_marker_has_the_wrong_shape(small_disk):
    out, _, resumed = small_disk
    logs = resumed.stdout + resumed.stderr
    starts = [r["from_step"] for r in read_rank_log(out, 0) if r.get("event") == "start"]
    assert starts[-1] == 2, f"the resumed run started from step {starts[-1]}, not the complete step 2: {starts}"
    assert "step_5: its commit marker" in logs, f"no warning names the skipped step_5:\n{logs[-3000:]}"


@pytest.mark.parametrize("marker", [
    [], "step_8", None, {"step": 8, "world_size": 2}, {"step": 8, "world_size": 2, "files": ["a.pt"]},
    {"step": 8, "world_size": 2, "files": {OPTIM: "100"}}, {"step": "8", "world_size": 2, "files": {OPTIM: 100}},
    {"step": 8, "world_size": "2", "files": {OPTIM: 100}}, {"step": 6, "world_size": 2, "files": {OPTIM: 100}},
    {"step": 8, "world_size": 2, "files": {"../step_4/" + OPTIM: 100}},
])
def test_a_commit_marker_of_the_wrong_shape_is_skipped_like_a_torn_checkpoint(tmp_path, marker):
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 4)
    newest = fake_checkpoint(run / "checkpoints", 8)
    (newest / COMPLETE).write_text(json.dumps(marker))
    found = resolve_resume("auto", str(run), world_size=2)
    assert (found.tag, found.step) == ("step_4", 4), f"marker {marker!r}: resumed from {found}"


def test_a_started_from_record_of_the_wrong_shape_is_ignored(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 4)
    for record in ([], {"train.resume": ["x"]}, {"train.resume": 4}, "x"):
        (run / "checkpoints" / "started_from.json").write_text(json.dumps(record))
        assert resolve_resume("auto", str(run), world_size=2).step == 4


def test_export_takes_the_checkpoint_a_resume_takes_whatever_latest_says(tmp_path):
    """The newest checkpoint is cut short (and ``latest`` names it), a newer save has no marker: both the
    resume and the export of the output_dir take step 4."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    fake_checkpoint(root, 4)
    torn = fake_checkpoint(root, 8)
    (torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    fake_checkpoint(root, 12, complete=False)
    for latest in ("step_8", "step_12", "../../elsewhere", "\x00garbage"):
        (root / "latest").write_text(latest)
        resumed = resolve_resume("auto", str(run), world_size=2)
        for source in (run, root):
            assert find_checkpoint(str(source)) == (resumed.path, resumed.tag) == (str(root), "step_4"), \
                f"latest={latest!r}: export of {source} took {find_checkpoint(str(source))}, resume {resumed.tag}"
