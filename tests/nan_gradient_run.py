"""A training run whose backward puts a NaN in one gradient element, on one rank, at one step (tests only).

``deepspeed tests/nan_gradient_run.py STEP RANK LOSS_STEP --config tiny.yaml [key=value ...]``:
launch/train.py's run, except that at step ``STEP`` rank ``RANK`` sets the last element of the
gradient of the last adapter parameter to NaN (the loss stays finite), and at step ``LOSS_STEP`` (0:
never) the same rank makes the loss of its window's first micro-batch NaN. That element lies in rank 1's partition under
ZeRO-2 (the end of the first parameter group's flat buffer) and ZeRO-3 (the end of the parameter),
so with ``RANK`` 0 the rank that made the NaN does not hold it after the gradient reduction: the
ranks must agree through the vote. Each rank logs, per step, whether its own share of the gradients
was finite and a checksum of its share of the weights, and per micro-batch forward the LM-loss
normaliser it was given, its answer tokens and whether its loss was made NaN (``{"event": "local", ...}``). Exit 1 on a
``FloatingPointError``, as launch/train.py does.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.distributed as dist

from mole.config import parse_cli
from mole.distributed import init_distributed, releasing_shared_memory
from mole.lm_loss import answer_tokens
from mole.process_exit import exit_with
from mole.train.finite import all_finite, local_gradients, local_weights
from mole.train.optim import param_groups
from mole.train.signals import StopRequest
from mole.train.trainer import Trainer


class NanGradientTrainer(Trainer):
    def __init__(self, *args, nan_step: int, nan_rank: int, loss_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step, self.nan_rank, self.loss_step, self.step, self.forwards = nan_step, nan_rank, loss_step, 0, 0
        target = param_groups(self.model, 1.0, 1.0)[0]["params"][-1]
        target.register_hook(self._poison)
        self.model.register_forward_hook(self._forward, with_kwargs=True)

    def _forward(self, module, args, kwargs, out: dict) -> dict:
        poisoned = self.step == self.loss_step and self.info.rank == self.nan_rank and self.forwards == 0
        self.forwards += 1
        self.metrics.record({"event": "local", "at": self.step, "normaliser": kwargs["loss_normaliser"],
                             "answer_tokens": int(answer_tokens(kwargs["labels"])), "poisoned": poisoned})
        return {**out, "loss": out["loss"] * float("nan")} if poisoned else out

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        if self.step != self.nan_step or self.info.rank != self.nan_rank:
            return grad
        grad = grad.clone()
        grad.view(-1)[-1] = float("nan")
        return grad

    def train_step(self, step: int) -> dict:
        self.step, self.forwards = step, 0
        out = super().train_step(step)
        checksum = sum(float(w.double().sum()) for w in local_weights(self.model))
        self.metrics.record({"event": "local", "at": step, "weights_checksum": checksum})
        return out

    def _nonfinite_gradients(self, step: int, loss_finite: bool) -> bool:
        self.metrics.record({"event": "local", "at": step, "gradients_finite": all_finite(local_gradients(self.model))})
        return super()._nonfinite_gradients(step, loss_finite)


def main(argv: list[str]) -> int:
    args = [arg for arg in argv if not arg.startswith("--local_rank")]  # the launcher puts --local_rank=N first
    nan_step, nan_rank, loss_step, cfg = int(args[0]), int(args[1]), int(args[2]), parse_cli(args[3:])
    info = init_distributed()
    dist.barrier()
    with releasing_shared_memory(info):
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        try:
            NanGradientTrainer(cfg, StopRequest(), info, nan_step=nan_step, nan_rank=nan_rank, loss_step=loss_step).run()
        except FloatingPointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_with(lambda: main(sys.argv[1:]))
