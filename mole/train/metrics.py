"""Per-step metrics: each rank's own record (``output_dir/logs/rank<N>.jsonl``) and cross-rank means.

The per-rank record keeps what differs between ranks (routing, images seen, skips) so routing
behaviour can be checked rank by rank; the returned values are reduced over all ranks.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch
import torch.distributed as dist


def count_parameters(model: torch.nn.Module) -> dict:
    """Trainable / total parameter counts, using ZeRO-3's full sizes for partitioned tensors."""
    total = trainable = partitioned = tensors = 0
    for param in model.parameters():
        tensors += 1
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
        if hasattr(param, "ds_numel") and not param.ds_persist:  # only a shard is held between uses
            partitioned += 1
    return {"total": total, "trainable": trainable, "tensors": tensors, "partitioned": partitioned}


class RankLog:
    """Accumulates micro-batches into one record per optimizer step."""

    def __init__(self, output_dir: str, rank: int, domain_names: list[str], parameter_counts: dict):
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
        self.file = open(os.path.join(output_dir, "logs", f"rank{rank}.jsonl"), "a")
        self.domain_names = domain_names
        self._write({"event": "start", "rank": rank, "parameters": parameter_counts})
        self._reset()

    def _reset(self) -> None:
        self.sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
        self.micro_batches = self.images = 0
        self.load: torch.Tensor | None = None
        self.domains: Counter = Counter()
        self.skipped: Counter = Counter()

    def add_micro_batch(self, batch: dict, out: dict, load: torch.Tensor) -> None:
        for key in self.sums:
            self.sums[key] += float(out[key].detach())
        self.micro_batches += 1
        self.images += 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
        self.load = load.cpu() if self.load is None else self.load + load.cpu()
        self.domains.update(self.domain_names[i] for i in batch["domain"].tolist())
        self.skipped.update(batch.get("skipped", {}))

    def end_step(self, step: int, lr: float, seconds: float) -> dict:
        """Write this rank's record and return the step's metrics averaged over ranks."""
        local = {k: v / self.micro_batches for k, v in self.sums.items()}
        record = {
            "step": step,
            **local,
            "lr": lr,
            "seconds": seconds,
            "images": self.images,
            "domains": dict(self.domains),
            "skipped": dict(self.skipped),
            "expert_load": self.load.tolist() if self.load is not None and self.load.numel() else [],
        }
        self._write(record)
        values = torch.tensor([local["loss"], local["lm_loss"], local["aux_loss"]], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= dist.get_world_size()
        self._reset()
        return {"step": step, "loss": values[0].item(), "lm_loss": values[1].item(), "aux_loss": values[2].item(), "lr": lr}

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
