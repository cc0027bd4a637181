"""The training run: config -> DeepSpeed engine + data stream -> steps -> logs and adapter.

The loop knows nothing about routing beyond the losses the model returns and the routing
statistics its :class:`~mole.experts.RoutingContext` exposes.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist

from mole.adapter import adapter_config, gather_trainable_state, save_adapter
from mole.balance import expert_load
from mole.config import Config, save_config
from mole.data.stream import Domain, MixedStream, SampleProcessor, derive_seed, expand_shards, make_loader
from mole.distributed import DistInfo, init_distributed
from mole.ds_config import build_ds_config
from mole.model import DTYPES, TrainingModel, build_mole_model
from mole.surgery import PROJECTOR_PREFIX
from mole.train.metrics import RankLog, count_parameters

log = logging.getLogger("mole.train")


def run(cfg: Config) -> dict:
    """Train as configured; return the final step's reduced metrics (rank 0's view)."""
    info = init_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    ds_config = build_ds_config(cfg, info.world_size)
    domains = [Domain(d.name, expand_shards(d.name, d.shards), d.weight) for d in cfg.data.domains]
    if info.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

    dtype = DTYPES[cfg.train.precision]
    llava, surgery, processor = build_mole_model(cfg, dtype, ds_config)
    model = TrainingModel(llava, surgery, cfg.mole.aux_loss, cfg.mole.aux_weight)
    engine = _make_engine(model, cfg, ds_config)
    torch.manual_seed(derive_seed(cfg.train.seed, "dropout", info.rank) % 2**63)

    counts = count_parameters(model)
    log.info("parameters: %s trainable of %s total (%.3f%%); %s partitioned by ZeRO-3",
             f"{counts['trainable']:,}", f"{counts['total']:,}", 100 * counts["trainable"] / counts["total"], counts["partitioned"])
    stream = MixedStream(
        domains,
        SampleProcessor(processor, cfg.data.max_length, cfg.data.image_aspect),
        batch_size=cfg.train.micro_batch_size,
        pad_token_id=processor.tokenizer.pad_token_id,
        seed=cfg.train.seed,
        rank=info.rank,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    batches = iter(make_loader(stream, cfg.data.num_workers, pin_memory=info.device.type == "cuda"))
    rank_log = RankLog(cfg.output_dir, info.rank, [d.name for d in domains], counts)
    last = {}
    for step in range(1, cfg.train.max_steps + 1):
        started, lr = time.perf_counter(), engine.get_lr()[0]
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            out = engine(**_model_inputs(batch, info))
            engine.backward(out["loss"])
            engine.step()
            rank_log.add_micro_batch(batch, out, expert_load(surgery.context.stats()))
        last = rank_log.end_step(step, lr, time.perf_counter() - started)
        if info.is_main and (step % cfg.train.log_every == 0 or step == cfg.train.max_steps):
            log.info("step %d/%d loss %.4f lm_loss %.4f aux_loss %.4f lr %.2e",
                     step, cfg.train.max_steps, last["loss"], last["lm_loss"], last["aux_loss"], last["lr"])
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"non-finite loss {last['loss']} at step {step}")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            _save(model, cfg, llava.config, info)
    _save(model, cfg, llava.config, info)
    rank_log.close()
    dist.barrier()
    return last


def _make_engine(model: TrainingModel, cfg: Config, ds_config: dict):
    """DeepSpeed engine over a torch optimizer (nothing JIT-compiled) with warmup + cosine LR."""
    import deepspeed

    projector = [p for n, p in model.named_parameters() if p.requires_grad and PROJECTOR_PREFIX in n]
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and PROJECTOR_PREFIX not in n]
    groups = [{"params": adapters, "lr": cfg.train.lr}]
    if projector:
        groups.append({"params": projector, "lr": cfg.train.projector_lr})
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup, total = cfg.train.warmup_steps, cfg.train.max_steps

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def _model_inputs(batch: dict, info: DistInfo) -> dict:
    keys = ("input_ids", "attention_mask", "labels", "pixel_values")
    return {k: (batch[k].to(info.device, non_blocking=True) if batch[k] is not None else None) for k in keys}


def _save(model: TrainingModel, cfg: Config, llava_config, info: DistInfo) -> None:
    """Gather the trainable weights on every rank; rank 0 writes ``output_dir/adapter``."""
    state = gather_trainable_state(model.llava)
    if info.is_main:
        save_adapter(os.path.join(cfg.output_dir, "adapter"), state, adapter_config(cfg, llava_config))
    dist.barrier()
