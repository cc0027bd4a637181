"""Benchmarks: each subcommand of ``launch/bench.py`` is a module here with ``main(argv) -> dict``."""
