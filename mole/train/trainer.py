"""The trainer: config -> DeepSpeed engine + data stream -> steps -> checkpoints, logs, adapter.

:class:`Trainer` builds its parts once (engine, batches, held-out sets, metrics, checkpointer) and
runs the steps. It knows nothing about routing beyond the losses the model returns and the routing
statistics its :class:`~mole.experts.RoutingContext` exposes. Every collective it issues (the
metrics all-reduce, the non-finite vote, checkpoint barriers, evaluation) happens at steps every
rank agrees on, in the same order on every rank.
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
from safetensors import SafetensorError
from tqdm import tqdm

from mole.adapter import ADAPTER_CONFIG, check_finite, gather_trainable_state, save_adapter
from mole.config import Config, ConfigError, save_config
from mole.data.collate import to_device
from mole.data.sample import SampleProcessor
from mole.data.shards import expand_shards
from mole.data.stream import Domain, MixedStream, derive_seed, make_loader
from mole.distributed import DistInfo, release_shared_memory
from mole.ds_config import build_ds_config, effective_precision
from mole.inference import PromptEncoder
from mole.lm_loss import window_normaliser
from mole.model import DTYPES, TrainingModel, build_mole_model
from mole.train.checkpoint import (CheckpointError, Checkpoints, check_resumable_config, record_start, resolve_resume,
                                   restore_rng)
from mole.train.finite import all_finite, any_rank, local_gradients, local_weights
from mole.train.heldout import heldout_loss, heldout_scores, heldout_sets
from mole.train.metrics import StepMetrics, count_parameters
from mole.train.optim import build_optimizer, param_groups, run_settings_kept, warmup_cosine
from mole.train.signals import StopRequest
from mole.train.storage import failure_on_any_rank, write_failed
from mole.train.watchdog import Phase, Watchdog, connect_store

log = logging.getLogger("mole.train")

DONE_FILE = "done.json"
MAX_NONFINITE_IN_A_ROW = 20


class Trainer:
    """One training run in ``cfg.output_dir``, resumed from its checkpoint when ``train.resume`` finds one.

    Construction does the start-up in this order: check the precision, resolve what to resume and
    check its config against ``cfg`` (before ``config.yaml`` is replaced by one the checkpoint cannot
    load), write ``config.yaml``, build the model and engine, seed dropout, load the checkpoint,
    then the data. ``ds_config`` is the DeepSpeed config for ``info.world_size`` ranks if the caller
    already built it. ``stop`` is a handler installed by the caller (a signal during start-up stops
    the run after its first step).
    """

    def __init__(self, cfg: Config, stop: StopRequest, info: DistInfo, ds_config: dict | None = None):
        self.cfg, self.stop, self.info = cfg, stop, info
        self.precision = effective_precision(cfg.train.precision)
        if self.precision == "fp16" and info.device.type == "cpu":
            raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has none); use auto, "
                              "fp32 or bf16", "train.precision")
        self.ds_config = ds_config if ds_config is not None else build_ds_config(cfg, info.world_size)
        self.domains = [Domain(d.name, expand_shards(d.name, d.shards), d.weight) for d in cfg.data.domains]
        self.resume = resolve_resume(cfg.train.resume, cfg.output_dir, info.world_size)
        if self.resume is not None:
            check_resumable_config(self.resume, cfg)  # before config.yaml is replaced by one the checkpoint cannot load
        if info.is_main:
            _start_output_dir(cfg)
        processor = self._build_model()
        self.checkpoints = Checkpoints(os.path.join(cfg.output_dir, "checkpoints"), cfg.train.keep_checkpoints,
                                       info.rank, info.world_size)
        torch.manual_seed(derive_seed(cfg.train.seed, "dropout", info.rank) % 2**63)
        self.start_step = self._load_checkpoint()
        self.skipped_updates_in_a_row = 0
        counts = count_parameters(self.model)
        log.info("parameters: %s trainable of %s total (%.3f%%); %d of %d tensors partitioned by ZeRO-3, %d ZeRO-3 "
                 "leaf modules; precision %s", f"{counts['trainable']:,}", f"{counts['total']:,}",
                 100 * counts["trainable"] / counts["total"], counts["partitioned"], counts["tensors"],
                 counts["zero3_leaf_modules"], self.precision)
        self.watchdog = self._start_watchdog()
        try:
            self._build_data(processor)
        except BaseException:
            self.watchdog.stop()
            raise
        self.metrics = StepMetrics(cfg.output_dir, info.rank, [d.name for d in self.domains],
                                   self.llava_config.text_config.num_hidden_layers, cfg.mole.num_experts,
                                   resume_step=self.start_step)
        self.metrics.record({"event": "start", "rank": info.rank, "from_step": self.start_step, "parameters": counts})

    def _build_model(self):
        """The MoLE LLaVA (partitioned under ZeRO-3) and its DeepSpeed engine; returns the HF processor."""
        import deepspeed

        cfg = self.cfg
        llava, self.surgery, processor = build_mole_model(cfg, DTYPES[self.precision], self.ds_config)
        if cfg.train.gradient_checkpointing:
            llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.llava, self.llava_config = llava, llava.config
        self.model = TrainingModel(llava, self.surgery, cfg.mole.aux_loss, cfg.mole.aux_weight)
        groups = param_groups(self.model, cfg.train.lr, cfg.train.projector_lr, self.model.backbone, cfg.train.router_lr)
        optimizer = build_optimizer(groups, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=schedule,
                                                    config=self.ds_config)
        return processor

    def _load_checkpoint(self) -> int:
        """Load the resolved checkpoint (optimizer state and step; this run's LR settings kept) and its
        RNG states; the step to continue after (0 for a fresh run)."""
        if self.resume is None:
            return 0
        resume = self.resume
        with run_settings_kept(self.engine.lr_scheduler):
            self.engine.load_checkpoint(resume.path, tag=resume.tag, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)
        start_step = restore_rng(os.path.join(resume.path, resume.tag), self.info.rank)
        if self.info.is_main:
            record_start(self.cfg.train.resume, self.cfg.output_dir)
        log.info("resumed from %s/%s at step %d", resume.path, resume.tag, start_step)
        return start_step

    def _start_watchdog(self) -> Watchdog:
        """This rank's :class:`Phase`, published and held to ``train.data_timeout_s``/``step_timeout_s``."""
        train, info = self.cfg.train, self.info
        self.phase = Phase()
        self.phase.enter("start-up: held-out sets")
        release = (lambda: release_shared_memory(every_local_rank=True)) if info.device.type == "cpu" else None
        return Watchdog(self.phase, info.rank, info.world_size, train.data_timeout_s, train.step_timeout_s,
                        connect_store(), before_exit=release).start()

    def _build_data(self, processor) -> None:
        """The training batches (this rank's stream, reseeded at ``start_step``) and the held-out sets."""
        cfg, info = self.cfg, self.info
        process = SampleProcessor(processor, cfg.data.max_length, cfg.data.image_aspect,
                                  image_backend=cfg.data.image_backend, max_image_pixels=cfg.data.max_image_pixels,
                                  backbone=self.model.backbone, model_config=self.model.llava.config)
        if cfg.data.max_length <= process.num_image_tokens:
            log.warning("data.max_length=%d is not above the %d tokens one image takes: every sample with an image "
                        "will be skipped as too_long (LLaVA-1.5 wants about 2048)", cfg.data.max_length,
                        process.num_image_tokens)
        pad_token_id = processor.tokenizer.pad_token_id
        stream = MixedStream(self.domains, process, batch_size=cfg.train.micro_batch_size, pad_token_id=pad_token_id,
                             seed=cfg.train.seed, rank=info.rank, start_step=self.start_step,
                             shuffle_buffer=cfg.data.shuffle_buffer, on_read=self.phase.reading,
                             packing=cfg.data.packing, packing_buffer=cfg.data.packing_buffer)
        self.batches = iter(make_loader(stream, cfg.data.num_workers, pin_memory=info.device.type == "cuda"))
        self.heldout = heldout_sets(cfg, process, pad_token_id, info)
        self.answer_encoder = PromptEncoder(processor, cfg.data.image_aspect, cfg.data.image_backend,
                                            backbone=self.model.backbone)  # held-out questions

    def run(self) -> dict:
        """Train to ``train.max_steps``; the last step's reduced metrics, with ``stopped`` set if a
        SIGTERM/SIGUSR1 cut the run short (after a checkpoint). A completed run writes ``done.json``."""
        train = self.cfg.train
        last: dict = {"step": self.start_step}
        stopped = False
        progress = tqdm(total=train.max_steps, initial=self.start_step, disable=None if self.info.is_main else True,
                        desc="train", dynamic_ncols=True)
        for step in range(self.start_step + 1, train.max_steps + 1):
            self.phase.step = step
            last = self.train_step(step)
            progress.update(1)
            progress.set_postfix(loss=f"{last['loss']:.4f}", aux=f"{last['aux_loss']:.3f}")
            self._report(step, last)
            self.maybe_eval(step)
            if last["stop"]:
                log.warning("stop requested (%s) at step %d: saving a checkpoint and exiting",
                            self.stop.signal_name or "another rank", step)
                if step % train.log_every != 0 and step != train.max_steps:
                    self.metrics.log_skip_reasons(step)  # the counts since the last log would be lost (every rank is here)
                self.save(step)
                # a stop that lands on the last step has nothing left to do: the run is done, not stopped
                stopped = step < train.max_steps
                break
            if step == train.max_steps or (train.save_every and step % train.save_every == 0):
                self.save(step)
        progress.close()
        if self.start_step >= train.max_steps:  # nothing left to do: still leave a fresh adapter behind
            log.info("the run had already reached train.max_steps=%d", train.max_steps)
            self.save_adapter()
        self._finish(last, stopped)
        return {**last, "stopped": stopped}

    def train_step(self, step: int) -> dict:
        """``grad_accum`` micro-batches (forward, backward, engine.step: DeepSpeed steps at the boundary);
        the step's metrics, reduced over ranks. The window's micro-batches are drawn first: their answer
        tokens, counted over every rank, normalise the LM loss (:mod:`mole.lm_loss`). With ``on_nonfinite=skip`` a micro-batch whose loss is
        not finite on any rank is dropped on every rank and another drawn, the window's tokens counted
        again with it (a second all-reduce, on every rank), and an update whose
        gradients are not finite on any rank is skipped on every rank; with ``stop`` either stops the
        run before the update. Weights that are not finite after the update always stop it, before
        anything is saved."""
        started, lr = time.perf_counter(), self.engine.get_lr()[0]
        grad_accum = self.cfg.train.grad_accum
        done = skipped_in_a_row = 0
        loss_finite = True
        window = []
        for _ in range(grad_accum):
            self.phase.enter("data", data=True)  # the data limit holds per batch
            window.append(next(self.batches))
        self.phase.enter("answer tokens all-reduce")
        normaliser = window_normaliser(window, grad_accum)  # the LM loss is the mean over the global batch
        while done < grad_accum:
            if window[done] is None:  # in place of a skipped micro-batch, on every rank: the window is recounted
                self.phase.enter("data", data=True)
                window[done] = next(self.batches)
                self.phase.enter("answer tokens all-reduce")
                normaliser = window_normaliser(window, grad_accum)
            batch = window[done]
            self.phase.enter("forward/backward")
            self.metrics.add_skipped(batch.get("skipped", {}))
            out = self.engine(**to_device(batch, self.info.device), loss_normaliser=normaliser)
            if self.cfg.train.on_nonfinite == "skip" and any_rank(not all_finite([out["loss"].detach()]))[0]:
                self.metrics.skipped_nonfinite += 1
                skipped_in_a_row += 1
                window[done] = None
                log.warning("non-finite loss at step %d on some rank: micro-batch skipped on all ranks", step)
                if skipped_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise FloatingPointError(f"{skipped_in_a_row} non-finite micro-batches in a row at step {step}")
                continue
            loss_finite = loss_finite and bool(torch.isfinite(out["loss"].detach()).all())
            self.engine.backward(out["loss"])
            skip_update = self.engine.is_gradient_accumulation_boundary() and self._nonfinite_gradients(step, loss_finite)
            self.engine.step()
            self.metrics.add_micro_batch(batch, out, self.surgery.context.stats())
            self.surgery.context.clear()  # a recompute's routing graph (gradient checkpointing) would live until the next forward
            done += 1
            skipped_in_a_row = 0
        self._check_update(step, skip_update)
        self.phase.enter("metrics all-reduce")
        return self.metrics.end_step(step, lr, _grad_norm(self.engine), time.perf_counter() - started,
                                     self.stop.requested)

    def _nonfinite_gradients(self, step: int, loss_finite: bool) -> bool:
        """At the accumulation boundary, before the update: whether to skip it because some rank holds a
        non-finite gradient (one all-reduce, on every rank whatever its data). Under ``stop`` a
        non-finite gradient or loss ends the run here instead, so the update is never applied."""
        grads_bad, loss_bad = any_rank(not all_finite(local_gradients(self.model)), not loss_finite)
        if not (grads_bad or loss_bad):
            return False
        what = "loss" if loss_bad else "gradients (with a finite loss)"
        if self.cfg.train.on_nonfinite == "stop":
            raise FloatingPointError(f"non-finite {what} at step {step} (train.on_nonfinite=stop): the update was "
                                     "not applied")
        log.warning("non-finite gradients at step %d on some rank: the update is skipped on all ranks", step)
        return True

    def _check_update(self, step: int, skipped: bool) -> None:
        """After ``engine.step``: a skipped update must have been skipped, and the weights must be finite
        (one all-reduce); else the run stops naming the step, before the weights reach a checkpoint,
        the adapter or ``done.json``. Too many skipped updates in a row stop it too."""
        if skipped and self.engine.was_step_applied():  # ZeRO-1/2 with bf16.check_grad_overflow or compute_grad_norm off
            raise FloatingPointError(f"DeepSpeed applied the non-finite gradients of step {step} instead of skipping "
                                     "the update (leave the DeepSpeed JSON's bf16.check_grad_overflow and "
                                     "zero_optimization.compute_grad_norm on)")
        (weights_bad,) = any_rank(not all_finite(local_weights(self.model)))
        if weights_bad:
            raise FloatingPointError(f"non-finite weights after the update of step {step}: stopped before saving them "
                                     "(lower train.lr, or clip with train.grad_clip)")
        self.skipped_updates_in_a_row = self.skipped_updates_in_a_row + 1 if skipped else 0
        self.metrics.skipped_nonfinite_steps += skipped
        if self.skipped_updates_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FloatingPointError(f"{self.skipped_updates_in_a_row} updates in a row skipped for non-finite "
                                     f"gradients, at step {step}")

    def _report(self, step: int, last: dict) -> None:
        """The step's log line and skip counts every ``log_every``, routing every ``log_routing_every``;
        a non-finite loss (``on_nonfinite=stop``) ends the run."""
        train = self.cfg.train
        if step % train.log_every == 0 or step == train.max_steps:
            self.metrics.log_skip_reasons(step)
            log.info("step %d/%d loss %.4f lm_loss %.4f aux_loss %.4f lr %.2e",
                     step, train.max_steps, last["loss"], last["lm_loss"], last["aux_loss"], last["lr"])
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"non-finite loss {last['loss']} at step {step} (train.on_nonfinite=stop)")
        if train.log_routing_every and step % train.log_routing_every == 0:
            self.metrics.log_routing(step)

    def maybe_eval(self, step: int) -> None:
        """Held-out loss per domain every ``eval_every`` steps, and each domain's metrics on generated
        answers with ``eval_max_new_tokens`` (the same forwards on every rank)."""
        train = self.cfg.train
        if not train.eval_every or step % train.eval_every != 0:
            return
        self.phase.enter("eval")
        scalars, shown = {}, []
        for name, held in self.heldout.items():
            values = {"loss": heldout_loss(self.engine, held.batches, self.info.device)}
            if held.metrics:
                scores, answers = heldout_scores(self.engine, held, self.answer_encoder, train.eval_max_new_tokens,
                                                 train.micro_batch_size, self.info.device)
                values |= scores
                self.metrics.record({"event": "heldout_answers", "step": step, "domain": name, "answers": answers})
            scalars |= {f"eval/{metric}/{name}": value for metric, value in values.items()}
            shown.append(f"{name} " + " ".join(f"{metric} {value:.4f}" for metric, value in values.items()))
        self.metrics.write_scalars(step, scalars)
        if scalars:
            log.info("step %d held-out %s", step, ", ".join(shown))

    def save(self, step: int) -> None:
        """A resumable checkpoint of ``step`` and the adapter as of it. The adapter is gathered and
        checked first: non-finite weights are refused before a checkpoint is written or one pruned."""
        self.phase.enter("save")
        state = self._adapter_state(f"step {step}")
        self.checkpoints.save(self.engine, step, records={ADAPTER_CONFIG: self.llava.mole_spec.to_json()})
        self.save_adapter(state)

    def _adapter_state(self, when: str) -> dict[str, torch.Tensor]:
        """The trainable weights gathered whole on every rank, refused on every rank if not finite."""
        state = gather_trainable_state(self.model.llava)
        check_finite(state, f"the adapter at {when}")
        return state

    def save_adapter(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0 writes ``output_dir/adapter`` from ``state`` (gathered on every rank if not given); a
        failed write fails every rank alike."""
        if state is None:
            state = self._adapter_state(f"step {self.start_step}")
        directory, failure = os.path.join(self.cfg.output_dir, "adapter"), None
        if self.info.is_main:
            try:
                save_adapter(directory, state, self.llava.mole_spec)
            except (OSError, SafetensorError) as err:
                if not write_failed(err):
                    raise
                failure = err
        message = failure_on_any_rank(failure, "saving the adapter", directory)  # every rank: the barrier it replaces
        if message is not None:
            raise CheckpointError(message)

    def _finish(self, last: dict, stopped: bool) -> None:
        """``done.json`` for a completed run; close the logs, give the signals back, wait for every rank."""
        if not stopped and self.info.is_main:
            with open(os.path.join(self.cfg.output_dir, DONE_FILE), "w") as handle:
                json.dump(last, handle)
            log.info("done at step %d: adapter in %s", last["step"], os.path.join(self.cfg.output_dir, "adapter"))
        self.metrics.close()
        self.stop.restore_defaults()
        self.phase.enter("finish")
        dist.barrier()


def _start_output_dir(cfg: Config) -> None:
    """``config.yaml`` for this run; an earlier, shorter run's ``done.json`` removed (this one is not done yet)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cfg.output_dir, DONE_FILE))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
