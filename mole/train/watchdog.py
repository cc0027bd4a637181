"""Nothing hangs silently: every rank says what it is doing, and a rank stuck too long ends the job.

Each rank holds a :class:`Phase` (``step 12: data (domain charts, shard .../train-000001.tar)``,
``step 12: forward/backward``, ``step 12: save``) that the trainer and the data stream set as they
go. A :class:`Watchdog` thread publishes it to the run's c10d store every few seconds and compares
the time spent in it with the limits: ``train.data_timeout_s`` for waiting on data (reset by every
sample read, so a slow but moving source is not stuck), ``train.step_timeout_s`` for everything
else. Past a limit the rank writes every rank's last phase to stderr (a stopped rank cannot report
itself: its line says how long it has been silent), kills its own child processes (``pipe:``
commands, DataLoader workers) and exits with :data:`EXIT_CODE`; the launcher (``deepspeed``,
``srun --kill-on-bad-exit``, ``torchrun``) then ends the other ranks.

The thread only reads clocks and talks to the store over its own connection with a short timeout
(a stopped rank 0, which serves the store, cannot block it): it draws no random numbers and issues
no collectives, so a run that never hits a limit trains exactly as without it. It exits with
``os._exit`` because the main thread is typically blocked in C code (a socket read, a gloo or
shared-memory collective) where no exception can reach it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

EXIT_CODE = 3  # a run ended by the watchdog (1: an error, 2: a config error)
STORE_PREFIX = "mole/watchdog"


class Phase:
    """What this rank is doing now and since when (monotonic). Set from the main thread (and the data
    stream in it); read by the watchdog thread. One tuple, replaced whole, so a read is never torn."""

    def __init__(self) -> None:
        self.step = 0
        self._now = ("start-up", False, time.monotonic())

    def enter(self, what: str, *, data: bool = False) -> None:
        """Start phase ``what`` of the current step; ``data``: waiting for data (the data limit applies)."""
        self._now = (f"step {self.step}: {what}" if self.step else what, data, time.monotonic())

    def reading(self, domain: str, shard: str) -> None:
        """About to read the next sample of ``domain`` from ``shard``."""
        self.enter(f"data (domain {domain}, shard {shard})", data=True)

    def current(self) -> tuple[str, bool, float]:
        """(description, waiting for data, monotonic time it started)."""
        return self._now


class Watchdog:
    """A daemon thread enforcing ``data_timeout_s`` and ``step_timeout_s`` (0: no limit) on ``phase``.

    ``store``: a c10d store every rank can reach (see :func:`connect_store`), or None to report this
    rank alone. ``before_exit`` runs just before the process exits (releasing shared memory).
    """

    def __init__(self, phase: Phase, rank: int, world_size: int, data_timeout_s: float, step_timeout_s: float,
                 store=None, before_exit: Callable[[], None] | None = None, interval_s: float | None = None):
        self.phase, self.rank, self.world_size, self.store = phase, rank, world_size, store
        self.data_timeout_s, self.step_timeout_s = data_timeout_s, step_timeout_s
        self.before_exit = before_exit
        limits = [limit for limit in (data_timeout_s, step_timeout_s) if limit > 0]
        self.interval_s = interval_s or min(5.0, max(0.5, min(limits, default=20) / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mole-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def overdue(self, now: float | None = None) -> str | None:
        """Why this rank is past a limit (the phase, for how long, which key), or None."""
        what, data, since = self.phase.current()
        limit, key = (self.data_timeout_s, "data_timeout_s") if data else (self.step_timeout_s, "step_timeout_s")
        spent = (time.monotonic() if now is None else now) - since
        if limit > 0 and spent > limit:
            return f"rank {self.rank} spent {spent:.0f} s in '{what}', over train.{key}={limit:g}"
        return None

    def report(self) -> list[str]:
        """One line per rank: its last published phase and how long it has been in it, or how long it has
        been silent (stopped, or stuck where even its watchdog cannot run)."""
        lines = []
        for rank in range(self.world_size):
            if rank == self.rank or self.store is None:
                what, _, since = self.phase.current()
                lines.append(f"rank {rank}: {what} for {time.monotonic() - since:.0f} s"
                             if rank == self.rank else f"rank {rank}: unknown (no store to read it from)")
                continue
            try:
                if not self.store.check([f"rank{rank}"]):
                    lines.append(f"rank {rank}: no report at all (never reached training)")
                    continue
                record = json.loads(self.store.get(f"rank{rank}"))
            except Exception as err:  # the store's host stopped or gone: say so, still end the job
                lines.append(f"rank {rank}: unknown (the store did not answer: {type(err).__name__}: {err})")
                continue
            silent = time.time() - record["at"]
            line = f"rank {rank}: {record['phase']} for {record['for'] + silent:.0f} s"
            if silent > max(3 * self.interval_s, 10):
                line += f" (no report for {silent:.0f} s)"
            lines.append(line)
        return lines

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._publish()
            reason = self.overdue()
            if reason is not None and not self._stop.is_set():
                self._fire(reason)

    def _publish(self) -> None:
        if self.store is None:
            return
        what, _, since = self.phase.current()
        record = {"phase": what, "for": time.monotonic() - since, "at": time.time()}
        try:
            self.store.set(f"rank{self.rank}", json.dumps(record))
        except Exception:  # the store's host is stopped or gone: this rank's own limits still hold
            pass

    def _fire(self, reason: str) -> None:
        lines = [f"watchdog: {reason}; ending the job. Every rank's last phase:", *self.report()]
        print("\n".join(lines), file=sys.stderr, flush=True)
        kill_children()
        if self.before_exit is not None:
            self.before_exit()
        os._exit(EXIT_CODE)


def connect_store(timeout_s: float = 10.0):
    """A connection of its own to the run's c10d store (``MASTER_ADDR:MASTER_PORT``), with a short
    timeout, under a prefix of ours; None if it cannot be reached (the watchdog then reports this rank alone)."""
    import torch.distributed as dist

    try:
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception:
        return None
    return dist.PrefixStore(STORE_PREFIX, client)


def kill_children() -> None:
    """SIGKILL every descendant of this process (``pipe:`` commands, DataLoader workers): an exiting rank
    would leave them to init, still blocked on their reads."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
