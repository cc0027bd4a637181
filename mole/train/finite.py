"""Are the gradients and weights of a DeepSpeed engine finite? Each rank looks at its own share, one
all-reduce makes every rank agree.

Each rank checks only what it holds without a collective: under ZeRO-3 its partition of each
parameter's reduced gradient and of the fp32 master weight (DeepSpeed's ``safe_get_local_grad`` /
``safe_get_local_fp32_param``); under ZeRO-1/2 the fragment of the flat partition that each parameter
maps to (``param._hp_mapping``: what DeepSpeed's ``safe_get_full_grad`` / ``safe_get_full_fp32_param``
read before their all-reduce); without ZeRO, ``param.grad`` and the parameter. The shares of all ranks
together cover every element once, so a NaN that only one rank holds (after the gradient reduction,
the rank owning that element) is seen by that rank, and :func:`any_rank` tells the others. The
gradients are those of the accumulation boundary: read them after the boundary's ``backward`` and
before ``step``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def local_gradients(model: nn.Module) -> list[torch.Tensor]:
    """This rank's share of the reduced gradients of ``model``'s trainable parameters."""
    from deepspeed.utils import safe_get_local_grad

    grads = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3
            grad = safe_get_local_grad(param)
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2: None where no element of it is this rank's
            grad = _fragment_gradient(param) if param._hp_mapping is not None else None
        else:
            grad = param.grad
        if grad is not None:
            grads.append(grad)
    return grads


def _fragment_gradient(param: torch.Tensor) -> torch.Tensor | None:
    try:
        return param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)
    except ValueError:  # no gradient reached this parameter group in this accumulation window
        return None


def local_weights(model: nn.Module) -> list[torch.Tensor]:
    """This rank's share of ``model``'s trainable weights, as the optimizer holds them (fp32 master
    weights under ZeRO)."""
    from deepspeed.utils import safe_get_local_fp32_param

    weights = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # ZeRO-3
            weights.append(safe_get_local_fp32_param(param))
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2
            if param._hp_mapping is not None:
                weights.append(param._hp_mapping.get_hp_fragment())
        else:
            weights.append(param.detach())
    return weights


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host sync, not one per tensor)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over the ranks, with one all-reduce whatever the flags: every rank must call it
    at the same point, in the same order."""
    packed = torch.tensor([float(flag) for flag in flags])
    if dist.is_initialized():
        dist.all_reduce(packed)
    return [bool(value > 0) for value in packed.tolist()]
