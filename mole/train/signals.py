"""SIGTERM / SIGUSR1 / a first Ctrl-C -> checkpoint and exit cleanly (SLURM warns with SIGTERM or SIGUSR1
before a time limit or preemption; Ctrl-C sends SIGINT to every rank). A second Ctrl-C aborts at once.

The handler only sets a flag. Ranks may receive the signal at different steps, so the trainer
reduces the flag over all ranks every step (inside the step's metrics all-reduce) and every rank
saves at the same step.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: saving a checkpoint after this step and exiting; press it again to abort")
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore_defaults(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
