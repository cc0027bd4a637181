"""Checkpoints that survive ``kill -9`` at any moment, and finding the one to resume from.

Layout under ``output_dir/checkpoints/``::

    step_<N>/            DeepSpeed's files (trainable weights + optimizer + scheduler, no frozen
                         backbone: exclude_frozen_parameters) and mole_rank<R>.pt (step, RNG states)
    step_<N>/complete.json   written by rank 0 only after every rank finished: the commit marker
    latest               the newest complete tag, replaced atomically (temp file + rename)

DeepSpeed's own ``latest`` is written by rank 0 before the other ranks finish their shards, so it is
disabled (``save_latest=False``) and written here after a barrier. A directory without
``complete.json``, or whose listed files are missing or truncated, is never resumed from; the
previous complete checkpoint is used instead; so is one whose marker cannot be read or is not the
object this module writes. Such torn directories, of this step or earlier ones, are removed before a
save starts writing, so their space is free for it. Old checkpoints are deleted only after ``latest``
names the new one, marker first, so a half-deleted directory is never mistaken for a complete one.

A write that fails (a full disk, a quota) fails the save on every rank with one
:class:`CheckpointError` naming the cause, the path and the free space: the ranks agree on the
outcome before the commit marker, so none waits in a collective the others never reach, and the
failed save's directory is removed.

``mole_rank<R>.pt`` is loaded with ``torch.load(weights_only=True)``. DeepSpeed's own files are
loaded by DeepSpeed with ``weights_only=False``: they are trusted local files written by this
trainer, never data from elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
import yaml
from transformers import AutoConfig

from mole.adapter import ADAPTER_CONFIG
from mole.model import run_spec
from mole.spec import BASE_FIELDS, AdapterSpec, ImageSpec, SpecError, config_key
from mole.train.storage import failure_on_any_rank, write_failed

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
LATEST = "latest"
TAG = re.compile(r"step_(\d+)")


@dataclass
class Resumable:
    path: str  # the checkpoints root
    tag: str
    step: int
    world_size: int


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed as asked (wrong world size, nothing complete at a path), or
    one that could not be written (the storage failed: the message says how, where and the free space)."""


def rank_state_file(rank: int) -> str:
    return f"mole_rank{rank}.pt"


class Checkpoints:
    def __init__(self, root: str, keep: int, rank: int, world_size: int):
        self.root, self.keep, self.rank, self.world_size = root, keep, rank, world_size

    def save(self, engine, step: int, records: dict[str, str] | None = None) -> str:
        """Save on every rank (DeepSpeed's save is collective), then commit on rank 0. ``records`` (file
        name -> text) are written by rank 0 into the checkpoint before its commit marker, so they are
        part of what the marker vouches for (the adapter spec the tensors were trained under). A failed
        write on any rank raises the same :class:`CheckpointError` on every rank, with no commit marker
        and the directory removed."""
        tag = f"step_{step}"
        directory = os.path.join(self.root, tag)
        if self.rank == 0:
            if os.path.isdir(directory):
                _remove(directory)  # a leftover of a killed save of the same step
            self._reclaim(step)
        dist.barrier()
        failure = None
        try:
            engine.save_checkpoint(self.root, tag=tag, client_state={"step": step}, save_latest=False,
                                   exclude_frozen_parameters=True)
        except (OSError, RuntimeError) as err:
            if not write_failed(err):
                raise
            failure = err
            # DeepSpeed's save_checkpoint ends in a barrier the ranks whose writes succeeded wait in; this
            # rank left before it, so it stands in for it here (DeepSpeed 0.19: no other collective
            # follows the writes)
            dist.barrier()
        if failure is None:
            try:
                torch.save(capture_rng(step), os.path.join(directory, rank_state_file(self.rank)))
                for name, text in (records or {}).items() if self.rank == 0 else ():
                    _write_atomic(os.path.join(directory, name), text)
            except (OSError, RuntimeError) as err:
                if not write_failed(err):
                    raise
                failure = err
        self._agree(failure, directory)
        if self.rank == 0:
            try:
                files = {
                    name: os.path.getsize(os.path.join(directory, name))
                    for name in sorted(os.listdir(directory))
                    if os.path.isfile(os.path.join(directory, name))
                }
                _write_atomic(os.path.join(directory, COMPLETE),
                              json.dumps({"step": step, "world_size": self.world_size, "files": files}, indent=1))
                _write_atomic(os.path.join(self.root, LATEST), tag)
            except OSError as err:
                failure = err
        self._agree(failure, directory)
        if self.rank == 0:
            self._prune(step)
        dist.barrier()
        return directory

    def _agree(self, failure: BaseException | None, directory: str) -> None:
        """Every rank calls this after its writes: if any rank's failed, rank 0 removes ``directory``
        (marker first) and every rank raises that failure as one :class:`CheckpointError`."""
        message = failure_on_any_rank(failure, "saving checkpoint", directory)
        if message is not None:
            if self.rank == 0:
                _remove(directory)
            dist.barrier()
            raise CheckpointError(message)

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` checkpoints (those :func:`verified`); drop older ones and the torn saves
        of steps up to ``step``."""
        self._reclaim(step)
        tags = sorted((t for t in _complete_tags(self.root) if verified(self.root, t[0])), key=lambda t: t[1], reverse=True)
        for tag, _ in tags[self.keep :]:
            _remove(os.path.join(self.root, tag))

    def _reclaim(self, step: int) -> None:
        """Remove the step directories of steps up to ``step`` that nothing can resume from: saves killed
        or failed before their commit marker, or with a marker that cannot be read or whose files do not
        match it (:func:`verified`). Later steps' are left alone: not this run's to judge."""
        for name in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            match = TAG.fullmatch(name)
            path = os.path.join(self.root, name)
            if match and int(match.group(1)) <= step and os.path.isdir(path) and verified(self.root, name) is None:
                log.warning("removing %s: a torn checkpoint (no readable commit marker, or files missing or cut "
                            "short), never resumed from", path)
                _remove(path)


def find_resumable(root: str) -> Resumable | None:
    """The newest checkpoint under ``root`` whose files are all present with their recorded sizes."""
    for tag, _ in sorted(_complete_tags(root), key=lambda t: t[1], reverse=True):
        found = verified(root, tag)
        if found is not None:
            return found
    return None


def verified(root: str, tag: str) -> Resumable | None:
    """``root/tag`` if its commit marker is readable and every file it lists has its recorded size."""
    directory = os.path.join(root, tag)
    manifest = _read_marker(directory)
    if manifest is None:
        return None
    broken = [
        name for name, size in manifest["files"].items()
        if not os.path.isfile(os.path.join(directory, name)) or os.path.getsize(os.path.join(directory, name)) != size
    ]
    if broken:
        log.warning("checkpoint %s is incomplete (%s); not resuming from it", directory, ", ".join(broken[:3]))
        return None
    return Resumable(root, tag, manifest["step"], manifest["world_size"])


def _read_marker(directory: str) -> dict | None:
    """The commit marker of ``directory`` if it is the object :meth:`Checkpoints.save` writes (its step that of
    the ``step_<N>`` name, file names without a directory, sizes and world size counts); else ``None``, with
    a warning when a marker is there but unreadable: the checkpoint is then as torn as one without it."""
    path = os.path.join(directory, COMPLETE)
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as err:
        log.warning("checkpoint %s: its commit marker cannot be read (%s); not resuming from it", directory, err)
        return None

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    tag = TAG.fullmatch(os.path.basename(os.path.normpath(directory)))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, dict) and files and count(manifest.get("step")) and count(manifest.get("world_size"))
            and manifest["world_size"] >= 1 and (tag is None or int(tag.group(1)) == manifest["step"])
            and all(name and os.path.basename(name) == name and name not in (".", "..") and count(size)
                    for name, size in files.items())):
        log.warning("checkpoint %s: its commit marker %s is not a mole checkpoint's (step, world_size, files); "
                    "not resuming from it", directory, path)
        return None
    return manifest


STARTED_FROM = "started_from.json"
"""In ``output_dir/checkpoints/``: the explicit ``train.resume`` checkpoint this run started from."""


def resolve_resume(setting: str, output_dir: str, world_size: int) -> Resumable | None:
    """What ``train.resume`` (auto | never | a checkpoint path) means for this run.

    An explicit path starts the run from that checkpoint, and :func:`record_start` notes it. Started
    again with the same path (a SLURM requeue), the run continues from its own newer checkpoints
    instead, even after the starting one was pruned (but not before it has saved one newer than the
    path). A path older than checkpoints the run already
    holds, not the one it started from, is refused: going back there in the same ``output_dir`` would
    leave the newer checkpoints to be taken for the run's latest at the next restart.
    """
    root = os.path.join(output_dir, "checkpoints")
    if setting == "never":
        if find_resumable(root) is not None:
            raise CheckpointError(
                f"train.resume=never but {root} holds checkpoints; use another output_dir or remove them"
            )
        return None
    own = find_resumable(root)
    if setting == "auto":
        found = own
    else:
        path = os.path.normpath(setting)
        if TAG.fullmatch(os.path.basename(path)):  # a step_<N> directory: exactly that one
            found = verified(os.path.dirname(path), os.path.basename(path))
        else:
            found = find_resumable(path)
        if own is not None and _started_from(root) == path and (found is None or own.step > found.step):
            log.info("train.resume=%s: this run started there; continuing from its checkpoint %s/%s",
                     setting, own.path, own.tag)
            found = own
        elif found is None:
            raise CheckpointError(f"train.resume={setting}: no complete checkpoint there")
        elif own is not None and own.step > found.step:
            raise CheckpointError(
                f"train.resume={setting} (step {found.step}), but {root} already holds this output_dir's checkpoints "
                f"up to step {own.step}: to continue them use train.resume=auto; to go back to step {found.step}, "
                f"start a new output_dir with train.resume={setting}"
            )
    if found is not None and found.world_size != world_size:
        raise CheckpointError(
            f"checkpoint {found.path}/{found.tag} was written by {found.world_size} ranks but this run has "
            f"{world_size}: ZeRO checkpoints are partitioned per rank. Resume with {found.world_size} ranks, or "
            f"convert it with DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal) first"
        )
    return found


def record_start(setting: str, output_dir: str) -> None:
    """Note (rank 0, once the checkpoint has loaded) the explicit ``train.resume`` path this run started from."""
    if setting in ("auto", "never"):
        return
    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    _write_atomic(os.path.join(root, STARTED_FROM), json.dumps({"train.resume": os.path.normpath(setting)}))


def _started_from(root: str) -> str | None:
    try:
        with open(os.path.join(root, STARTED_FROM)) as handle:
            recorded = json.load(handle)["train.resume"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return recorded if isinstance(recorded, str) else None


def check_resumable_config(resume: Resumable, cfg) -> None:
    """Refuse to resume ``resume`` under a config whose adapter it cannot load, or whose saved weights
    would compute something else, naming each key, before the model loads.

    The checkpoint's adapter is the spec saved in it (``mole_config.json``, written before its commit
    marker). Checkpoints from before that record fall back on what the run recorded beside them: its
    run settings from its ``config.yaml`` (``<output_dir>/checkpoints/..``; no check without one) and
    its base model's family and shapes from the adapter it saved (:meth:`AdapterSpec.as_recorded`).
    Against it (:meth:`AdapterSpec.diff`): a change of the tensors' shapes is always refused; a change
    of what they compute unless ``train.resume_accept`` names its key; a change that only steers
    training (dropout, the balance loss) is taken. A change of ``train.optimizer``, whose state the
    checkpoint holds, is refused too.
    """
    run_dir = os.path.dirname(os.path.abspath(resume.path))
    saved_path = os.path.join(run_dir, "config.yaml")
    saved = _saved_run_config(saved_path)
    now, _ = run_spec(cfg, AutoConfig.from_pretrained(cfg.model.name_or_path))
    then, source = _checkpoint_spec(resume), os.path.join(resume.path, resume.tag, ADAPTER_CONFIG)
    if then is None:
        if saved is None:
            return
        try:
            then = now.as_recorded(saved, _adapter_record(run_dir))
        except SpecError as err:
            raise CheckpointError(f"cannot resume {resume.path}/{resume.tag}: its run recorded an adapter no spec "
                                  f"may hold ({saved_path}, {os.path.join(run_dir, 'adapter', ADAPTER_CONFIG)}): {err}") from None
        source = saved_path
    accepted = set(cfg.train.resume_accept)
    changed = [_describe(key, before, after, impact, cfg.model.name_or_path)
               for key, before, after, impact in _changes(now, then)
               if impact == "shape" or (impact == "computation" and key not in accepted)]
    saved_train = (saved or {}).get("train") if isinstance((saved or {}).get("train"), dict) else {}
    optimizer = saved_train.get("optimizer")
    if optimizer is not None and optimizer != cfg.train.optimizer:  # its state is shaped by it; not part of the adapter
        changed.append(f"train.optimizer: {optimizer!r} in the checkpoint's run, {cfg.train.optimizer!r} now")
    if saved is not None and (saved_train.get("router_lr") is None) != (cfg.train.router_lr is None):
        # its own parameter group, or none: the optimizer state is laid out by the groups
        changed.append(f"train.router_lr: {saved_train.get('router_lr')!r} in the checkpoint's run, "
                       f"{cfg.train.router_lr!r} now (set or unset, it decides the optimizer's parameter groups)")
    if changed:
        raise CheckpointError(
            f"cannot resume {resume.path}/{resume.tag} (its adapter as recorded in {source}) with this config: " + "; ".join(changed)
            + ". Keep these settings, or start from scratch in another output_dir"
        )


def _saved_run_config(path: str) -> dict | None:
    """The checkpoint's run's ``config.yaml`` as a mapping; none when missing or unreadable (a warning)."""
    try:
        with open(path) as handle:
            saved = yaml.safe_load(handle)
    except OSError:
        return None
    except yaml.YAMLError as err:
        log.warning("%s is not readable YAML (%s); resuming without checking the config against it", path, err)
        return None
    return saved if isinstance(saved, dict) else {}


def _checkpoint_spec(resume: Resumable) -> AdapterSpec | None:
    """The adapter spec saved in the checkpoint itself; none for checkpoints saved before it was."""
    path = os.path.join(resume.path, resume.tag, ADAPTER_CONFIG)
    try:
        with open(path) as handle:
            return AdapterSpec.from_json(handle.read())
    except FileNotFoundError:
        return None
    except (OSError, SpecError) as err:
        raise CheckpointError(f"cannot resume {resume.path}/{resume.tag}: {path}: {err}") from None


def _changes(now: AdapterSpec, then: AdapterSpec) -> list[tuple[str | None, object, object, str]]:
    """``(config key, before, after, impact)`` per changed setting; the image preparation per key, where
    the checkpoint records it (a null image limit or backend, from before adapters recorded them, is
    taken as unchanged)."""
    out = []
    for change in now.diff(then):
        if change.field == "image":
            out += [(f.metadata["config_key"], getattr(then.image, f.name), getattr(now.image, f.name), change.impact)
                    for f in dataclasses.fields(ImageSpec)
                    if getattr(then.image, f.name) not in (None, getattr(now.image, f.name))]
        else:
            out.append((config_key(change.field) or change.field, change.before, change.after, change.impact))
    return out


def _adapter_record(run_dir: str) -> dict | None:
    """The ``mole_config.json`` object of the run's adapter (written with every checkpoint), read loosely:
    any version, possibly partial; none when the run saved no adapter yet or it cannot be read."""
    path = os.path.join(run_dir, "adapter", ADAPTER_CONFIG)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:  # the run saved no adapter yet: nothing recorded to compare
        return None
    except (OSError, ValueError) as err:
        log.warning("cannot compare the base model's shapes with the checkpoint's run (%s); resuming unchecked", err)
        return None


def _describe(key: str, before, after, impact: str, model_dir: str) -> str:
    """One refusal reason, under the run config key the user would change."""
    before, after = (_as_written(v) for v in (before, after))
    if key in BASE_FIELDS:  # the base model's family or shapes
        return f"model.name_or_path: {key} {before} in the checkpoint's base model, {after} in {model_dir}"
    reason = f"{key}: {before!r} in the checkpoint's run, {after!r} now"
    if impact == "computation":
        reason += f" (the saved weights would compute something else; train.resume_accept=[{key}] takes it)"
    return reason


def _as_written(value):
    """A spec value as the config writes it: tuples (targets, grid pinpoints) as lists, nested too."""
    return [_as_written(item) for item in value] if isinstance(value, tuple) else value


def capture_rng(step: int) -> dict:
    """This rank's random state: torch (CPU and current GPU) and Python's ``random``."""
    state = {"step": step, "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(directory: str, rank: int) -> int:
    """Restore this rank's random state from a checkpoint; returns the saved step."""
    state = torch.load(os.path.join(directory, rank_state_file(rank)), weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    return int(state["step"])


def _complete_tags(root: str) -> list[tuple[str, int]]:
    if not os.path.isdir(root):
        return []
    return [
        (name, int(match.group(1)))
        for name in os.listdir(root)
        if (match := TAG.fullmatch(name)) and os.path.isfile(os.path.join(root, name, COMPLETE))
    ]


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _remove(directory: str) -> None:
    marker = os.path.join(directory, COMPLETE)
    if os.path.exists(marker):
        os.remove(marker)  # first, so a half-deleted checkpoint is never taken for a complete one
    shutil.rmtree(directory, ignore_errors=True)
