"""The one config schema for a mole run: pydantic models, YAML + ``key=value`` overrides, validation.

Everything a run needs is decided here, before any model or DeepSpeed engine exists, so a typo in a
SLURM job fails in a second on the login node instead of after a 10-minute model load on 8 GPUs.
``load_config`` is the only way the launchers build a ``Config``; it always:

1. reads the YAML (a mapping with the schema's nesting) and applies overrides in order;
2. builds the models, rejecting unknown keys (with a difflib suggestion), wrong types and values out
   of the ranges and choices the schema declares;
3. makes local paths absolute against the current directory, so every rank and every later
   ``save_config`` sees the same paths whatever directory it runs from;
4. runs ``validate`` (the checks that span fields, the model directory and the DeepSpeed JSON).

Every user-facing problem is a ``ConfigError`` whose message starts with the dotted key and ends
with where the value came from (the YAML file, an override, or the default).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from mole.choices import (ANYRES, ANYRES_MAX, DYNAMIC_RESOLUTION, AttnImplementation, AuxLoss, Family, ImageAspect,
                          ImageBackend, Metric, NonFinitePolicy, Optimizer, Packing, Precision, ProcessorBackend,
                          ResumeAcceptable, RouterInput, Routing, options)
from mole.spec import ANYRES_MAX_PATTERN

RESUME_WORDS = ("auto", "never")
BUNDLED_DOMAINS = ("shapes", "charts", "tissue")


class ConfigError(ValueError):
    """A config problem the user must fix; ``key`` is the dotted key it concerns, when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------- schema

# A float written as ``1e-4`` is a *string* to PyYAML (YAML 1.1 wants ``1.0e-4``); accept it for
# float fields so ``train.lr=1e-4`` means what everybody expects.
_FLOAT_TEXT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
Float = Annotated[float, BeforeValidator(lambda v: float(v) if isinstance(v, str) and _FLOAT_TEXT.fullmatch(v) else v)]
Patterns = Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
"""One shard pattern or a list of them, never empty."""
Pinpoint = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]
"""One AnyRes resolution, [height, width] in pixels."""


class Section(BaseModel):
    """A config section: unknown keys are refused, types are strict (no bool or text for an int; an int
    is a float), no inf/nan. Validating a built section checks it again, since code may have set its
    fields (assignment is not checked). Fields may also be given in order: ``DomainConfig(name, shards)``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True,
                              revalidate_instances="always")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(**dict(zip(type(self).model_fields, args)), **kwargs)


class ModelConfig(Section):
    name_or_path: str = "models/tiny-llava"
    """Local Hugging Face LLaVA directory (must hold config.json); Hub ids are not downloaded here."""
    attn_implementation: AttnImplementation = "auto"
    """Attention of the backbone: sdpa, eager or flash_attention_2 (needs flash-attn and a CUDA GPU;
    packed rows then take its varlen path); auto: flash_attention_2 where it can run, else sdpa."""


class MoleConfig(Section):
    num_experts: int = Field(3, ge=1)
    """LoRA experts per adapted layer; 1 turns the MoLE layer into plain LoRA (no router)."""
    routing: Routing = "scaled"
    """hard: top-1 expert, weight 1; scaled: top-1 scaled by its router probability (keeps the
    router differentiable); dense: every expert, weighted by the router softmax; domain: no router,
    each sample's tokens go to its domain's expert (num_experts must equal the number of data.domains;
    no aux loss; evaluation and inference name the domain)."""
    router_input: RouterInput = "token"
    """What a learned router reads (mole.choices.RouterInput): token, each token's MLP input, or
    prefix_mean, the mean of its sample's MLP inputs up to it (causal)."""
    aux_loss: AuxLoss = "switch"
    """Load-balancing loss: switch (Switch Transformer, batch-level fractions) or per_sample."""
    aux_weight: Float = Field(0.01, ge=0)
    """Multiplier of the auxiliary loss added to the LM loss; 0 disables balancing."""


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    """Rank of every LoRA expert."""
    alpha: Float = Field(32.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: Float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input, in [0, 1)."""
    attn_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Attention projections of the language model that get a single (non-MoE) LoRA."""
    mlp_targets: list[str] = Field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """MLP projections of the language model that get the mixture of LoRA experts."""


class DomainConfig(Section):
    name: str = Field(min_length=1)
    """Domain name, unique within the run; used in logs and per-domain metrics."""
    shards: Patterns
    """Webdataset shard pattern(s), brace-expanded at read time (``d/train-{000000..000009}.tar``; local
    globs like ``d/*.tar`` also work); URLs (``pipe:``, ``s3://``) are passed through untouched, local
    paths are made absolute. A local pattern matching no file is an error at start."""
    weight: Float = Field(1.0, gt=0)
    """Relative sampling weight of this domain in the mixed stream (> 0)."""
    val_shards: Patterns | None = None
    """Held-out shard pattern(s) for the periodic validation loss (``train.eval_every``); none: the
    domain is not evaluated."""
    metric: Metric | list[Metric] = "normalized_match"
    """How held-out answers are scored during training (``train.eval_max_new_tokens``): one or more of
    exact_match, normalized_match, relaxed_accuracy (ChartQA), anls (DocVQA), vqa_accuracy (VQAv2),
    closed_accuracy and open_recall (PathVQA); see mole/scoring.py."""

    @property
    def metrics(self) -> tuple[str, ...]:
        """``metric`` as a tuple of names."""
        return (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)


class DataConfig(Section):
    domains: list[DomainConfig] = Field(
        default_factory=lambda: [DomainConfig(n, f"data_shards/{n}/train-{{000000..000001}}.tar") for n in BUNDLED_DOMAINS],
        min_length=1)
    """Domains mixed into one training stream; the default is the three bundled toy domains."""
    max_length: int = Field(512, ge=16)
    """Token budget per sample (image tokens included); longer samples are truncated. With packing=packed
    also the token budget of a row, which holds as many samples as fit."""
    packing: Packing = "packed"
    """packed: train.micro_batch_size rows of up to max_length tokens, several samples per row (no
    attention across samples); grouped: train.micro_batch_size samples of similar length (from a buffer
    of packing_buffer samples) padded to the longest; none: the same in the order drawn. packed has the
    most real tokens per second and the least padding (docs/performance.md, step --packing)."""
    packing_buffer: int = Field(64, ge=1)
    """Samples held to group (grouped) or to choose from when filling rows (packed)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank; 0 reads in the training process."""
    image_aspect: ImageAspect = "pad"
    """How non-square images reach the vision tower: pad to square, or centre-crop."""
    shuffle_buffer: int = Field(100, ge=0)
    """Samples held in each domain's streaming shuffle buffer; 0 disables shuffling."""
    image_backend: ImageBackend = "fast"
    """fast: resize/crop/normalise on uint8 tensors, within 2 uint8 levels of the processor per pixel and
    about twice the samples per second of a worker (the image path alone about 3x); processor: the model's own image processor (see mole/data/images.py)."""
    min_pixels: int | None = Field(None, ge=1)
    """Dynamic-resolution families (Qwen-VL) only: the fewest pixels the image processor resizes an image
    to (more pixels, more image tokens); none: the model directory's (the family's default)."""
    max_pixels: int | None = Field(None, ge=1)
    """Dynamic-resolution families (Qwen-VL) only: the most pixels an image is resized to, which caps its
    image tokens; none: the model directory's (the family's default)."""
    image_grid_pinpoints: list[Pinpoint] | None = Field(None, min_length=1)
    """AnyRes families (LLaVA-NeXT, LLaVA-OneVision) only: the [height, width] resolutions an image may be
    tiled at (the image processor picks the best fit; multiples of the vision tower's image size, e.g.
    [[336, 672], [672, 336], [672, 672]] for at most 2x2 tiles at 336 px); fewer and smaller ones mean
    fewer tiles and image tokens. The model reads the same list to split the tiles back. none: the model
    directory's (the family's default)."""
    vision_aspect_ratio: str | None = None
    """LLaVA-OneVision only: anyres_max_N, beyond N tiles' worth of features an image's features are
    downscaled (which caps its image tokens near N+1 tiles' worth); none: the model directory's
    (anyres_max_9 for the released checkpoints)."""
    image_processor_backend: ProcessorBackend | None = None
    """Which backend of transformers' image processor prepares the pixels: pil (its PIL/NumPy class) or
    torchvision (needs torchvision installed); none: the family's choice (pil for Qwen-VL; for the LLaVA
    families transformers', torchvision where importable). The adapter records which ran."""
    max_image_pixels: int = Field(64_000_000, ge=1)
    """Images declaring more pixels than this are skipped undecoded (decompression bombs); with
    image_aspect pad, the square an image is padded to counts."""


class TrainConfig(Section):
    max_steps: int = Field(50, ge=1)
    """Optimizer steps to run (each is micro_batch_size * grad_accum * world_size samples)."""
    micro_batch_size: int = Field(4, ge=1)
    """Samples per rank per forward/backward."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    lr: Float = Field(2e-4, gt=0)
    """Peak learning rate of the LoRA experts (and of the routers, unless router_lr)."""
    router_lr: Float | None = Field(None, gt=0)
    """Peak learning rate of the MoLE routers; unset: lr. Set, the routers are an optimizer parameter
    group of their own, so a resumed run cannot switch between set and unset (its value may change)."""
    projector_lr: Float = Field(2e-5, ge=0)
    """Learning rate of the multimodal projector (used only when train_projector)."""
    train_projector: bool = True
    """Also finetune the vision-to-language projector; the backbones stay frozen regardless."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps before the learning-rate schedule."""
    grad_clip: Float = Field(1.0, ge=0)
    """Global gradient-norm clip passed to DeepSpeed; 0 disables clipping."""
    optimizer: Optimizer = "adamw"
    """adamw or sgd; built by mole as a torch optimizer, never from the DeepSpeed JSON."""
    weight_decay: Float = Field(0.0, ge=0)
    """Decoupled weight decay on the trained parameters."""
    precision: Precision = "auto"
    """Compute precision: fp32, bf16 or fp16 (sets the DeepSpeed bf16/fp16 sections); auto is bf16
    on a GPU and fp32 on a CPU, so one config serves both."""
    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in backward (for real model sizes); routing statistics and
    the balance loss are unaffected."""
    on_nonfinite: NonFinitePolicy = "stop"
    """A NaN/inf loss or gradient on any rank: stop the run naming the step before the update, or skip
    that micro-batch or update on all ranks. Non-finite weights after an update always stop it."""
    save_every: int = Field(0, ge=0)
    """Checkpoint (DeepSpeed, under output_dir/checkpoints/step_<N>) every N optimizer steps; 0 only
    at the end. The adapter is written to output_dir/adapter at each save too."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest complete checkpoints to keep."""
    resume: str = Field("auto", min_length=1)
    """auto: continue from output_dir's newest complete checkpoint if any; never: start fresh (an
    existing checkpoint is then an error, to protect it); or a checkpoint directory path."""
    resume_accept: list[ResumeAcceptable] = Field(default_factory=list)
    """Settings a resumed run may change although they change what the checkpoint's weights compute
    (lora.alpha, mole.routing, mole.router_input, model.name_or_path, data.image_aspect, data.image_backend,
    data.image_processor_backend, data.min_pixels, data.max_pixels, data.image_grid_pinpoints,
    data.vision_aspect_ratio, and under routing domain data.domains' names); any other change of them is
    refused, naming it. Settings that shape the tensors can never change."""
    eval_every: int = Field(0, ge=0)
    """Held-out loss per domain (on each domain's val_shards) every N steps; 0 disables."""
    eval_batches: int = Field(8, ge=1)
    """At most this many micro-batches per domain and rank per evaluation."""
    eval_max_new_tokens: int = Field(0, ge=0)
    """With eval_every, also answer every held-out question greedily (at most this many new tokens) and
    log each domain's metrics on the answers (``data.domains[].metric``) as eval/<metric>/<domain>;
    0: held-out loss only."""
    log_routing_every: int = Field(50, ge=0)
    """Log the domain x expert routing heatmap to TensorBoard every N steps (0 disables)."""
    seed: int = 0
    """Seed for parameter init, data shuffling and dropout (offset by rank where needed)."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; its "auto" values are filled from this config by mole.ds_config."""
    log_every: int = Field(1, ge=1)
    """Log metrics every N optimizer steps."""
    data_timeout_s: Float = Field(300, ge=0)
    """Longest a rank may wait for its next sample (one shard read, one sample's processing) before the
    watchdog ends the job, naming every rank's phase; 0 disables."""
    step_timeout_s: Float = Field(1800, ge=0)
    """Longest a rank may spend in any other phase of a step (forward/backward, the metrics all-reduce,
    a save, an evaluation) before the watchdog ends the job; 0 disables."""
    collective_timeout_s: Float | None = Field(None, gt=0)
    """Timeout of the process group's collectives (gloo/NCCL); none: a minute past step_timeout_s, so the
    watchdog's report comes first (30 minutes if step_timeout_s is 0). Overrides DEEPSPEED_TIMEOUT."""

    def collective_seconds(self) -> float:
        """The process group's timeout in seconds (``collective_timeout_s`` resolved)."""
        if self.collective_timeout_s is not None:
            return float(self.collective_timeout_s)
        return float(self.step_timeout_s + 60) if self.step_timeout_s > 0 else 1800.0


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The backbone to adapt."""
    mole: MoleConfig = Field(default_factory=MoleConfig)
    """Mixture-of-experts routing and its balancing loss."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Shape of each LoRA expert and where experts go."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training data domains and preprocessing."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation, precision, checkpointing and the DeepSpeed JSON."""
    output_dir: str = Field("runs/default", pattern=r"\S")
    """Directory for checkpoints, logs and the resolved config.yaml."""


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of ``cfg`` (what ``save_config`` writes and ``load_config`` reads back)."""
    return cfg.model_dump()


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML; loading it back yields an equal Config."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:  # then renamed: a killed writer never leaves half a config behind
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


# ------------------------------------------------------------------------- pydantic -> ConfigError


def _section(hint: Any) -> type[Section] | None:
    return hint if isinstance(hint, type) and issubclass(hint, Section) else None


def _type_name(hint: Any) -> str:
    """'int', 'list[str]', 'str or list[str]', 'mapping': the type a value should have had, as a user reads it."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if _section(hint):
        return "mapping"
    if origin is Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return " or ".join(map(_type_name, args)) if args else hint.__name__


def _unknown_key(prefix: str, name: str, valid: list[str], key: str | None = None) -> ConfigError:
    """Error for ``name`` not among ``valid`` under ``prefix``; ``key`` is the full key as written."""
    key = key or f"{prefix}{name}"
    close = difflib.get_close_matches(name, valid, n=1)
    where = f" in {prefix[:-1]}" if prefix else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys{where}: {', '.join(valid)}"
    return ConfigError(f"unknown key '{key}'{hint}", key)


_PROBLEMS = {
    "missing": "required key missing",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": "must name a directory",
    "finite_number": "must be finite, got {value!r}",
    "greater_than": "must be > {gt:g}, got {value!r}",
    "greater_than_equal": "must be >= {ge:g}, got {value!r}",
    "less_than": "must be < {lt:g}, got {value!r}",
}
"""Messages for pydantic's error types (``ctx`` fills the limits); type errors are 'expected T, got V'."""


def _type_error(kind: str) -> bool:
    return kind.endswith(("_type", "_parsing"))


def _config_error(error: ValidationError) -> ConfigError:
    """The first problem pydantic found as 'dotted.key: ...': unknown keys first (they explain the rest), then
    values out of range (of a union, the branch whose type fitted), then wrong types."""
    e = min(error.errors(), key=lambda e: (e["type"] != "extra_forbidden", _type_error(e["type"])))
    kind, value = e["type"], e["input"]
    key, hint = "", Config
    for part in e["loc"][:-1] if kind == "extra_forbidden" else e["loc"]:
        if isinstance(part, int):
            key, hint = f"{key}[{part}]", typing.get_args(hint)[0]
        elif _section(hint) and part in hint.model_fields:
            key, hint = f"{key}.{part}".lstrip("."), hint.model_fields[part].annotation
        else:  # a union branch's tag ('str', 'list[str]'): the error is the field's
            break
    if kind == "extra_forbidden":
        return _unknown_key(f"{key}." if key else "", str(e["loc"][-1]), list(hint.model_fields))
    if kind == "literal_error":
        choices = _choices(hint)
        if isinstance(value, list):  # a list of choices: name the first that is not one
            value = next((item for item in value if item not in choices), value)
        close = difflib.get_close_matches(str(value), choices, n=1)
        problem = f"must be one of {', '.join(choices)}; got {value!r}"
        problem += f" (did you mean '{close[0]}'?)" if close else ""
    elif kind == "too_short" and e.get("ctx", {}).get("min_length", 1) > 1:
        problem = f"must hold {e['ctx']['min_length']} items, got {value!r}"
    elif kind == "too_long":
        problem = f"must hold at most {e['ctx']['max_length']} items, got {value!r}"
    elif kind in _PROBLEMS:
        problem = _PROBLEMS[kind].format(value=value, **e.get("ctx", {}))
    elif _type_error(kind):
        problem = f"expected {'a mapping' if _section(hint) else _type_name(hint)}, got {value!r}"
    else:
        problem = e["msg"]
    return ConfigError(f"{key or 'config'}: {problem}", key or None)


def _choices(hint: Any) -> tuple[str, ...]:
    """The names a ``Literal`` allows, or the first ``Literal``'s inside a union or list of them."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return next((choices for arg in typing.get_args(hint) if (choices := _choices(arg))), ())


def _validated(data: Any) -> Config:
    """``Config`` from a mapping, or a ``Config`` checked again (its fields may have been set in code)."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise _config_error(error) from None


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


def _merge(base: dict, update: dict) -> None:
    for name, value in update.items():
        if isinstance(base.get(name), dict) and isinstance(value, dict):
            _merge(base[name], value)
        else:
            base[name] = value


def _apply_override(raw: dict, item: str) -> None:
    """Apply one ``dotted.key=yaml_value`` to the raw mapping, checking the key against the schema."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    parts = key.split(".")
    hint: Any = Config
    for i, part in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:i])
        if not _section(hint):
            raise ConfigError(f"override '{item}': '{prefix[:-1]}' is not a section; set it whole", key)
        if part not in hint.model_fields:
            raise ConfigError(f"{_unknown_key(prefix, part, list(hint.model_fields), key)} (from override '{item}')", key)
        hint = hint.model_fields[part].annotation
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


def _where(key: str | None, path: str | None, in_file: set[str], overrides: list[str]) -> str:
    """' (from override ...)' (the last override setting ``key`` or a section above it), ' (in FILE)' (for
    anything in a section the file names) or ' (default value)'."""
    if key is None:
        return ""
    for item in reversed(overrides):
        name = item.partition("=")[0].strip()
        if key == name or key.startswith((name + ".", name + "[")):
            return f" (from override '{item}')"
    return f" (in {path})" if re.split(r"[.\[]", key)[0] in in_file else " (default value)"


def _absolute(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def _absolute_patterns(patterns: str | list[str] | None, cwd: str) -> str | list[str] | None:
    """Local patterns made absolute (brace patterns stay patterns); URLs (``pipe:``, ``s3://``) left alone."""
    if isinstance(patterns, list):
        return [_absolute_patterns(p, cwd) for p in patterns]
    local = patterns is not None and "://" not in patterns and not patterns.startswith("pipe:")
    return _absolute(patterns, cwd) if local else patterns


def _resolve_paths(cfg: Config, cwd: str) -> None:
    """Make every local path absolute (``cfg`` is valid: no empty output_dir); the resume words stay words."""
    cfg.model.name_or_path = _absolute(cfg.model.name_or_path, cwd)
    cfg.train.ds_config = _absolute(cfg.train.ds_config, cwd)
    cfg.output_dir = _absolute(cfg.output_dir, cwd)
    if cfg.train.resume.lower() not in RESUME_WORDS:  # "Auto" stays, for validation to name it
        cfg.train.resume = _absolute(cfg.train.resume, cwd)
    for d in cfg.data.domains:
        d.shards, d.val_shards = _absolute_patterns(d.shards, cwd), _absolute_patterns(d.val_shards, cwd)


def load_config(path: str | None, overrides: list[str]) -> Config:
    """YAML file (or none: all defaults) + ``key=value`` overrides -> validated Config.

    Override values are parsed as YAML (``train.max_steps=8``, ``lora.attn_targets=[q_proj,v_proj]``,
    ``data.domains=[{name: a, shards: x.tar}]``); later overrides win; a mapping value is merged into
    the section it names. Relative paths resolve against the current directory.
    """
    raw = {} if path is None else _read_yaml(path)
    in_file = set(raw)
    for item in overrides:
        _apply_override(raw, item)
    sections = [k for k, f in Config.model_fields.items() if _section(f.annotation)]
    try:  # an empty YAML section (``train:``) means "all defaults"
        cfg = _validated({k: {} if v is None and k in sections else v for k, v in raw.items()})
        _resolve_paths(cfg, os.getcwd())
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e}{_where(e.key, path, in_file, overrides)}", e.key) from None
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
        if name in ("--local_rank", "--local-rank", "--config"):
            if not has_value and not args:
                raise ConfigError(f"{name} needs a {'path' if name == '--config' else 'value'}\n{usage_text}")
            value = value if has_value else args.pop(0)
            if name == "--config" and path is not None:
                raise ConfigError(f"--config given twice\n{usage_text}")
            path = value if name == "--config" else path
        elif arg.startswith("-"):
            raise ConfigError(f"unexpected argument {arg!r}\n{usage_text}")
        elif not has_value:
            raise ConfigError(f"override {arg!r} has no '=': overrides are key=value, e.g. train.max_steps=8\n{usage_text}")
        else:
            overrides.append(arg)
    return load_config(path, overrides)


# ---------------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}", key)


def _read_json(path: str, key: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {path!r} cannot be read as JSON ({e})", key) from None


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first problem in ``cfg``: the schema's types, ranges and choices (again,
    for a Config changed in code), then what spans fields, the model directory and the DeepSpeed JSON.

    Cheap (no model, no DeepSpeed import) so launchers run it before anything expensive.
    """
    _validated(cfg)
    seen: set[str] = set()
    for i, dom in enumerate(cfg.data.domains):
        key = f"data.domains[{i}]"
        _require(dom.name not in seen, f"{key}.name", f"duplicate domain name {dom.name!r}")
        _require(bool(dom.metrics), f"{key}.metric", "names no metric")
        _require(len(set(dom.metrics)) == len(dom.metrics), f"{key}.metric", f"names a metric twice: {dom.metric!r}")
        seen.add(dom.name)
    resume = cfg.train.resume
    _require(resume.lower() not in RESUME_WORDS or resume in RESUME_WORDS, "train.resume",
             f"{resume!r} is not a checkpoint directory; did you mean '{resume.lower()}'?")
    _require(not os.path.exists(cfg.output_dir) or os.path.isdir(cfg.output_dir), "output_dir",
             f"{cfg.output_dir!r} exists and is not a directory")
    k = cfg.mole.num_experts
    _require(cfg.mole.routing != "domain" or k == len(cfg.data.domains), "mole.num_experts",
             f"routing domain gives each of the {len(cfg.data.domains)} data.domains its own expert, so it must be "
             f"{len(cfg.data.domains)}, got {k}")
    _require(k == 1 or bool(cfg.lora.mlp_targets), "lora.mlp_targets",
             f"is empty, so the {k} experts mole.num_experts asks for would have nothing to adapt")
    _require(cfg.train.router_lr is None or (k > 1 and cfg.mole.routing != "domain"), "train.router_lr",
             f"is the learning rate of learned routers, but mole.num_experts={k} with routing {cfg.mole.routing!r} "
             "has none")
    _require(cfg.mole.router_input == "token" or (k > 1 and cfg.mole.routing != "domain"), "mole.router_input",
             f"{cfg.mole.router_input!r} is what a learned router reads, but mole.num_experts={k} with routing "
             f"{cfg.mole.routing!r} has no router")

    path, key = cfg.model.name_or_path, "model.name_or_path"
    _require(os.path.isdir(path), key,
             f"{path!r} is not a directory; expected a local Hugging Face LLaVA directory with config.json")
    config_json = os.path.join(path, "config.json")
    _require(os.path.isfile(config_json), key, f"{path!r} has no config.json; expected a local Hugging Face LLaVA directory")
    model = _read_json(config_json, key)
    _require(isinstance(model, dict) and "model_type" in model, key,
             f"{config_json!r} declares no model_type; expected a LLaVA (model_type 'llava')")
    _require(model["model_type"] in options(Family), key,
             f"{path!r} holds a {model['model_type']!r} model; expected a LLaVA of a supported family "
             f"(model_type {', '.join(options(Family))}, e.g. llava-1.5-7b-hf)")

    for name, families, kind in (("min_pixels", DYNAMIC_RESOLUTION, "dynamic-resolution"),
                                 ("max_pixels", DYNAMIC_RESOLUTION, "dynamic-resolution"),
                                 ("image_grid_pinpoints", ANYRES, "AnyRes"),
                                 ("vision_aspect_ratio", ANYRES_MAX, "AnyRes-max")):
        _require(getattr(cfg.data, name) is None or model["model_type"] in families, f"data.{name}",
                 f"applies to {kind} families ({', '.join(families)}); "
                 f"{path!r} holds a {model['model_type']!r} model")
    if cfg.data.image_grid_pinpoints is not None:
        side = (model.get("vision_config") or {}).get("image_size")
        for i, (height, width) in enumerate(cfg.data.image_grid_pinpoints):
            _require(not isinstance(side, int) or (height % side == 0 and width % side == 0),
                     f"data.image_grid_pinpoints[{i}]", f"[{height}, {width}] is not a multiple of the vision tower's "
                     f"image size {side} in both sides (each resolution is cut into whole tiles)")
    ratio = cfg.data.vision_aspect_ratio
    _require(ratio is None or ANYRES_MAX_PATTERN.fullmatch(ratio) is not None, "data.vision_aspect_ratio",
             f"must be anyres_max_N (N >= 1 tiles' worth of features), got {ratio!r}")
    if cfg.data.image_processor_backend == "torchvision":
        import importlib.util

        _require(importlib.util.find_spec("torchvision") is not None, "data.image_processor_backend",
                 "torchvision is not installed (pip install torchvision), or use pil")
    low, high = cfg.data.min_pixels, cfg.data.max_pixels
    _require(low is None or high is None or low <= high, "data.min_pixels", f"{low} exceeds data.max_pixels {high}")

    path, key = cfg.train.ds_config, "train.ds_config"
    _require(os.path.isfile(path), key, f"DeepSpeed config {path!r} does not exist")
    ds = _read_json(path, key)
    zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    _require(stage in (0, 1, 2, 3), key, f"{path!r} needs zero_optimization.stage in 0..3, got {stage!r}")
