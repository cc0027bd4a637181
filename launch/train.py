"""Train a MoLE LLaVA: ``deepspeed launch/train.py --config launch/configs/tiny.yaml [key=value ...]``."""

import os
import sys
import warnings

from mole.config import ConfigError, parse_cli, usage
from mole.ds_config import build_ds_config
from mole.process_exit import exit_with
from mole.train.signals import StopRequest


def say(line: str) -> None:
    """``line`` on stderr in one write: every rank shares the launcher's stderr, and ``print``'s two writes
    (the text, then the newline; ranks run unbuffered under ``python -u``) can interleave with another
    rank's, running two ranks' lines into one."""
    sys.stderr.write(line + "\n")


def main() -> int:
    # First, before the slow imports: SLURM's warning signal can come while torch and DeepSpeed load,
    # and an uncaught SIGUSR1 kills the rank; caught here, it stops the run after its first step.
    stop = StopRequest(ctrl_c=True)
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(usage("deepspeed launch/train.py"))
        return 0
    try:
        cfg = parse_cli(sys.argv[1:])
        ds_config = build_ds_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # its errors too, before any load
    except ConfigError as err:
        say(f"config error: {err}")
        return 2
    # torch deprecates the collectives DeepSpeed's ZeRO-3 calls; without this, each rank warns every step
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            FutureWarning)
    import torch.distributed as dist

    from mole.data.errors import DataError
    from mole.surgery import SurgeryError
    from mole.train.checkpoint import CheckpointError
    from mole.train.loop import run  # heavy imports only after the config is known to be valid
    from mole.train.run_lock import RunLockedError

    try:
        run(cfg, stop, ds_config)
    except (CheckpointError, DataError, FloatingPointError, FileNotFoundError, SurgeryError) as err:
        say(f"error: {err}")
        return 1
    except ConfigError as err:  # what only the rank can check (fp16 without a GPU)
        say(f"config error: {err}")
        return 2
    except RunLockedError as err:  # another run holds output_dir: nothing of it was touched
        say(f"error: {err}")
        return 2
    finally:
        # on every path, failed runs included: peers learn at once that this rank is gone
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_with(main)
