"""Held-out loss per domain during training, on each domain's ``val_shards``.

Every rank reads the same validation samples in the same order and takes its share (sample i
goes to rank i mod world size). Ranks may hold different numbers of batches, but under ZeRO-3 every
forward is a sequence of collectives, so every rank runs the same number of forwards: ranks that run
out repeat a batch with weight zero.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from mole.data.collate import collate
from mole.data.conversation import IGNORE_INDEX
from mole.data.errors import BadSample
from mole.data.sample import SampleProcessor
from mole.data.shards import read_shard

log = logging.getLogger(__name__)


def heldout_batches(urls: list[str], process: SampleProcessor, batch_size: int, pad_token_id: int,
                    max_batches: int, rank: int, world_size: int) -> list[dict]:
    """This rank's share of the first ``max_batches * world_size`` batches of valid samples."""
    wanted = max_batches * batch_size * world_size
    examples, index = [], 0
    for raw in (sample for url in urls for sample in read_shard(url)):
        if index >= wanted:
            break
        if isinstance(raw, BadSample):
            continue
        try:
            example = process(raw)
        except BadSample:
            continue
        if index % world_size == rank:
            example["domain"] = 0
            examples.append(example)
        index += 1
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
        inputs = {k: (batch[k].to(device) if batch[k] is not None else None)
                  for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        out = engine(**inputs)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        weight = 1.0 if i < len(batches) else 0.0
        total += torch.tensor([float(out["lm_loss"]) * tokens * weight, tokens * weight], dtype=torch.float64)
    if was_training:
        engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()
