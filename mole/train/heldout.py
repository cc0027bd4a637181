"""Held-out loss per domain during training, on each domain's ``val_shards``.

Every rank reads the same validation samples in the same order and takes its share (usable sample i
goes to rank i mod world size, :mod:`mole.data.examples`). Ranks may hold different numbers of
batches, but under ZeRO-3 every forward is a sequence of collectives, so every rank runs the same
number of forwards: ranks that run out repeat a batch with weight zero.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.distributed as dist

from mole.config import Config, ConfigError
from mole.data.collate import collate, to_device
from mole.data.conversation import IGNORE_INDEX
from mole.data.examples import shard_examples
from mole.data.sample import SampleProcessor
from mole.data.shards import expand_shards
from mole.distributed import DistInfo

log = logging.getLogger("mole.train")  # its warnings are the trainer's start-up lines


def heldout_sets(cfg: Config, process: SampleProcessor, pad_token_id: int, info: DistInfo) -> dict[str, list[dict]]:
    """Validation batches per domain with ``val_shards``, read once (they are small by design).

    Every rank must hold a batch of each domain (the forwards are collectives): checked now, on all
    ranks alike, rather than at the first evaluation on one of them.
    """
    if not cfg.train.eval_every:
        return {}
    sets = {}
    for domain in cfg.data.domains:
        if domain.val_shards is None:
            continue
        urls = expand_shards(domain.name, domain.val_shards)
        sets[domain.name] = heldout_batches(urls, process, cfg.train.micro_batch_size, pad_token_id,
                                            cfg.train.eval_batches, info.rank, info.world_size)
    if not sets and info.is_main:
        log.warning("train.eval_every is set but no domain has val_shards: nothing to evaluate")
    fewest = torch.tensor([len(batches) for batches in sets.values()], dtype=torch.long)
    if dist.is_initialized() and len(fewest):
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
    for (name, _), count in zip(sets.items(), fewest.tolist()):
        index = next(i for i, d in enumerate(cfg.data.domains) if d.name == name)
        if count == 0:
            raise ConfigError(f"data.domains[{index}].val_shards: domain {name!r} has fewer usable held-out samples "
                              f"than the {info.world_size} ranks that share them", f"data.domains[{index}].val_shards")
    return sets


def heldout_batches(urls: list[str], process: SampleProcessor, batch_size: int, pad_token_id: int,
                    max_batches: int, rank: int, world_size: int) -> list[dict]:
    """This rank's share of the first ``max_batches * batch_size * world_size`` usable samples, batched
    (their domain ids are 0: only the loss is wanted)."""
    examples = list(shard_examples(urls, process, Counter(), rank=rank, world_size=world_size,
                                   limit=max_batches * batch_size * world_size, deal="usable"))
    return [collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def heldout_loss(engine, batches: list[dict], device: torch.device) -> float:
    """Token-weighted mean answer loss over all ranks' batches (the same forwards on every rank)."""
    count = torch.tensor([len(batches)], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    total = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, tokens)
    was_training = engine.training
    engine.eval()
    for i in range(int(count)):
        batch = batches[min(i, len(batches) - 1)] if batches else None
        if batch is None:
            raise RuntimeError("a rank has no held-out batch; every domain needs at least world_size samples")
        out = engine(**to_device(batch, device))
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        weight = 1.0 if i < len(batches) else 0.0
        total += torch.tensor([float(out["lm_loss"]) * tokens * weight, tokens * weight], dtype=torch.float64)
    if was_training:
        engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()
