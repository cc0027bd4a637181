"""Mixture-of-LoRA-Experts (LLaVA-MoLE) finetuning of LLaVA under DeepSpeed.

``import mole`` stays light: :func:`load_model` (from :mod:`mole.inference`) is imported on first use.
"""

__all__ = ["load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from mole.inference import load_model

        return load_model
    raise AttributeError(f"module 'mole' has no attribute {name!r}")
