"""The training entry point refuses bad configs fast, naming the key, before any model loads."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_CONFIG, free_port, python, run_group


@pytest.mark.parametrize(
    "override, key",
    [
        ("trian.max_steps=3", "trian"),
        ("train.max_steps=abc", "train.max_steps"),
        ("mole.num_experts=0", "mole.num_experts"),
        ("model.name_or_path=/nonexistent", "model.name_or_path"),
    ],
)
def test_bad_config_exits_nonzero_fast_naming_the_key(override, key):
    started = time.monotonic()
    proc = run_group([python(), str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG), override], timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, f"{override} was accepted"
    assert key in proc.stderr, f"error does not name {key!r}: {proc.stderr[-500:]}"
    assert "Traceback" not in proc.stderr, f"a config error should be a message, not a traceback: {proc.stderr[-800:]}"
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_unknown_key_suggests_the_right_one():
    proc = run_group([python(), str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG), "trian.max_steps=3"], timeout=60)
    assert "did you mean 'train'" in proc.stderr, proc.stderr[-500:]


@pytest.mark.parametrize("command, expected", [(["launch/train.py"], "deepspeed launch/train.py [--config PATH]"),
                                               pytest.param(["-m", "benchmarks"], "layer     one LLaMA MLP block",
                                                            marks=pytest.mark.slow)])  # imports every bench
def test_help_is_an_answer_not_an_error(command, expected):
    proc = run_group([python(), *command, "--help"], timeout=60)  # from the repository root
    assert proc.returncode == 0 and expected in proc.stdout, (proc.stdout + proc.stderr)[-800:]


@pytest.mark.distributed
def test_a_run_failing_at_start_leaves_no_shared_memory_behind(tmp_path):
    port = free_port()
    cmd = [python(), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG), f"output_dir={tmp_path}",
           "data.domains=[{name: a, shards: /nowhere/*.tar}]"]
    buffers = f"deepspeed_allreduce_buffer_*_{port}_*"
    seen: set[str] = set()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # watch the buffers appear, or the test proves nothing
        seen.update(path.name for path in Path("/dev/shm").glob(buffers))
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0]
    assert proc.returncode != 0 and "'/nowhere/*.tar' matches no file" in output, output[-2000:]
    assert seen, "DeepSpeed's shared-memory buffers never appeared: the check below would pass vacuously"
    left = list(Path("/dev/shm").glob(buffers))
    assert not left, f"a failed start left DeepSpeed's buffers in RAM: {left} (seen while running: {sorted(seen)})"
