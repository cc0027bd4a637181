"""The training run: config -> DeepSpeed engine + data stream -> steps -> checkpoints, logs, adapter.

The loop knows nothing about routing beyond the losses the model returns and the routing
statistics its :class:`~mole.experts.RoutingContext` exposes. Every collective it issues (the
metrics all-reduce, checkpoint barriers, evaluation) happens at steps every rank agrees on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from mole.adapter import adapter_config, gather_trainable_state, save_adapter
from mole.config import Config, ConfigError, save_config
from mole.data.collate import to_device
from mole.data.sample import SampleProcessor
from mole.data.shards import expand_shards
from mole.data.stream import Domain, MixedStream, derive_seed, make_loader
from mole.distributed import DistInfo, init_distributed, releasing_shared_memory
from mole.ds_config import build_ds_config, effective_precision
from mole.model import DTYPES, TrainingModel, build_mole_model
from mole.train.checkpoint import Checkpoints, check_resumable_config, record_start, resolve_resume, restore_rng
from mole.train.heldout import heldout_loss, heldout_sets
from mole.train.metrics import StepMetrics, count_parameters
from mole.train.optim import build_optimizer, param_groups, run_settings_kept, warmup_cosine
from mole.train.signals import StopRequest

log = logging.getLogger("mole.train")

DONE_FILE = "done.json"
MAX_NONFINITE_IN_A_ROW = 20


def run(cfg: Config, stop: StopRequest | None = None) -> dict:
    """Train as configured, resuming from ``output_dir`` when it holds a checkpoint.

    Returns the last step's reduced metrics. A SIGTERM/SIGUSR1 checkpoints and returns early with
    ``stopped`` set; a completed run writes ``output_dir/done.json``. ``stop`` is a handler installed
    earlier by the caller (a signal during start-up then stops the run after its first step).
    """
    info = init_distributed()
    dist.barrier()  # every rank past DeepSpeed's start-up (its peers' shared-memory buffers open) before any can fail
    with releasing_shared_memory(info):  # failed runs too: the buffers outlive the processes
        return _start_and_train(cfg, stop or StopRequest(), info)


def _start_and_train(cfg: Config, stop: StopRequest, info: DistInfo) -> dict:
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    precision = effective_precision(cfg.train.precision)
    if precision == "fp16" and info.device.type == "cpu":
        raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has none); use auto, "
                          "fp32 or bf16", "train.precision")
    ds_config = build_ds_config(cfg, info.world_size)
    domains = [Domain(d.name, expand_shards(d.name, d.shards), d.weight) for d in cfg.data.domains]
    resume = resolve_resume(cfg.train.resume, cfg.output_dir, info.world_size)
    if resume is not None:
        check_resumable_config(resume, cfg)  # before config.yaml is replaced by one the checkpoint cannot load
    if info.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        with contextlib.suppress(FileNotFoundError):  # an earlier, shorter run's: this one is not done yet
            os.remove(os.path.join(cfg.output_dir, DONE_FILE))

    llava, surgery, processor = build_mole_model(cfg, DTYPES[precision], ds_config)
    if cfg.train.gradient_checkpointing:
        llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = TrainingModel(llava, surgery, cfg.mole.aux_loss, cfg.mole.aux_weight)
    engine = _make_engine(model, cfg, ds_config)
    checkpoints = Checkpoints(os.path.join(cfg.output_dir, "checkpoints"), cfg.train.keep_checkpoints,
                              info.rank, info.world_size)
    start_step = 0
    torch.manual_seed(derive_seed(cfg.train.seed, "dropout", info.rank) % 2**63)
    if resume is not None:
        with run_settings_kept(engine.lr_scheduler):
            engine.load_checkpoint(resume.path, tag=resume.tag, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        start_step = restore_rng(os.path.join(resume.path, resume.tag), info.rank)
        if info.is_main:
            record_start(cfg.train.resume, cfg.output_dir)
        log.info("resumed from %s/%s at step %d", resume.path, resume.tag, start_step)

    counts = count_parameters(model)
    log.info("parameters: %s trainable of %s total (%.3f%%); %d of %d tensors partitioned by ZeRO-3, %d ZeRO-3 "
             "leaf modules; precision %s", f"{counts['trainable']:,}", f"{counts['total']:,}",
             100 * counts["trainable"] / counts["total"], counts["partitioned"], counts["tensors"],
             counts["zero3_leaf_modules"], precision)
    process = SampleProcessor(processor, cfg.data.max_length, cfg.data.image_aspect,
                              image_backend=cfg.data.image_backend, max_image_pixels=cfg.data.max_image_pixels)
    if cfg.data.max_length <= process.num_image_tokens:
        log.warning("data.max_length=%d is not above the %d tokens one image takes: every sample with an image "
                    "will be skipped as too_long (LLaVA-1.5 wants about 2048)", cfg.data.max_length, process.num_image_tokens)
    stream = MixedStream(domains, process, batch_size=cfg.train.micro_batch_size,
                         pad_token_id=processor.tokenizer.pad_token_id, seed=cfg.train.seed, rank=info.rank,
                         start_step=start_step, shuffle_buffer=cfg.data.shuffle_buffer)
    batches = iter(make_loader(stream, cfg.data.num_workers, pin_memory=info.device.type == "cuda"))
    heldout = heldout_sets(cfg, process, processor.tokenizer.pad_token_id, info)
    text_config = llava.config.text_config
    metrics = StepMetrics(cfg.output_dir, info.rank, [d.name for d in domains], text_config.num_hidden_layers,
                          cfg.mole.num_experts, resume_step=start_step)
    metrics.record({"event": "start", "rank": info.rank, "from_step": start_step, "parameters": counts})

    last: dict = {"step": start_step}
    stopped = False
    progress = tqdm(total=cfg.train.max_steps, initial=start_step, disable=None if info.is_main else True,
                    desc="train", dynamic_ncols=True)
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        started, lr = time.perf_counter(), engine.get_lr()[0]
        _train_step(engine, batches, metrics, surgery, cfg, info, step)
        last = metrics.end_step(step, lr, _grad_norm(engine), time.perf_counter() - started, stop.requested)
        progress.update(1)
        progress.set_postfix(loss=f"{last['loss']:.4f}", aux=f"{last['aux_loss']:.3f}")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            metrics.log_skip_reasons(step)
            log.info("step %d/%d loss %.4f lm_loss %.4f aux_loss %.4f lr %.2e",
                     step, cfg.train.max_steps, last["loss"], last["lm_loss"], last["aux_loss"], last["lr"])
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"non-finite loss {last['loss']} at step {step} (train.on_nonfinite=stop)")
        if cfg.train.log_routing_every and step % cfg.train.log_routing_every == 0:
            metrics.log_routing(step)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            _evaluate(engine, heldout, metrics, step, info)
        if last["stop"]:
            log.warning("stop requested (%s) at step %d: saving a checkpoint and exiting", stop.signal_name or "another rank", step)
            if step % cfg.train.log_every != 0 and step != cfg.train.max_steps:
                metrics.log_skip_reasons(step)  # the counts since the last log would be lost (every rank is here)
            _save(engine, checkpoints, model, cfg, llava.config, info, step)
            # a stop that lands on the last step has nothing left to do: the run is done, not stopped
            stopped = step < cfg.train.max_steps
            break
        if step == cfg.train.max_steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
            _save(engine, checkpoints, model, cfg, llava.config, info, step)
    progress.close()
    if start_step >= cfg.train.max_steps:  # nothing left to do: still leave a fresh adapter behind
        log.info("the run had already reached train.max_steps=%d", cfg.train.max_steps)
        _save_adapter(model, cfg, llava.config, info)
    if not stopped and info.is_main:
        with open(os.path.join(cfg.output_dir, DONE_FILE), "w") as handle:
            json.dump(last, handle)
        log.info("done at step %d: adapter in %s", last["step"], os.path.join(cfg.output_dir, "adapter"))
    metrics.close()
    stop.restore_defaults()
    dist.barrier()
    return {**last, "stopped": stopped}


def _train_step(engine, batches, metrics: StepMetrics, surgery, cfg: Config, info: DistInfo, step: int) -> None:
    """``grad_accum`` micro-batches (forward, backward, engine.step: DeepSpeed steps at the boundary)."""
    done = skipped_in_a_row = 0
    while done < cfg.train.grad_accum:
        batch = next(batches)
        metrics.add_skipped(batch.get("skipped", {}))
        out = engine(**to_device(batch, info.device))
        if cfg.train.on_nonfinite == "skip" and _any_rank_nonfinite(out["loss"]):
            metrics.skipped_nonfinite += 1
            skipped_in_a_row += 1
            log.warning("non-finite loss at step %d on some rank: micro-batch skipped on all ranks", step)
            if skipped_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise FloatingPointError(f"{skipped_in_a_row} non-finite micro-batches in a row at step {step}")
            continue
        engine.backward(out["loss"])
        engine.step()
        metrics.add_micro_batch(batch, out, surgery.context.stats())
        surgery.context.clear()  # a recompute's routing graph (gradient checkpointing) would live until the next forward
        done += 1
        skipped_in_a_row = 0


def _any_rank_nonfinite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    if dist.is_initialized():
        dist.all_reduce(flag)
    return bool(flag.item())


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _make_engine(model: TrainingModel, cfg: Config, ds_config: dict):
    """DeepSpeed engine over a torch optimizer (nothing JIT-compiled) with warmup + cosine LR."""
    import deepspeed

    groups = param_groups(model, cfg.train.lr, cfg.train.projector_lr)
    optimizer = build_optimizer(groups, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def _evaluate(engine, heldout: dict[str, list[dict]], metrics: StepMetrics, step: int, info: DistInfo) -> None:
    losses = {f"eval/loss/{name}": heldout_loss(engine, batches, info.device) for name, batches in heldout.items()}
    metrics.write_scalars(step, losses)
    if losses:
        log.info("step %d held-out %s", step, ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in losses.items()))


def _save(engine, checkpoints: Checkpoints, model: TrainingModel, cfg: Config, llava_config, info: DistInfo,
          step: int) -> None:
    checkpoints.save(engine, step)
    _save_adapter(model, cfg, llava_config, info)


def _save_adapter(model: TrainingModel, cfg: Config, llava_config, info: DistInfo) -> None:
    """Gather the trainable weights on every rank; rank 0 writes ``output_dir/adapter``."""
    state = gather_trainable_state(model.llava)
    if info.is_main:
        save_adapter(os.path.join(cfg.output_dir, "adapter"), state, adapter_config(cfg, llava_config))
    dist.barrier()
