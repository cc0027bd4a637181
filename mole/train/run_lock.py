"""One run per ``output_dir``: an exclusive lock that dies with the process holding it.

Two runs on one ``output_dir`` (a job submitted twice, a requeue racing a manual restart) would
otherwise both succeed and leave a silent mix of each other's config, metrics, checkpoints and
adapter, and each may delete the other's half-written ``step_<N>`` as a leftover. Rank 0 takes
``fcntl.flock`` on ``output_dir/run.lock`` before any rank writes there and holds it for the whole run.

``flock`` is used rather than a lock file's existence because the kernel drops it when the holder
dies, however it dies (``kill -9``, a node reboot, SLURM's requeue): a stale lock never blocks the
restart. The file's content (host, pid, SLURM job id) is only a label for the refusal message; it
is never what decides. On shared filesystems ``flock`` needs lock support (NFSv4; Lustre mounted
with ``-o flock``); where the filesystem refuses locks the run stops with that error rather than
running unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """Another live run holds ``output_dir``."""


class RunLock:
    """The held lock; :meth:`release` (or process exit) frees it."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Lock without waiting: a second run is refused at once, naming the holder."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunLockedError(
                    f"output_dir {os.path.dirname(self.path)!r} is in use by another run ({describe_holder(self.path)}); "
                    "wait for it to end, stop it, or use another output_dir") from None
            raise OSError(err.errno, f"cannot lock {self.path} ({err.strerror}): this filesystem may not support "
                                     "flock (NFSv4 does; Lustre needs -o flock)") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(path: str) -> str:
    """'host H, pid P, SLURM job J, since T' from the lock file; its writer may not have filled it yet."""
    try:
        with open(path) as handle:
            holder = json.load(handle)
        parts = [f"host {holder['host']}", f"pid {holder['pid']}"]
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"
    if holder.get("job_id"):
        parts.append(f"SLURM job {holder['job_id']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


@contextlib.contextmanager
def holding_output_dir(output_dir: str, is_main: bool) -> Iterator[None]:
    """Rank 0 holds the run lock for the block; every rank learns the outcome before any writes.

    A refusal is raised on every rank alike (one broadcast, issued by all), so a second run exits at
    once everywhere instead of leaving ranks waiting in a collective rank 0 never reaches.
    """
    import torch.distributed as dist

    lock, refusal = None, [None]
    if is_main:
        try:
            lock = RunLock(output_dir).acquire()
        except (RunLockedError, OSError) as err:
            refusal = [str(err)]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunLockedError(refusal[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
