"""Per-step metrics: every rank's own record, cross-rank reduction, TensorBoard and metrics.jsonl.

Each rank appends what differs between ranks (routing, images, skips) to
``output_dir/logs/rank<N>.jsonl``. Values for TensorBoard are reduced over all ranks with *one*
all-reduce per step, whose layout is fixed by the run (domains, layers, experts), so every rank
issues the same collective whatever it saw. Rank 0 writes ``output_dir/tensorboard`` and
``output_dir/metrics.jsonl``; the step of every point is the number of optimizer steps completed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

import torch
import torch.distributed as dist

from mole.experts import RoutingStats
from mole.routing_analysis import domain_expert_counts, domain_expert_shares, layer_nmi
from mole.routing_plots import routing_heatmap_array

log = logging.getLogger(__name__)


def count_parameters(model: torch.nn.Module) -> dict:
    """Trainable / total parameter counts, using ZeRO-3's full sizes for partitioned tensors, and how
    many modules ZeRO-3 treats as leaves (gathered whole on entry, no hooks on their submodules)."""
    total = trainable = partitioned = tensors = 0
    for param in model.parameters():
        tensors += 1
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
        if hasattr(param, "ds_numel") and not param.ds_persist:  # only a shard is held between uses
            partitioned += 1
    leaves = sum(bool(getattr(module, "_z3_leaf", False)) for module in model.modules())
    return {"total": total, "trainable": trainable, "tensors": tensors, "partitioned": partitioned,
            "zero3_leaf_modules": leaves}


def truncate_jsonl(path: str, after_step: int) -> None:
    """Drop records past ``after_step``: a resumed run re-logs the steps after its checkpoint."""
    if not os.path.exists(path):
        return
    keep, torn = [], 0
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash or a full disk
                torn += 1
                continue
            if record.get("step", 0) <= after_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    if torn:
        log.warning("%s: dropped %d unreadable line(s) left by an interrupted run", path, torn)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.writelines(keep)
    os.replace(tmp, path)


class StepMetrics:
    """Accumulates micro-batches into one optimizer step, then reduces and writes it."""

    def __init__(self, output_dir: str, rank: int, domain_names: list[str], num_layers: int, num_experts: int,
                 resume_step: int = 0):
        self.rank, self.domain_names = rank, domain_names
        self.num_layers = num_layers if num_experts > 1 else 0
        self.num_experts = num_experts
        rank_log = os.path.join(output_dir, "logs", f"rank{rank}.jsonl")
        os.makedirs(os.path.dirname(rank_log), exist_ok=True)
        truncate_jsonl(rank_log, resume_step)
        self.file = open(rank_log, "a")
        self.writer = self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            jsonl = os.path.join(output_dir, "metrics.jsonl")
            truncate_jsonl(jsonl, resume_step)
            self.jsonl = open(jsonl, "a")
            # purge_step drops events a killed run logged after its last checkpoint
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1)
        self.routing = torch.zeros(self.num_layers, len(domain_names), num_experts, dtype=torch.float64)  # since the last heatmap
        self.skipped_since_log: Counter = Counter()
        self._reset()

    def record(self, record: dict) -> None:
        """A free-form line in this rank's log (start-up facts, events)."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def _reset(self) -> None:
        self.sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
        self.micro_batches = self.images = self.tokens = self.slots = self.samples = self.skipped_nonfinite = 0
        self.skipped_nonfinite_steps = 0  # 1 when this step's update was skipped (every rank agrees)
        self.load = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.entropy = torch.zeros(self.num_layers, dtype=torch.float64)  # summed over tokens, nats
        self.domains = torch.zeros(len(self.domain_names), dtype=torch.float64)
        self.skipped: Counter = Counter()

    def add_micro_batch(self, batch: dict, out: dict, stats: list[RoutingStats]) -> None:
        """``stats``: the routing statistics of this micro-batch's forward, one per routed layer (one row
        per sample, packed or not). ``out["lm_loss"]`` is the micro-batch's share of the global batch's
        mean scaled by ``grad_accum * world_size`` (:mod:`mole.lm_loss`), so its mean over micro-batches
        and ranks (:meth:`end_step`) is the global batch's LM loss."""
        for key in self.sums:
            self.sums[key] += float(out[key].detach())
        self.micro_batches += 1
        self.images += batch["num_images"]
        self.tokens += int(batch["tokens"])  # real tokens: a packed batch has no attention mask
        self.slots += batch["input_ids"].numel()
        self.samples += len(batch["domain"])
        self.domains += torch.bincount(batch["domain"].cpu(), minlength=len(self.domain_names)).double()
        if stats:
            by_domain = domain_expert_counts(stats, batch["domain"], len(self.domain_names))  # (layers, domains, K)
            self.routing += by_domain
            self.load += by_domain.sum(dim=1)
            self.entropy += torch.stack([layer.entropy_sum.sum() for layer in stats]).to("cpu", torch.float64)

    def add_skipped(self, skipped: dict) -> None:
        self.skipped.update(skipped)
        self.skipped_since_log.update(skipped)

    def end_step(self, step: int, lr: float, grad_norm: float | None, seconds: float, stop_requested: bool) -> dict:
        """Write this rank's record; reduce over ranks (one all-reduce); rank 0 writes TensorBoard.

        Returns the reduced metrics (the same on every rank), including ``stop`` (any rank asked).
        """
        local = {k: v / max(self.micro_batches, 1) for k, v in self.sums.items()}
        self.record({
            "step": step, **local, "lr": lr, "seconds": seconds, "images": self.images, "tokens": self.tokens,
            "samples": self.samples, "slots": self.slots,
            "domains": {n: int(c) for n, c in zip(self.domain_names, self.domains.tolist()) if c},
            "skipped": dict(self.skipped), "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_nonfinite_steps": self.skipped_nonfinite_steps,
            "expert_load": self.load.tolist(),
        })
        scalars = torch.tensor([local["loss"], local["lm_loss"], local["aux_loss"], self.tokens, self.samples,
                                float(stop_requested), sum(self.skipped.values()), self.slots], dtype=torch.float64)
        packed = torch.cat([scalars, self.domains, self.load.flatten(), self.entropy])
        world = 1
        if dist.is_initialized():
            dist.all_reduce(packed)
            world = dist.get_world_size()
        loss, lm_loss, aux, tokens, samples, stop, skipped, slots = packed[:8].tolist()
        domains = packed[8 : 8 + len(self.domain_names)]
        load_end = 8 + len(self.domain_names) + self.load.numel()
        load = packed[8 + len(self.domain_names) : load_end].reshape(self.num_layers, self.num_experts)
        entropy = packed[load_end:]
        reduced = {"step": step, "loss": loss / world, "lm_loss": lm_loss / world, "aux_loss": aux / world,
                   "lr": lr, "stop": stop > 0}
        if self.writer is not None:
            scalars = {
                "train/loss": reduced["loss"], "train/lm_loss": reduced["lm_loss"], "train/aux_loss": reduced["aux_loss"],
                "train/lr": lr, "perf/tokens_per_s": tokens / seconds, "perf/samples_per_s": samples / seconds,
                "perf/padding_fraction": 1 - tokens / max(slots, 1),
                "data/skipped": skipped, "train/skipped_nonfinite_steps": self.skipped_nonfinite_steps,
            }
            if grad_norm is not None:
                scalars["train/grad_norm"] = grad_norm
            for name, count in zip(self.domain_names, domains.tolist()):
                scalars[f"data/samples/{name}"] = count
            routed_tokens = load.sum(dim=1, keepdim=True).clamp(min=1)
            fractions = load / routed_tokens
            for layer in range(self.num_layers):
                for expert in range(self.num_experts):
                    scalars[f"moe/load/layer_{layer}/expert_{expert}"] = fractions[layer, expert].item()
                scalars[f"moe/router_entropy/layer_{layer}"] = (entropy[layer] / routed_tokens[layer, 0]).item()
            self.write_scalars(step, scalars)
        self._reset()
        return reduced

    def write_scalars(self, step: int, scalars: dict) -> None:
        """Rank 0 only: TensorBoard and a ``metrics.jsonl`` line with the same values."""
        if self.writer is None or not scalars:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def log_skip_reasons(self, step: int) -> dict:
        """Per-reason skip counts summed over ranks since the last call (a collective on all ranks)."""
        gathered = [None] * dist.get_world_size() if dist.is_initialized() else [self.skipped_since_log]
        if dist.is_initialized():
            dist.all_gather_object(gathered, dict(self.skipped_since_log))
        self.skipped_since_log = Counter()
        total: Counter = Counter()
        for counts in gathered:
            total.update(counts)
        self.write_scalars(step, {f"data/skipped/{key}": value for key, value in sorted(total.items())})
        return dict(total)

    def log_routing(self, step: int) -> torch.Tensor | None:
        """Domain x expert token shares (all ranks, since the last call) as a TensorBoard image."""
        if self.num_layers == 0:
            return None
        routing = self.routing.clone()
        if dist.is_initialized():
            dist.all_reduce(routing)
        self.routing.zero_()
        if self.writer is not None:
            nmi = layer_nmi(routing)
            image = routing_heatmap_array(domain_expert_shares(routing), self.domain_names,
                                          f"share of each domain's tokens per expert since the previous image, step {step}",
                                          nmi=nmi)
            self.writer.add_image("moe/routing", image, step, dataformats="HWC")
            self.write_scalars(step, {f"moe/nmi/layer_{layer}": value for layer, value in enumerate(nmi)})
            self.writer.flush()
        return routing

    def close(self) -> None:
        """Flush and close the rank log, TensorBoard and metrics.jsonl; calling it again does nothing."""
        self.file.close()
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
