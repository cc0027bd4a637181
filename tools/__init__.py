"""Generators of the bundled test data (``data_shards/``) and tiny model (``models/tiny-llava/``).

Run from the repository root as ``python -m tools.make_synthetic_data`` and ``python -m
tools.make_tiny_llava``; the conflict experiment imports their drawing functions and model builder.
Not part of the installed package.
"""
