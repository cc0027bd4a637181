"""A training run whose backward puts a NaN in one gradient element, on one rank, at one step (tests only).

``deepspeed tests/nan_gradient_run.py STEP RANK --config tiny.yaml [key=value ...]``: launch/train.py's
run, except that at step ``STEP`` rank ``RANK`` sets the last element of the gradient of the last
adapter parameter to NaN. The loss stays finite. That element lies in rank 1's partition under
ZeRO-2 (the end of the first parameter group's flat buffer) and ZeRO-3 (the end of the parameter),
so with ``RANK`` 0 the rank that made the NaN does not hold it after the gradient reduction: the
ranks must agree through the vote. Each rank logs, per step, whether its own share of the gradients
was finite and a checksum of its share of the weights (``{"event": "local", ...}``). Exit 1 on a
``FloatingPointError``, as launch/train.py does.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.distributed as dist

from mole.config import parse_cli
from mole.distributed import init_distributed, releasing_shared_memory
from mole.process_exit import exit_with
from mole.train.finite import all_finite, local_gradients, local_weights
from mole.train.optim import param_groups
from mole.train.signals import StopRequest
from mole.train.trainer import Trainer


class NanGradientTrainer(Trainer):
    def __init__(self, *args, nan_step: int, nan_rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step, self.nan_rank, self.step = nan_step, nan_rank, 0
        target = param_groups(self.model, 1.0, 1.0)[0]["params"][-1]
        target.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        if self.step != self.nan_step or self.info.rank != self.nan_rank:
            return grad
        grad = grad.clone()
        grad.view(-1)[-1] = float("nan")
        return grad

    def train_step(self, step: int) -> dict:
        self.step = step
        out = super().train_step(step)
        checksum = sum(float(w.double().sum()) for w in local_weights(self.model))
        self.metrics.record({"event": "local", "at": step, "weights_checksum": checksum})
        return out

    def _nonfinite_gradients(self, step: int, loss_finite: bool) -> bool:
        self.metrics.record({"event": "local", "at": step, "gradients_finite": all_finite(local_gradients(self.model))})
        return super()._nonfinite_gradients(step, loss_finite)


def main(argv: list[str]) -> int:
    args = [arg for arg in argv if not arg.startswith("--local_rank")]  # the launcher puts --local_rank=N first
    nan_step, nan_rank, cfg = int(args[0]), int(args[1]), parse_cli(args[2:])
    info = init_distributed()
    dist.barrier()
    with releasing_shared_memory(info):
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        try:
            NanGradientTrainer(cfg, StopRequest(), info, nan_step=nan_step, nan_rank=nan_rank).run()
        except FloatingPointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_with(lambda: main(sys.argv[1:]))
