"""SIGTERM / SIGUSR1 (and, for the command-line trainer, a first Ctrl-C) -> checkpoint and exit cleanly.

SLURM warns with SIGTERM or SIGUSR1 before a time limit or preemption; Ctrl-C sends SIGINT to every
rank. A second Ctrl-C aborts at once. Ctrl-C is caught only when asked for (``launch/train.py``): a
program that calls the trainer in-process (the conflict experiment) keeps Ctrl-C as an abort, so an
interrupted run is never mistaken for a finished one.

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
    """Installs the stop handlers; ``ctrl_c`` adds SIGINT (first press: stop cleanly, second: abort)."""

    def __init__(self, ctrl_c: bool = False) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.signals = (*STOP_SIGNALS, signal.SIGINT) if ctrl_c else STOP_SIGNALS
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: saving a checkpoint after this step and exiting; press it again to abort")
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore_defaults(self) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
