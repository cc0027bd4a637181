"""Benchmarks: ``python launch/bench.py layer|step|generate|data --json OUT [options]``.

Each subcommand is ``mole.bench.<name>.main(argv)``; see ``--help`` of each.
"""

import importlib
import sys

BENCHES = ("layer", "step", "generate", "data")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        print(f"usage: python launch/bench.py {{{'|'.join(BENCHES)}}} --json OUT [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mole.bench.{sys.argv[1]}")
    module.main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
