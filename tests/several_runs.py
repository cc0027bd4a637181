"""Several training runs one after another in one launch (tests only): one start-up of the ranks serves them all.

``deepspeed tests/several_runs.py ROOT RUNS_JSON --config tiny.yaml [key=value ...]``: for each
``name -> [key=value, ...]`` of ``RUNS_JSON``, in order, launch/train.py's run with the common
arguments, the run's own overrides and ``output_dir=ROOT/name``, all in the same ranks.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from mole.config import parse_cli
from mole.process_exit import exit_with
from mole.train.loop import run


def main(argv: list[str]) -> int:
    args = [arg for arg in argv if not arg.startswith("--local_rank")]  # the launcher puts --local_rank=N first
    root, runs, common = args[0], json.loads(args[1]), args[2:]
    for name, overrides in runs.items():
        run(parse_cli([*common, *overrides, f"output_dir={root}/{name}"]))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_with(lambda: main(sys.argv[1:]))
