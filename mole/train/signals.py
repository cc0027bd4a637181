"""SIGTERM / SIGUSR1 -> checkpoint and exit cleanly (SLURM warns with them before a time limit or preemption).

The handler only sets a flag. Ranks may receive the signal at different steps, so the trainer
reduces the flag over all ranks every step (inside the step's metrics all-reduce) and every rank
saves at the same step.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore_defaults(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
