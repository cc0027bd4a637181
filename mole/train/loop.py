"""A training run as a process: start the process group, run the :class:`~mole.train.trainer.Trainer`,
release DeepSpeed's shared memory whatever happens."""

from __future__ import annotations

import logging

import torch.distributed as dist

from mole.config import Config
from mole.distributed import init_distributed, releasing_shared_memory
from mole.train.run_lock import holding_output_dir
from mole.train.signals import StopRequest
from mole.train.trainer import Trainer


def run(cfg: Config, stop: StopRequest | None = None, ds_config: dict | None = None) -> dict:
    """Train as configured, resuming from ``output_dir`` when it holds a checkpoint.

    Returns the last step's reduced metrics. A SIGTERM/SIGUSR1 checkpoints and returns early with
    ``stopped`` set; a completed run writes ``output_dir/done.json``. ``stop`` is a handler installed
    earlier by the caller (a signal during start-up then stops the run after its first step);
    ``ds_config``, the DeepSpeed config if the caller built it already (for ``WORLD_SIZE`` ranks).
    """
    info = init_distributed(cfg.train.collective_seconds())
    dist.barrier()  # every rank past DeepSpeed's start-up (its peers' shared-memory buffers open) before any can fail
    # failed runs release the shared-memory buffers too (they outlive the processes); the output_dir is
    # this run's alone from before any rank writes there until every rank is done
    with releasing_shared_memory(info), holding_output_dir(cfg.output_dir, info.is_main):
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        trainer = Trainer(cfg, stop or StopRequest(), info, ds_config)
        try:
            return trainer.run()
        finally:
            trainer.watchdog.stop()
            trainer.metrics.close()  # a failed run's last TensorBoard events too (closing twice is harmless)
