"""Benchmarks: ``python -m benchmarks layer|ops|step|generate|data --json OUT [options]``, from the repository root.

Each subcommand is ``benchmarks.<name>.main(argv)``; see ``--help`` of each.
"""

import importlib
import sys

BENCHES = ("layer", "ops", "step", "generate", "data")


def usage() -> str:
    lines = [f"usage: python -m benchmarks {{{'|'.join(BENCHES)}}} [--json OUT] [options]", ""]
    for name in BENCHES:
        summary = (importlib.import_module(f"benchmarks.{name}").__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:9s} {summary.split(' bench: ', 1)[-1]}")
    lines.append("\n`python -m benchmarks NAME --help` lists a bench's options; docs/performance.md has the results.")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(usage())
        return 0
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        if len(sys.argv) >= 2:
            print(f"error: unknown bench {sys.argv[1]!r}; choose one of {', '.join(BENCHES)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{sys.argv[1]}")
    module.main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
