"""The command-line options every entry point that loads a trained adapter shares (infer, eval).

Declared once so the two read alike and a new loading option reaches both; each entry point adds its
own options around them.
"""

from __future__ import annotations

import argparse

from mole.choices import DType, ImageAspect, ImageBackend, options
from mole.spec import AdapterSpec


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    """``--adapter``, ``--base`` and ``--allow-remote-base``: what to load (see :func:`mole.load_model`)."""
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter.safetensors + mole_config.json)")
    parser.add_argument("--base", help="base LLaVA directory (default: the adapter's recorded base_model)")
    parser.add_argument("--allow-remote-base", action="store_true",
                        help="let a base that is not a local directory be downloaded from the Hugging Face Hub")
    parser.add_argument("--domain", metavar="NAME",
                        help="an adapter trained with mole.routing: domain: the domain (one of the names its "
                             "mole_config.json records) whose expert answers; required there, refused for other adapters")


def chosen_domain(spec: AdapterSpec, domain: str | None) -> int | None:
    """``--domain``'s expert index for a domain-routed adapter (``None`` for any other); a one-line
    ``ValueError`` when it is missing, unknown, or given to an adapter that does not route by domain."""
    if spec.routing == "domain" and domain is None:
        raise ValueError(f"this adapter routes by domain ({', '.join(spec.domains)}): --domain NAME says whose expert answers")
    if domain is None:
        return None
    if spec.routing != "domain":
        raise ValueError(f"--domain applies to an adapter trained with mole.routing: domain; this one routes {spec.routing}")
    return spec.domain_index(domain)


def add_preparation_args(parser: argparse.ArgumentParser, device_help: str) -> None:
    """``--image-aspect``, ``--image-backend``, ``--dtype`` and ``--device``: how to run it."""
    parser.add_argument("--image-aspect", choices=options(ImageAspect),
                        help="default: the adapter's data.image_aspect from training (pad if not recorded)")
    parser.add_argument("--image-backend", choices=options(ImageBackend),
                        help="default: the adapter's data.image_backend from training (fast if not recorded)")
    parser.add_argument("--dtype", choices=options(DType), default="fp32")
    parser.add_argument("--device", help=device_help)
