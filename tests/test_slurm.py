"""launch/slurm/train.sbatch on a real local SLURM cluster (slurmctld + slurmd + munged, see slurm_cluster.py)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_CONFIG, python, run_group, step_records
from tests.slurm_cluster import missing_binaries, slurm_cluster

pytestmark = pytest.mark.distributed

SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"


@pytest.fixture(scope="module")
def slurm_env():
    missing = missing_binaries()
    reason = None
    if missing:
        reason = f"SLURM not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)"
    elif os.geteuid() != 0:
        reason = "the local SLURM cluster runs its daemons as root"
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the SLURM tests")
    if reason:
        pytest.skip(reason)
    with slurm_cluster() as env:
        yield {**env, "PYTHON": python()}


def sbatch(env: dict, *args: str, log: Path | None = None, timeout: int = 240) -> tuple[int, str]:
    """``sbatch --wait ARGS`` from the repository root (the job's working directory): its exit status
    and the job's log, sbatch's own output first. Without ``log`` the job logs where the script says,
    ``logs/%x-%j.out`` (SLURM fails a job silently when that directory is missing), under a unique job
    name; that file is read and removed."""
    name = f"mole-test-{uuid.uuid4().hex[:8]}"
    output = [f"--output={log}"] if log else []
    proc = run_group(["sbatch", "--wait", f"--job-name={name}", *output, *args], timeout, env=env)
    if log is None:
        job = proc.stdout.split()[-1] if proc.stdout.startswith("Submitted batch job") else "unknown"
        log = REPO / "logs" / f"{name}-{job}.out"
    job_log = log.read_text() if log.exists() else "(no job log)"
    if not output:
        log.unlink(missing_ok=True)
    return proc.returncode, f"{proc.stdout}{proc.stderr}--- job log {log}\n{job_log}"


def tail(text: str) -> str:
    return text[-5000:]


def slurm(env: dict, *args: str) -> str:
    """Run a SLURM client command against the test cluster; its stdout."""
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout.strip()


def job_info(env: dict, job: str) -> dict:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    fields = slurm(env, "scontrol", "--oneliner", "show", "job", job).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def wait_until(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            job_log = log.read_text() if log.exists() else "(no job log)"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail(job_log)}")
        time.sleep(0.2)


def logged_a_step(out: Path) -> bool:
    try:
        return bool(step_records(out, 0))
    except (OSError, ValueError):  # not written yet, or a line half written
        return False


def test_sbatch_runs_two_ranks_to_completion(slurm_env, tmp_path):
    out = tmp_path / "run"
    status, log = sbatch(slurm_env, "--nodes=1", "--ntasks-per-node=2", str(SBATCH_SCRIPT),
                         str(TINY_CONFIG), "train.max_steps=4", f"output_dir={out}")
    assert "(no job log)" not in log, f"no job log under logs/ (the script's --output=logs/%x-%j.out):\n{log}"
    assert status == 0, f"sbatch job failed ({status}):\n{tail(log)}"
    assert "2 ranks on 1 node(s)" in log, tail(log)
    assert (out / "adapter" / "adapter.safetensors").is_file(), f"no adapter written:\n{tail(log)}"
    assert (out / "done.json").is_file(), f"a completed run must write done.json (the requeue contract):\n{tail(log)}"
    assert "requeueing" not in log, f"a completed job was requeued:\n{tail(log)}"
    for rank in (0, 1):
        steps = [r["step"] for r in step_records(out, rank)]
        assert steps == [1, 2, 3, 4], f"rank {rank} logged steps {steps}, expected 1..4"


def test_sbatch_rejects_a_bad_config_before_starting_ranks(slurm_env, tmp_path):
    status, log = sbatch(slurm_env, "--ntasks-per-node=2", str(SBATCH_SCRIPT), str(TINY_CONFIG),
                         "train.max_stepz=4", log=tmp_path / "job.out", timeout=60)
    assert status == 2, f"a misspelt key must fail the job with the config's exit status 2, got {status}:\n{log}"
    assert "train.max_steps" in log and "ranks on" not in log, f"expected a suggestion and no ranks started:\n{log}"
    status, log = sbatch(slurm_env, str(SBATCH_SCRIPT), str(TINY_CONFIG), "max_steps", log=tmp_path / "job2.out", timeout=60)
    assert status == 2 and "override 'max_steps' has no '='" in log, log
    assert "usage: sbatch [sbatch options] launch/slurm/train.sbatch CONFIG" in log and "launch/train.py [" not in log, log


def test_signalled_job_saves_requeues_and_resumes_to_the_end(slurm_env, tmp_path):
    """SIGUSR1 to the ranks (what ``--signal=USR1@120`` sends before the time limit): they save a
    checkpoint and exit 0, the script requeues the job, and the requeued job resumes to max_steps."""
    steps, out, log = 30, tmp_path / "run", tmp_path / "job.out"
    job = slurm(slurm_env, "sbatch", "--parsable", f"--output={log}", "--ntasks-per-node=2", str(SBATCH_SCRIPT),
                str(TINY_CONFIG), f"train.max_steps={steps}", f"output_dir={out}")
    wait_until(lambda: logged_a_step(out), 180, "the first training step", log)
    slurm(slurm_env, "scancel", "--signal=USR1", job)  # to the ranks (job steps), not the batch script

    def requeued_and_node_free() -> bool:
        info = job_info(slurm_env, job)
        if int(info["Restarts"]) < 1:
            return False
        if info["JobState"] != "PENDING":
            return info["JobState"] in ("RUNNING", "COMPLETED")
        # the first run's processes must be gone before the second starts on the same node
        return slurm(slurm_env, "sinfo", "--noheader", "--format=%t") == "idle"

    wait_until(requeued_and_node_free, 120, "the job to requeue", log)
    # SLURM holds a requeued job back ~2 minutes; start it now, but not within the second its first
    # run was killed in: slurmd revokes the job's credentials by the second ("already killed").
    time.sleep(2)
    if job_info(slurm_env, job)["JobState"] == "PENDING":
        slurm(slurm_env, "scontrol", "update", f"JobId={job}", "StartTime=now")
    done_states = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_until(lambda: job_info(slurm_env, job)["JobState"] in done_states, 180, "the requeued job to end", log)

    info, job_log = job_info(slurm_env, job), log.read_text()
    slurmd_log = (Path(slurm_env["SLURM_CONF"]).parent / "slurmd.log").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        f"{info}\n{tail(job_log)}\n--- slurmd.log\n{slurmd_log[-3000:]}")
    assert "stop requested (SIGUSR1)" in job_log and "requeueing job" in job_log, tail(job_log)
    assert "(restart 1)" in job_log and "resumed from" in job_log, tail(job_log)
    assert (out / "done.json").is_file(), tail(job_log)
    for rank in (0, 1):
        logged = [r["step"] for r in step_records(out, rank)]
        assert logged == list(range(1, steps + 1)), f"rank {rank} logged steps {logged} across the requeue"
