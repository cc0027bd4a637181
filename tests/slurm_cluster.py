"""A real single-node SLURM cluster (munged + slurmctld + slurmd) in a temporary directory, for tests.

Everything it needs lives in the temporary directory: its own munge key and socket, ``slurm.conf``
with free ports, spool and state directories, pid and log files. One node, this host, with the CPUs
and memory ``slurmd -C`` reports; ``proctrack/linuxproc`` and ``task/none`` so that it runs as root
without cgroups. Needs root (``SlurmUser=root``) and Debian's ``slurm-wlm`` and ``munge``.

    with slurm_cluster() as env:              # env = os.environ + SLURM_CONF (+ a marker)
        subprocess.run(["sbatch", "--wait", ...], env=env)

On exit (test failure included) it cancels every job, stops the daemons and kills whatever the
cluster started that is still alive. ``python -m tests.slurm_cluster`` starts one and keeps it up
until Ctrl-C, for trying the sbatch script by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tests.helpers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scancel", "scontrol")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
MARKER = "MOLE_TEST_SLURM_CLUSTER"  # in the env of the daemons and of jobs submitted with the yielded env


def missing_binaries() -> list[str]:
    """The SLURM and munge programs this module needs that are not installed."""
    return [name for name in DAEMONS + CLIENTS + ("munge",) if shutil.which(name, path=SBIN_PATH) is None]


@contextlib.contextmanager
def slurm_cluster(startup_timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd; yield the environment that talks to them; stop them all."""
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise RuntimeError("the test SLURM cluster runs its daemons as root (SlurmUser=root)")
    # munged refuses a socket whose directory path is not world-executable (pytest's tmp dirs are 0700)
    root = Path(tempfile.mkdtemp(prefix="mole-slurm-"))
    root.chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), MARKER: str(root),
           "PATH": SBIN_PATH}
    daemons: list[subprocess.Popen] = []
    try:
        _start_munged(root, env, daemons)
        _write_slurm_conf(root)
        for name in ("slurmctld", "slurmd"):
            daemons.append(_spawn([name, "-D", "-f", str(root / "slurm.conf")], root / f"{name}.out", env))
        _wait_idle(root, env, daemons, startup_timeout)
        yield env
    finally:
        _stop(root, env, daemons)
        shutil.rmtree(root, ignore_errors=True)


def _start_munged(root: Path, env: dict, daemons: list[subprocess.Popen]) -> None:
    """munged with a fresh key and its own socket (named in slurm.conf's AuthInfo); waits for the socket."""
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket = root / "munge.socket"
    proc = _spawn(["munged", "--foreground", f"--socket={socket}", f"--key-file={key}",
                   f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                   f"--seed-file={root / 'munged.seed'}"], root / "munged.out", env)
    daemons.append(proc)
    deadline = time.monotonic() + 10
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"munged did not start:\n{_tail(root / 'munged.out')}")
        time.sleep(0.1)


def _write_slurm_conf(root: Path) -> None:
    # `slurmd -C` prints this host's node line (NodeName=<hostname -s> CPUs=... RealMemory=...)
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True, env={"PATH": SBIN_PATH})
    node_line = node.stdout.splitlines()[0]
    host = node_line.split()[0].removeprefix("NodeName=")
    (root / "spool").mkdir()
    (root / "state").mkdir()
    (root / "slurm.conf").write_text(f"""\
ClusterName=moletest
FirstJobId={random.randrange(1, 1_000_000)}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=5
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, even by kill -9 (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=_die_with_parent)


def _wait_idle(root: Path, env: dict, daemons: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while state != "idle":
        dead = [d.args[0] for d in daemons if d.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"node state {state!r} after {timeout:.0f} s"
            logs = "\n".join(f"--- {f.name}\n{_tail(f)}" for f in sorted(root.glob("*.out")) + sorted(root.glob("*.log")))
            raise RuntimeError(f"test SLURM cluster did not come up: {why}\n{logs}")
        time.sleep(0.5)
        sinfo = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, env=env)
        state = sinfo.stdout.strip()


def _stop(root: Path, env: dict, daemons: list[subprocess.Popen]) -> None:
    """Cancel jobs and wait for them (their processes end with them), stop the daemons, then kill any
    process still carrying this cluster's marker (a job step orphaned by a dead slurmd)."""
    if len(daemons) == len(DAEMONS) and all(d.poll() is None for d in daemons):
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            squeue = subprocess.run(["squeue", "--noheader", "--format=%i"], env=env, capture_output=True, text=True)
            if squeue.returncode == 0 and not squeue.stdout.strip():
                break
            time.sleep(0.5)
    for proc in reversed(daemons):  # slurmd, slurmctld, munged
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in _marked_pids(str(root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _marked_pids(root: str) -> list[int]:
    marker = f"{MARKER}={root}".encode() + b"\0"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
    return pids


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(missing)"


def _main() -> None:
    def stop(signum, frame):
        raise SystemExit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, stop)
    with slurm_cluster() as cluster_env:
        print(f"export SLURM_CONF={cluster_env['SLURM_CONF']}  # Ctrl-C or SIGTERM stops the cluster", flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    _main()
