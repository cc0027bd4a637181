"""One run per output_dir: the lock is held by a real second process, and dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
