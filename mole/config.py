"""The one config schema for a mole run: typed dataclasses, YAML + ``key=value`` overrides, validation.

Everything a run needs is decided here, before any model or DeepSpeed engine exists, so a typo in a
SLURM job fails in a second on the login node instead of after a 10-minute model load on 8 GPUs.
``load_config`` is the only way the launchers build a ``Config``; it always:

1. reads the YAML (a mapping with the schema's nesting) and applies overrides in order;
2. builds the dataclasses, rejecting unknown keys (with a difflib suggestion) and wrong types;
3. makes local paths absolute against the current directory, so every rank and every later
   ``save_config`` sees the same paths whatever directory it runs from;
4. runs ``validate`` (value ranges, choices, the model directory and the DeepSpeed JSON).

Every user-facing problem is a ``ConfigError`` whose message starts with the dotted key and ends
with where the value came from (the YAML file, an override, or the default).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

ROUTINGS = ("hard", "scaled", "dense")
AUX_LOSSES = ("switch", "per_sample")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUME_WORDS = ("auto", "never")
NONFINITE_POLICIES = ("stop", "skip")
IMAGE_ASPECTS = ("pad", "crop")
BUNDLED_DOMAINS = ("shapes", "charts", "tissue")


class ConfigError(ValueError):
    """A config problem the user must fix; ``key`` is the dotted key it concerns, when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    name_or_path: str = "models/tiny-llava"
    """Local Hugging Face LLaVA directory (must hold config.json); Hub ids are not downloaded here."""


@dataclass
class MoleConfig:
    num_experts: int = 3
    """LoRA experts per adapted layer; 1 turns the MoLE layer into plain LoRA (no router)."""
    routing: str = "scaled"
    """hard: top-1 expert, weight 1; scaled: top-1 scaled by its router probability (keeps the
    router differentiable); dense: every expert, weighted by the router softmax."""
    aux_loss: str = "switch"
    """Load-balancing loss: switch (Switch Transformer, batch-level fractions) or per_sample."""
    aux_weight: float = 0.01
    """Multiplier of the auxiliary loss added to the LM loss; 0 disables balancing."""


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of every LoRA expert."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Attention projections of the language model that get a single (non-MoE) LoRA."""
    mlp_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """MLP projections of the language model that get the mixture of LoRA experts."""


@dataclass
class DomainConfig:
    name: str
    """Domain name, unique within the run; used in logs and per-domain metrics."""
    shards: str | list[str]
    """Webdataset shard pattern(s), brace-expanded at read time (``d/train-{000000..000009}.tar``; local
    globs like ``d/*.tar`` also work); URLs (``pipe:``, ``s3://``) are passed through untouched, local
    paths are made absolute. A local pattern matching no file is an error at start."""
    weight: float = 1.0
    """Relative sampling weight of this domain in the mixed stream (> 0)."""
    val_shards: str | list[str] | None = None
    """Held-out shard pattern(s) for the periodic validation loss (``train.eval_every``); none: the
    domain is not evaluated."""


def _bundled_domains() -> list[DomainConfig]:
    return [DomainConfig(n, f"data_shards/{n}/train-{{000000..000001}}.tar") for n in BUNDLED_DOMAINS]


@dataclass
class DataConfig:
    domains: list[DomainConfig] = field(default_factory=_bundled_domains)
    """Domains mixed into one training stream; the default is the three bundled toy domains."""
    max_length: int = 512
    """Token budget per sample (image tokens included); longer samples are truncated."""
    num_workers: int = 0
    """DataLoader worker processes per rank; 0 reads in the training process."""
    image_aspect: str = "pad"
    """How non-square images reach the vision tower: pad to square, or centre-crop."""
    shuffle_buffer: int = 100
    """Samples held in each domain's streaming shuffle buffer; 0 disables shuffling."""
    image_backend: str = "fast"
    """fast: resize/crop/normalise on uint8 tensors, within 2 uint8 levels of the processor per pixel and
    about twice the samples per second of a worker (the image path alone about 3x); processor: the model's own image processor (see mole/data/images.py)."""
    max_image_pixels: int = 64_000_000
    """Images declaring more pixels than this are skipped undecoded (decompression bombs); with
    image_aspect pad, the square an image is padded to counts."""


@dataclass
class TrainConfig:
    max_steps: int = 50
    """Optimizer steps to run (each is micro_batch_size * grad_accum * world_size samples)."""
    micro_batch_size: int = 4
    """Samples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate of the LoRA experts and routers."""
    projector_lr: float = 2e-5
    """Learning rate of the multimodal projector (used only when train_projector)."""
    train_projector: bool = True
    """Also finetune the vision-to-language projector; the backbones stay frozen regardless."""
    warmup_steps: int = 0
    """Linear warmup steps before the learning-rate schedule."""
    grad_clip: float = 1.0
    """Global gradient-norm clip passed to DeepSpeed; 0 disables clipping."""
    optimizer: str = "adamw"
    """adamw or sgd; built by mole as a torch optimizer, never from the DeepSpeed JSON."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the trained parameters."""
    precision: str = "auto"
    """Compute precision: fp32, bf16 or fp16 (sets the DeepSpeed bf16/fp16 sections); auto is bf16
    on a GPU and fp32 on a CPU, so one config serves both."""
    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in backward (for real model sizes); routing statistics and
    the balance loss are unaffected."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss on any rank: stop the run naming the step, or skip that micro-batch on all ranks."""
    save_every: int = 0
    """Checkpoint (DeepSpeed, under output_dir/checkpoints/step_<N>) every N optimizer steps; 0 only
    at the end. The adapter is written to output_dir/adapter at each save too."""
    keep_checkpoints: int = 2
    """How many of the newest complete checkpoints to keep."""
    resume: str = "auto"
    """auto: continue from output_dir's newest complete checkpoint if any; never: start fresh (an
    existing checkpoint is then an error, to protect it); or a checkpoint directory path."""
    eval_every: int = 0
    """Held-out loss per domain (on each domain's val_shards) every N steps; 0 disables."""
    eval_batches: int = 8
    """At most this many micro-batches per domain and rank per evaluation."""
    log_routing_every: int = 50
    """Log the domain x expert routing heatmap to TensorBoard every N steps (0 disables)."""
    seed: int = 0
    """Seed for parameter init, data shuffling and dropout (offset by rank where needed)."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; its "auto" values are filled from this config by mole.ds_config."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone to adapt."""
    mole: MoleConfig = field(default_factory=MoleConfig)
    """Mixture-of-experts routing and its balancing loss."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Shape of each LoRA expert and where experts go."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data domains and preprocessing."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, precision, checkpointing and the DeepSpeed JSON."""
    output_dir: str = "runs/default"
    """Directory for checkpoints, logs and the resolved config.yaml."""


# ------------------------------------------------------------------------- dict <-> dataclasses

# A float written as ``1e-4`` is a *string* to PyYAML (YAML 1.1 wants ``1.0e-4``); accept it for
# float fields so ``train.lr=1e-4`` means what everybody expects.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "mapping"
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return hint.__name__


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field type ``hint``; return it (sections built, ints as floats)."""
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, key)
    if isinstance(hint, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif typing.get_origin(hint) is list:
        if isinstance(value, list):
            item = typing.get_args(hint)[0]
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):  # bool, str
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}", key)


def _unknown_key(prefix: str, name: str, valid: list[str], key: str | None = None) -> ConfigError:
    """Error for ``name`` not among ``valid`` under ``prefix``; ``key`` is the full key as written."""
    key = key or f"{prefix}{name}"
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        hint = f"; did you mean '{prefix}{close[0]}'?"
    else:
        hint = f"; valid keys{' in ' + prefix[:-1] if prefix else ''}: {', '.join(valid)}"
    return ConfigError(f"unknown key '{key}'{hint}", key)


def _from_dict(cls: type, raw: Any, key: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None and key:  # an empty YAML section (``train:``) means "all defaults"
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {raw!r}", key or None)
    hints = _hints(cls)
    prefix = f"{key}." if key else ""
    kwargs = {}
    for name, value in raw.items():
        if name not in hints:
            raise _unknown_key(prefix, str(name), list(hints))
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    for f in dataclasses.fields(cls):
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and f.name not in kwargs:
            raise ConfigError(f"{prefix}{f.name}: required key missing", prefix + f.name)
    return cls(**kwargs)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of ``cfg`` (what ``save_config`` writes and ``load_config`` reads back)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML; loading it back yields an equal Config."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:  # then renamed: a killed writer never leaves half a config behind
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- YAML + overrides


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def _leaf_keys(raw: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping, down to non-mapping values (lists are leaves)."""
    keys = []
    for name, value in raw.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict):
            keys += _leaf_keys(value, key + ".")
    return keys


def _merge(base: dict, update: dict) -> None:
    for name, value in update.items():
        if isinstance(base.get(name), dict) and isinstance(value, dict):
            _merge(base[name], value)
        else:
            base[name] = value


def _apply_override(raw: dict, origins: dict[str, str], item: str) -> None:
    """Apply one ``dotted.key=yaml_value`` to the raw mapping, checking the key against the schema."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    parts = key.split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:i])
        hints = _hints(cls)
        if part not in hints:
            error = _unknown_key(prefix, part, list(hints), key)
            raise ConfigError(f"{error} (from override '{item}')", key)
        cls = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            where = prefix + part
            raise ConfigError(f"override '{item}': '{where}' is not a section; set it whole", key)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {text!r} of override '{item}': {e}", key) from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError(f"{section}: expected a mapping, got {node!r}", section)
    if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
        _merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = value
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]
    origins[key] = f"from override '{item}'"


def _where(key: str | None, origins: dict[str, str]) -> str:
    """' (in FILE)', ' (from override ...)' or ' (default value)' for the error at ``key``."""
    if key is None:
        return ""
    hits = [k for k in origins if key == k or key.startswith((k + ".", k + "["))]
    return f" ({origins[max(hits, key=len)]})" if hits else " (default value)"


def _is_local(pattern: str) -> bool:
    return "://" not in pattern and not pattern.startswith("pipe:")


def _absolute(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def _resolve_paths(cfg: Config, cwd: str) -> None:
    """Make every local path absolute (brace patterns stay patterns); URLs are left alone."""
    cfg.model.name_or_path = _absolute(cfg.model.name_or_path, cwd)
    cfg.train.ds_config = _absolute(cfg.train.ds_config, cwd)
    if not cfg.output_dir.strip():  # "" would resolve to the working directory itself
        raise ConfigError("output_dir: must name a directory", "output_dir")
    cfg.output_dir = _absolute(cfg.output_dir, cwd)
    if cfg.train.resume.lower() not in RESUME_WORDS:  # "Auto" stays, for validation to name it
        cfg.train.resume = _absolute(cfg.train.resume, cwd)
    for d in cfg.data.domains:
        d.shards = _absolute_patterns(d.shards, cwd)
        d.val_shards = _absolute_patterns(d.val_shards, cwd)


def _absolute_patterns(patterns: str | list[str] | None, cwd: str) -> str | list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return _absolute(patterns, cwd) if _is_local(patterns) else patterns
    return [_absolute(p, cwd) if _is_local(p) else p for p in patterns]


def load_config(path: str | None, overrides: list[str]) -> Config:
    """YAML file (or none: all defaults) + ``key=value`` overrides -> validated Config.

    Override values are parsed as YAML (``train.max_steps=8``, ``lora.attn_targets=[q_proj,v_proj]``,
    ``data.domains=[{name: a, shards: x.tar}]``); later overrides win; a mapping value is merged into
    the section it names. Relative paths resolve against the current directory.
    """
    raw = {} if path is None else _read_yaml(path)
    origins = {k: f"in {path}" for k in _leaf_keys(raw)}
    for item in overrides:
        _apply_override(raw, origins, item)
    try:
        cfg = _from_dict(Config, raw, "")
        _resolve_paths(cfg, os.getcwd())
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e}{_where(e.key, origins)}", e.key) from None
    return cfg


USAGE = """\
usage: <entry point> [--config PATH] [key=value ...]
  --config PATH   YAML file with the schema's nesting (model, mole, lora, data, train, output_dir)
  key=value       override one field by dotted key; the value is YAML, e.g.
                  train.max_steps=8 lora.attn_targets=[q_proj,v_proj] train.precision=bf16
  --local_rank N  accepted and ignored (the DeepSpeed launcher appends it)"""


def usage(program: str = "deepspeed launch/train.py") -> str:
    return USAGE.replace("<entry point>", program)


def parse_cli(argv: list[str], program: str = "deepspeed launch/train.py") -> Config:
    """Config from command-line arguments (without the program name), via ``load_config``; errors end
    with the usage of ``program``."""
    usage_text = usage(program)
    path: str | None = None
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, has_value, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not has_value:
                if not args:
                    raise ConfigError(f"{name} needs a value\n{usage_text}")
                args.pop(0)
        elif name == "--config":
            if path is not None:
                raise ConfigError(f"--config given twice\n{usage_text}")
            if not has_value:
                if not args:
                    raise ConfigError(f"--config needs a path\n{usage_text}")
                value = args.pop(0)
            path = value
        elif not arg.startswith("-") and not has_value:
            raise ConfigError(f"override {arg!r} has no '=': overrides are key=value, e.g. train.max_steps=8\n{usage_text}")
        elif arg.startswith("-"):
            raise ConfigError(f"unexpected argument {arg!r}\n{usage_text}")
        else:
            overrides.append(arg)
    return load_config(path, overrides)


# ---------------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}", key)


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}{hint}")


def _check_types(cfg: Config) -> None:
    """Type-check a Config that may have been built in code rather than by load_config."""
    for section in ("model", "mole", "lora", "data", "train"):
        cls = _hints(Config)[section]
        _require(isinstance(getattr(cfg, section), cls), section, f"expected {cls.__name__}")
    for i, d in enumerate(cfg.data.domains if isinstance(cfg.data.domains, list) else []):
        _require(isinstance(d, DomainConfig), f"data.domains[{i}]", "expected DomainConfig")
    _from_dict(Config, config_to_dict(cfg), "")


def _check_ds_json(path: str) -> None:
    key = "train.ds_config"
    _require(os.path.isfile(path), key, f"DeepSpeed config {path!r} does not exist")
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {path!r} is not readable JSON: {e}", key) from None
    zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    _require(stage in (0, 1, 2, 3), key, f"{path!r} needs zero_optimization.stage in 0..3, got {stage!r}")


def _model_type(config_json: str) -> str:
    """The ``model_type`` a Hugging Face config.json declares; a ConfigError naming the file if it cannot say."""
    try:
        with open(config_json) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: {config_json!r} cannot be read as JSON ({err})",
                          "model.name_or_path") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"model.name_or_path: {config_json!r} declares no model_type; expected a LLaVA "
                          "(model_type 'llava')", "model.name_or_path")
    return config["model_type"]


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first problem in ``cfg``: types, values, the model dir, the DS JSON.

    Cheap (no model, no DeepSpeed import) so launchers run it before anything expensive.
    """
    _check_types(cfg)
    m, lo, d, t = cfg.mole, cfg.lora, cfg.data, cfg.train
    _require(m.num_experts >= 1, "mole.num_experts", f"must be >= 1, got {m.num_experts}")
    _choice(m.routing, ROUTINGS, "mole.routing")
    _choice(m.aux_loss, AUX_LOSSES, "mole.aux_loss")
    _require(math.isfinite(m.aux_weight) and m.aux_weight >= 0, "mole.aux_weight", f"must be finite and >= 0, got {m.aux_weight}")
    _require(lo.r >= 1, "lora.r", f"must be >= 1, got {lo.r}")
    _require(math.isfinite(lo.alpha) and lo.alpha > 0, "lora.alpha", f"must be finite and > 0, got {lo.alpha}")
    _require(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")

    _require(len(d.domains) > 0, "data.domains", "must name at least one domain")
    seen: set[str] = set()
    for i, dom in enumerate(d.domains):
        key = f"data.domains[{i}]"
        _require(bool(dom.name), f"{key}.name", "must not be empty")
        _require(dom.name not in seen, f"{key}.name", f"duplicate domain name {dom.name!r}")
        seen.add(dom.name)
        _require(bool(dom.shards), f"{key}.shards", "must name at least one shard pattern")
        _require(dom.val_shards is None or bool(dom.val_shards), f"{key}.val_shards",
                 "must name at least one shard pattern, or be left out (no held-out set)")
        _require(math.isfinite(dom.weight) and dom.weight > 0, f"{key}.weight", f"must be finite and > 0, got {dom.weight}")
    _require(d.max_length >= 16, "data.max_length", f"must be >= 16, got {d.max_length}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _choice(d.image_aspect, IMAGE_ASPECTS, "data.image_aspect")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    _choice(d.image_backend, ("fast", "processor"), "data.image_backend")
    _require(d.max_image_pixels >= 1, "data.max_image_pixels", f"must be >= 1, got {d.max_image_pixels}")

    for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
        value = getattr(t, name)
        _require(value >= 1, f"train.{name}", f"must be >= 1, got {value}")
    _require(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be finite and > 0, got {t.lr}")
    for name in ("projector_lr", "warmup_steps", "grad_clip", "weight_decay", "save_every", "eval_every",
                 "log_routing_every"):
        value = getattr(t, name)
        _require(math.isfinite(value) and value >= 0, f"train.{name}", f"must be finite and >= 0, got {value}")
    _choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.on_nonfinite, NONFINITE_POLICIES, "train.on_nonfinite")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _require(t.eval_batches >= 1, "train.eval_batches", f"must be >= 1, got {t.eval_batches}")
    _require(bool(t.resume), "train.resume", "must be auto, never or a checkpoint directory")
    _require(t.resume.lower() not in RESUME_WORDS or t.resume in RESUME_WORDS, "train.resume",
             f"{t.resume!r} is not a checkpoint directory; did you mean '{t.resume.lower()}'?")
    _require(bool(cfg.output_dir.strip()), "output_dir", "must name a directory")
    _require(not os.path.exists(cfg.output_dir) or os.path.isdir(cfg.output_dir), "output_dir",
             f"{cfg.output_dir!r} exists and is not a directory")
    _require(m.num_experts == 1 or bool(lo.mlp_targets), "lora.mlp_targets",
             f"is empty, so the {m.num_experts} experts mole.num_experts asks for would have nothing to adapt")

    path = cfg.model.name_or_path
    _require(
        os.path.isdir(path),
        "model.name_or_path",
        f"{path!r} is not a directory; expected a local Hugging Face LLaVA directory with config.json",
    )
    _require(
        os.path.isfile(os.path.join(path, "config.json")),
        "model.name_or_path",
        f"{path!r} has no config.json; expected a local Hugging Face LLaVA directory",
    )
    model_type = _model_type(os.path.join(path, "config.json"))
    _require(
        model_type == "llava",
        "model.name_or_path",
        f"{path!r} holds a {model_type!r} model; expected a LLaVA (model_type 'llava', e.g. llava-1.5-7b-hf): "
        "transformers would otherwise build a default 7B LLaVA around it",
    )
    _check_ds_json(t.ds_config)
