"""Fill a DeepSpeed JSON's ``"auto"`` values from the mole Config, so batch sizes live in one place.

The JSON owns what only DeepSpeed cares about (ZeRO stage, bucket sizes); our Config owns what the
training loop must also know (micro-batch, accumulation, clipping, precision). Any value both could
set is ``"auto"`` in the JSON; an explicit value that disagrees with the Config is an error rather
than a silent winner, because a mismatched ``gradient_accumulation_steps`` changes the effective
batch without any visible failure. The optimizer and scheduler are built by mole as torch objects
(from ``train.optimizer`` / ``train.lr``), so a JSON that declares its own is refused.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from mole.config import Config, ConfigError

STEPS_PER_PRINT = 10**9
"""DeepSpeed's own step logging is noise next to mole's metrics; push it out of reach."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.ds_config: {path} is not readable JSON: {e}", "train.ds_config") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.ds_config: {path} must hold a JSON object", "train.ds_config")
    return ds


def effective_precision(precision: str) -> str:
    """``auto`` is bf16 where a GPU is visible and fp32 on CPU; anything else is taken as given."""
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def _ours(cfg: Config, world_size: int) -> list[tuple[tuple[str, ...], Any, str]]:
    """(JSON path, value mole wants, how the value follows from the Config) for every shared key."""
    t = cfg.train
    batch = t.micro_batch_size * t.grad_accum * world_size
    resolved = effective_precision(t.precision)
    precision = f"train.precision={t.precision!r}" + (f" (-> {resolved})" if resolved != t.precision else "")
    micro = f"train.micro_batch_size={t.micro_batch_size}"
    return [
        (("train_micro_batch_size_per_gpu",), t.micro_batch_size, micro),
        (("gradient_accumulation_steps",), t.grad_accum, f"train.grad_accum={t.grad_accum}"),
        (
            ("train_batch_size",),
            batch,
            f"train.micro_batch_size * train.grad_accum * world_size = "
            f"{t.micro_batch_size} * {t.grad_accum} * {world_size} = {batch}",
        ),
        (("gradient_clipping",), t.grad_clip, f"train.grad_clip={t.grad_clip}"),
        (("bf16", "enabled"), resolved == "bf16", precision),
        (("fp16", "enabled"), resolved == "fp16", precision),
    ]


def _autos(node: Any, path: str = "") -> list[str]:
    """JSON paths (``a.b[2].c``) of every ``"auto"`` value left in ``node``."""
    if node == "auto":
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _autos(v, f"{path}[{i}]")]
    return []


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks (a new dict; the file is untouched).

    Every shared key that is ``"auto"`` or absent takes mole's value; an explicit value that differs
    is a ConfigError naming both sides. ``steps_per_print`` defaults to "never". Raises if any
    ``"auto"`` is left that mole cannot fill (e.g. a bucket size), naming its JSON path.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    path = cfg.train.ds_config
    ds = copy.deepcopy(_read_json(path))
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{path} has a '{section}' section; remove it: mole builds the optimizer and schedule "
                "from train.optimizer, train.lr, train.warmup_steps",
                "train.ds_config",
            )
    for keys, value, source in _ours(cfg, world_size):
        node = ds
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: '{k}' must be a JSON object", "train.ds_config")
        name, dotted = keys[-1], ".".join(keys)
        current = node.get(name, "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"{path} sets {dotted}={json.dumps(current)} but {source}; "
                'set it to "auto" or make them agree',
                "train.ds_config",
            )
        node[name] = value
    if ds.get("steps_per_print", "auto") == "auto":
        ds["steps_per_print"] = STEPS_PER_PRINT
    # mole passes torch optimizers; without this flag ZeRO refuses anything it has not tested.
    ds["zero_allow_untested_optimizer"] = True
    left = _autos(ds)
    if left:
        raise ConfigError(
            f'{path}: {", ".join(left)} is "auto" but mole has no value for it; give it an explicit value',
            "train.ds_config",
        )
    return ds
