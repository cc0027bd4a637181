"""One run per output_dir: the lock is held by a real second process, and dies with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mole.train.run_lock import LOCK_FILE, RunLock, RunLockedError
from tests.helpers import REPO

HOLD = "import sys, time; from mole.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def hold_lock(output_dir) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunLockedError) as err:
            RunLock(str(tmp_path)).acquire()
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "SLURM job 4242" in message and str(tmp_path) in message, message
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    holder = hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays; the lock does not
    with RunLock(str(tmp_path)):
        with pytest.raises(RunLockedError):  # and the new holder is exclusive in turn
            RunLock(str(tmp_path)).acquire()
    RunLock(str(tmp_path)).acquire().release()  # released on exit


@pytest.mark.distributed
def test_a_second_run_on_a_busy_output_dir_is_refused_on_every_rank_and_touches_nothing(tmp_path):
    """Run A trains; run B, the same command on the same output_dir, exits 2 at once naming A's rank 0,
    and leaves A's files alone. (A restart after a kill -9 is not blocked: the lock dies with its holder,
    see test_trainer's killed_then_resumed.)"""
    from tests.helpers import run_group, training_command
    from tests.test_trainer import start, wait_until

    cmd = training_command(tmp_path, "train.max_steps=100000", "train.save_every=0")
    first = start(cmd, tmp_path.parent / "first.log")
    try:
        metrics = tmp_path / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and metrics.stat().st_size > 0, first, 300, "run A's first step")
        config_before = (tmp_path / "config.yaml").read_bytes()
        started = time.monotonic()
        second = run_group(training_command(tmp_path, "train.max_steps=3", "train.lr=0.5"), timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        refusals = [line for line in second.stderr.splitlines() if "is in use by another run" in line]
        assert len(refusals) == 2, f"every rank should refuse, once each:\n{second.stderr[-3000:]}"
        holder_pid = json.loads((tmp_path / LOCK_FILE).read_text())["pid"]
        assert all(f"pid {holder_pid}" in line for line in refusals), refusals
        assert (tmp_path / "config.yaml").read_bytes() == config_before, "run B replaced run A's config.yaml"
        assert not (tmp_path / "checkpoints").exists() and first.poll() is None, "run B disturbed run A"
        assert time.monotonic() - started < 200
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
