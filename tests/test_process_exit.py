"""``mole.process_exit.exit_with``: an entry point ends with its own code and nothing it said is lost,
though the interpreter's finalization (where gloo's threads can abort the process) is skipped."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO


def run_entry_point(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``body`` defines ``main``; the script hands it to ``exit_with``. Output goes to files with
    Python's buffering on, so only a flush before ``os._exit`` brings it out."""
    script = "import logging, sys\nfrom mole.process_exit import exit_with\n" + textwrap.dedent(body) + "\nexit_with(main)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        rc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, stdout=stdout, stderr=stderr,
                            timeout=60).returncode
    return subprocess.CompletedProcess([], rc, out.read_text(), err.read_text())


def test_the_code_main_returns_is_the_exit_code_and_buffered_output_is_kept(tmp_path):
    proc = run_entry_point("""
        def main():
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            logging.getLogger("run").info("logged before exit")
            print("printed without a flush", end="")
            return 3
    """, tmp_path)
    assert proc.returncode == 3
    assert proc.stdout == "printed without a flush"
    assert "logged before exit" in proc.stderr


@pytest.mark.parametrize("raise_it, code, said", [
    ("raise ValueError('bad shard')", 1, "ValueError: bad shard"),
    ("sys.exit('config error: no such key')", 1, "config error: no such key"),
    ("sys.exit(2)", 2, ""),
    ("raise KeyboardInterrupt", 130, "KeyboardInterrupt"),
])
def test_an_exit_or_an_uncaught_exception_gives_the_code_the_interpreter_would(raise_it, code, said, tmp_path):
    proc = run_entry_point(f"""
        def main():
            {raise_it}
    """, tmp_path)
    assert proc.returncode == code, proc.stderr
    assert said in proc.stderr


def test_daemonic_worker_processes_end_with_the_entry_point(tmp_path):
    """DataLoader workers are daemonic children; multiprocessing would end them at exit, and skipping
    the finalization must not leave them running."""
    proc = run_entry_point("""
        import multiprocessing, time

        def main():
            child = multiprocessing.Process(target=time.sleep, args=(600,), daemon=True)
            child.start()
            print(child.pid)
            return 0
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    child = int(proc.stdout)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the worker outlived its entry point"
        time.sleep(0.1)
