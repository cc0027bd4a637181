"""The command-line options every entry point that loads a trained adapter shares (infer, eval).

Declared once so the two read alike and a new loading option reaches both; each entry point adds its
own options around them.
"""

from __future__ import annotations

import argparse

from mole.choices import DType, ImageAspect, ImageBackend, options


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    """``--adapter``, ``--base`` and ``--allow-remote-base``: what to load (see :func:`mole.load_model`)."""
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter.safetensors + mole_config.json)")
    parser.add_argument("--base", help="base LLaVA directory (default: the adapter's recorded base_model)")
    parser.add_argument("--allow-remote-base", action="store_true",
                        help="let a base that is not a local directory be downloaded from the Hugging Face Hub")


def add_preparation_args(parser: argparse.ArgumentParser, device_help: str) -> None:
    """``--image-aspect``, ``--image-backend``, ``--dtype`` and ``--device``: how to run it."""
    parser.add_argument("--image-aspect", choices=options(ImageAspect),
                        help="default: the adapter's data.image_aspect from training (pad if not recorded)")
    parser.add_argument("--image-backend", choices=options(ImageBackend),
                        help="default: the adapter's data.image_backend from training (fast if not recorded)")
    parser.add_argument("--dtype", choices=options(DType), default="fp32")
    parser.add_argument("--device", help=device_help)
