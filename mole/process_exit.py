"""How a distributed entry point ends: with its own exit code, never an abort in the interpreter's teardown.

Imports nothing heavy, so an entry point can use it before it knows whether it will load torch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """Run a distributed entry point's ``main`` and end the process with its exit code (an uncaught
    exception: its traceback and 1), skipping the interpreter's finalization.

    Why not ``sys.exit``: during finalization (Python < 3.14) a thread that takes the GIL is ended with
    ``pthread_exit``. gloo's worker threads can still hold tensors then and take it to release them,
    and that forced unwind through torch's ``noexcept`` code aborts the process: "terminate called
    without an active exception", exit -6 instead of the run's own code, on a small fraction of exits
    (pytorch/pytorch#190489). ``main`` has finished every collective and closed its files by the time
    it returns; what finalization would still do is done here: flush logging and the standard streams,
    and end the DataLoader's worker processes (multiprocessing ends its daemonic children at exit).
    """
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - reported as the interpreter would, then the same exit code
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # sys.exit("message") semantics
        code = 1
    for child in multiprocessing.active_children():
        if child.daemon:
            child.terminate()
            child.join(timeout=5)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code or 0)
