"""What defines a MoLE adapter, as one frozen, validated object: :class:`AdapterSpec`.

Like peft's ``LoraConfig``: training builds it from the run config and the loaded base's config
(:meth:`AdapterSpec.from_config`), :func:`mole.surgery.apply_mole` builds the layers from it, it is
saved beside the weights as ``mole_config.json`` (:meth:`AdapterSpec.to_json`) and read back to
rebuild them (:meth:`AdapterSpec.from_json`, every format version this module names), and a resumed
run compares its spec with the checkpoint's (:meth:`AdapterSpec.diff`).

Every value is checked once, in the constructor; a problem is a one-line :class:`SpecError` that
names the field. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Literal

from mole.choices import (ANYRES, ANYRES_MAX, DYNAMIC_RESOLUTION, AuxLoss, Family, ImageAspect, ImageBackend,
                          ProcessorBackend, RouterInput, Routing, options)

FORMAT_VERSION = 3
"""The ``mole_config.json`` version written. 2 added ``family``; 3 the image processor's backend and the
family's pixel and tile limits (``image_processor_backend``, ``min_pixels``, ``max_pixels``,
``image_grid_pinpoints``, ``vision_aspect_ratio``), and ``domains`` (routing ``domain``). Versions 1 and
2 are still read: their adapters took the model directory's limits and whichever backend transformers
chose, which is what an unrecorded (``null``) value still means, and name no domains (no earlier mole
routed by domain)."""

ANYRES_MAX_PATTERN = re.compile(r"anyres_max_[1-9][0-9]*")
"""``vision_aspect_ratio`` as LLaVA-OneVision's model reads it: ``anyres_max_N``, N tiles' worth of features at most."""

Impact = Literal["shape", "computation", "training"]
"""What a changed field changes. shape: the adapter's tensors (names or sizes), so weights of one
spec cannot load into a model built from the other; computation: the same tensors compute something
else (or see other inputs); training: only how training proceeds, a trained adapter computes the same."""


class SpecError(ValueError):
    """An adapter spec value out of range or of the wrong type; ``field`` is the spec field it concerns."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _meta(impact: Impact, config_key: str | None = None, *, unordered: bool = False) -> dict:
    """Field metadata: its :data:`Impact`, the run config key it comes from, and whether order matters."""
    return {"impact": impact, "config_key": config_key, "unordered": unordered}


@dataclass(frozen=True)
class ImageSpec:
    """How training turned images into pixels; inference must do the same to show the model what it
    learned on. The two backends differ by up to 2 uint8 levels per pixel; a crop instead of a pad shows
    the model other pixels altogether; other pixel or tile limits show it another resolution and
    another number of image tokens.

    A trained adapter records what its training's image processor held (the family's limits resolved
    from the model directory where the run left them unset), so inference does not depend on the
    directory it runs on. ``None`` is "not recorded": the model directory's value (a limit of another
    family, or an adapter of format version 1 or 2), and for the processor backend transformers'
    choice (torchvision where importable)."""

    aspect: ImageAspect = field(default="pad", metadata=_meta("computation", "data.image_aspect"))
    backend: ImageBackend = field(default="fast", metadata=_meta("computation", "data.image_backend"))
    processor_backend: ProcessorBackend | None = field(default=None,
                                                       metadata=_meta("computation", "data.image_processor_backend"))
    """Which of transformers' image processor classes ran: ``pil`` (``...ImageProcessorPil``) or ``torchvision``."""
    min_pixels: int | None = field(default=None, metadata=_meta("computation", "data.min_pixels"))
    """Dynamic-resolution families: the fewest pixels an image is resized to."""
    max_pixels: int | None = field(default=None, metadata=_meta("computation", "data.max_pixels"))
    """Dynamic-resolution families: the most pixels an image is resized to."""
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = field(
        default=None, metadata=_meta("computation", "data.image_grid_pinpoints"))
    """AnyRes families: the (height, width) resolutions an image is tiled at (the best fitting one)."""
    vision_aspect_ratio: str | None = field(default=None, metadata=_meta("computation", "data.vision_aspect_ratio"))
    """LLaVA-OneVision: ``anyres_max_N``, beyond N tiles' worth the features are downscaled."""

    def __post_init__(self) -> None:
        _choice(self.aspect, ImageAspect, "image_aspect")
        _choice(self.backend, ImageBackend, "image_backend")
        if self.processor_backend is not None:
            _choice(self.processor_backend, ProcessorBackend, "image_processor_backend")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 1), name,
                     f"must be an integer >= 1 or null, got {value!r}")
        low, high = self.min_pixels, self.max_pixels
        _require(low is None or high is None or low <= high, "min_pixels", f"{low} exceeds max_pixels {high}")
        if self.image_grid_pinpoints is not None:
            points = self.image_grid_pinpoints
            ok = isinstance(points, (list, tuple)) and len(points) > 0 and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) and v >= 1 for v in p) for p in points)
            _require(ok, "image_grid_pinpoints",
                     f"must be a non-empty list of [height, width] integer pairs >= 1, got {points!r}")
            object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(p) for p in points))
        ratio = self.vision_aspect_ratio
        _require(ratio is None or (isinstance(ratio, str) and ANYRES_MAX_PATTERN.fullmatch(ratio) is not None),
                 "vision_aspect_ratio", f"must be anyres_max_N (N >= 1 tiles) or null, got {ratio!r}")

    def overridden(self, aspect: ImageAspect | None = None, backend: ImageBackend | None = None) -> ImageSpec:
        """This preparation with the caller's explicit choices where given."""
        return dataclasses.replace(self, aspect=aspect or self.aspect, backend=backend or self.backend)


BASE_FIELDS = ("family", "hidden_size", "num_hidden_layers")
"""The fields the base model's config decides (:func:`base_fields`); the adapter fits only a base that has them."""


@dataclass(frozen=True)
class AdapterSpec:
    """One MoLE adapter: the base it fits, its layers, and how its training prepared images.

    Field metadata says each field's :data:`Impact` when it changes and the run config key it comes
    from. ``base_model`` is where the base was (``None`` when the spec was built without a path).
    """

    base_model: str | None = field(metadata=_meta("computation", "model.name_or_path"))
    """The base model directory training loaded; another path of the same shapes may hold other weights."""
    family: Family = field(metadata=_meta("shape"))
    """Backbone family (the base config's ``model_type``): which modules surgery finds and replaces."""
    hidden_size: int = field(metadata=_meta("shape"))
    """The LLM's hidden size: the input width of every router and of the MLP experts' ``lora_A``."""
    num_hidden_layers: int = field(metadata=_meta("shape"))
    """The LLM's decoder layers: one MoLE MLP and one set of attention LoRA each."""
    num_experts: int = field(metadata=_meta("shape", "mole.num_experts"))
    """LoRA experts per adapted MLP (K); 1 is plain LoRA, with no router."""
    routing: Routing = field(metadata=_meta("computation", "mole.routing"))
    """How the router's choice weights the experts (:data:`mole.choices.Routing`)."""
    aux_loss: AuxLoss = field(metadata=_meta("training", "mole.aux_loss"))
    """The load-balancing loss form training used; it enters only the training objective."""
    r: int = field(metadata=_meta("shape", "lora.r"))
    """Rank of every LoRA (experts and attention)."""
    alpha: float = field(metadata=_meta("computation", "lora.alpha"))
    """LoRA scaling numerator: every update is scaled by alpha / r."""
    dropout: float = field(metadata=_meta("training", "lora.dropout"))
    """Dropout on the LoRA input, in [0, 1); active in training only."""
    attn_targets: tuple[str, ...] = field(metadata=_meta("shape", "lora.attn_targets", unordered=True))
    """Attention projections of the LLM with a single (non-MoE) LoRA."""
    mlp_targets: tuple[str, ...] = field(metadata=_meta("shape", "lora.mlp_targets", unordered=True))
    """MLP projections of the LLM with the mixture of LoRA experts."""
    train_projector: bool = field(metadata=_meta("shape", "train.train_projector"))
    """Whether the multimodal projector trained: its weights are then part of the adapter."""
    image: ImageSpec = field(default_factory=ImageSpec, metadata=_meta("computation"))
    """How training prepared images (``data.image_aspect``, ``data.image_backend``)."""
    domains: tuple[str, ...] = field(default=(), metadata=_meta("computation", "data.domains"))
    """Routing ``domain``: the name of the domain each expert serves, in expert order (``data.domains``'
    names); evaluation and inference name one of them. Empty for every other routing, whose experts
    serve no domain by construction."""
    router_input: RouterInput = field(default="token", metadata=_meta("computation", "mole.router_input"))
    """What the router reads (:data:`mole.choices.RouterInput`); written to ``mole_config.json`` only when
    not ``token``, so a token-routed adapter's file stays what every reader of version 3 reads."""

    def __post_init__(self) -> None:
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise SpecError(f"base_model: expected a path or null, got {self.base_model!r}", "base_model")
        _choice(self.family, Family, "family")
        for name in ("hidden_size", "num_hidden_layers", "num_experts", "r"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        _choice(self.routing, Routing, "routing")
        _choice(self.router_input, RouterInput, "router_input")
        _require(self.router_input == "token" or self.has_router, "router_input",
                 f"{self.router_input!r} is what a learned router reads; K={self.num_experts} with routing "
                 f"{self.routing!r} has none")
        _choice(self.aux_loss, AuxLoss, "aux_loss")
        _require(_is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0, "alpha",
                 f"must be a finite number > 0, got {self.alpha!r}")
        _require(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        for name in ("attn_targets", "mlp_targets"):
            value = getattr(self, name)
            ok = isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value)
            _require(ok and len(set(value)) == len(value), name,
                     f"must be a list of distinct module names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _require(self.num_experts == 1 or bool(self.mlp_targets), "mlp_targets",
                 f"is empty, so the {self.num_experts} experts would have nothing to adapt")
        _require(isinstance(self.train_projector, bool), "train_projector", f"must be true or false, got {self.train_projector!r}")
        _require(isinstance(self.image, ImageSpec), "image", f"expected an ImageSpec, got {self.image!r}")
        ok = isinstance(self.domains, (list, tuple)) and all(isinstance(d, str) and d for d in self.domains)
        _require(ok and len(set(self.domains)) == len(self.domains), "domains",
                 f"must be a list of distinct domain names, got {self.domains!r}")
        object.__setattr__(self, "domains", tuple(self.domains))
        if self.routing == "domain":
            _require(len(self.domains) == self.num_experts, "domains",
                     f"routing domain needs one domain name per expert ({self.num_experts}), got {list(self.domains)}")
        else:
            _require(not self.domains, "domains", f"names domains, but routing {self.routing} does not route by domain")
        for name, families in (("min_pixels", DYNAMIC_RESOLUTION), ("max_pixels", DYNAMIC_RESOLUTION),
                               ("image_grid_pinpoints", ANYRES), ("vision_aspect_ratio", ANYRES_MAX)):
            _require(getattr(self.image, name) is None or self.family in families, name,
                     f"applies to the {', '.join(families)} families, not {self.family!r}")

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_base(cls, base_config, **settings: Any) -> AdapterSpec:
        """A spec for the base whose Hugging Face config is ``base_config`` (family and shapes taken
        from it) with the layer ``settings`` given (every other field; ``base_model`` defaults to none)."""
        return cls(**{"base_model": None, **base_fields(base_config), **settings})

    @classmethod
    def from_config(cls, cfg, base_config) -> AdapterSpec:
        """The adapter a run config trains on the loaded base (``base_config``: its ``model.config``)."""
        return cls.from_base(base_config, **_run_settings(lambda key: reduce(getattr, key.split("."), cfg)))

    def on_base(self, base_config) -> AdapterSpec:
        """This spec with the family and shapes of the base ``base_config`` describes (compare with
        :meth:`diff` to see whether the adapter fits that base)."""
        return dataclasses.replace(self, **base_fields(base_config))

    def as_recorded(self, run_config: dict | None, adapter_record: dict | None) -> AdapterSpec:
        """This spec with what a run recorded in place of its own values: the run settings its saved
        config (``run_config``, the plain mapping of a ``config.yaml``) holds, and the base family and
        shapes its ``mole_config.json`` object (``adapter_record``, any version) holds. Either may be
        partial or missing; what is not recorded is taken as unchanged. Raises :class:`SpecError` for a
        recorded value no spec may hold."""

        def recorded(key: str) -> Any:
            node = run_config
            for part in key.split("."):
                node = node.get(part, _UNSET) if isinstance(node, dict) else _UNSET
            return _UNSET if node is None else node  # a null records nothing

        settings = {name: value for name, value in _run_settings(recorded, self.image).items() if value is not _UNSET}
        if isinstance(recorded("mole"), dict) and "router_input" not in settings:
            settings["router_input"] = "token"  # recorded before the key existed: every router read its token
        if isinstance(adapter_record, dict):
            settings.update({name: adapter_record[name] for name in BASE_FIELDS if name in adapter_record})
        return dataclasses.replace(self, **settings)

    # ---------------------------------------------------------------------------- comparing

    def domain_index(self, name: str) -> int:
        """The expert that serves domain ``name`` under routing ``domain``; a one-line ``ValueError`` for a
        name the adapter was not trained with, or an adapter that does not route by domain."""
        if self.routing != "domain":
            raise ValueError(f"a domain applies to a domain-routed adapter; this one routes {self.routing}")
        if name not in self.domains:
            raise ValueError(f"domain {name!r} is not one of the adapter's domains ({', '.join(self.domains)})")
        return self.domains.index(name)

    def diff(self, other: AdapterSpec) -> list[SpecChange]:
        """The fields in which this spec differs from ``other``, in field order, each with its
        :data:`Impact`. Target lists compare as sets: their order shapes no tensor."""
        changes = []
        for f in dataclasses.fields(self):
            now, before = getattr(self, f.name), getattr(other, f.name)
            if f.metadata["unordered"]:
                same = sorted(now) == sorted(before)
            else:
                same = now == before
            if not same:
                impact = f.metadata["impact"]
                if f.name == "routing" and self.has_router != other.has_router:
                    impact = "shape"  # a router weight and bias per layer appear or go (routing domain has none)
                changes.append(SpecChange(f.name, before, now, impact))
        return changes

    @property
    def has_router(self) -> bool:
        """Whether the MoLE layers hold a router: K > 1 with a learned routing (``domain`` routes by the
        sample's domain instead)."""
        return self.num_experts > 1 and self.routing != "domain"

    # -------------------------------------------------------------------------- (de)serialising

    def to_dict(self) -> dict:
        """The ``mole_config.json`` object: flat, versioned, with version 1's keys where they existed."""
        out = {"format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "image":
                out.update(image_aspect=value.aspect, image_backend=value.backend,
                           image_processor_backend=value.processor_backend, min_pixels=value.min_pixels,
                           max_pixels=value.max_pixels, vision_aspect_ratio=value.vision_aspect_ratio,
                           image_grid_pinpoints=None if value.image_grid_pinpoints is None
                           else [list(p) for p in value.image_grid_pinpoints])
            elif f.name == "router_input" and value == "token":
                continue  # the default, implied by its absence (format 3 had no such key before)
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: Any) -> AdapterSpec:
        """A spec from a ``mole_config.json`` object of any readable version; :class:`SpecError` naming
        the field otherwise (unknown version, missing or unknown keys, bad values)."""
        if not isinstance(raw, dict):
            raise SpecError(f"expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version", _UNSET)
        if version is _UNSET:
            raise SpecError("missing keys ['format_version']", "format_version")
        if not _is_int(version) or version not in _KEYS:
            raise SpecError(f"adapter format_version {version!r} is not a version this mole reads "
                            f"({', '.join(map(str, _KEYS))})", "format_version")
        required, optional = _KEYS[version]
        missing = [key for key in required if key not in raw]
        if missing:
            raise SpecError(f"missing keys {missing}", missing[0])
        unknown = [key for key in raw if key not in required and key not in optional]
        if unknown:
            raise SpecError(f"unknown keys {unknown} for format_version {version}", unknown[0])
        values = {**optional, **raw}
        values.pop("format_version")
        image = ImageSpec(values.pop("image_aspect"), values.pop("image_backend"),
                          **{name: values.pop(key) for name, key in _IMAGE_KEYS.items()})
        return cls(**values, image=image)

    @classmethod
    def from_json(cls, text: str | bytes) -> AdapterSpec:
        """A spec from ``mole_config.json``'s text (see :meth:`from_dict`); not JSON is a :class:`SpecError` too."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's stack
            raise SpecError(f"not JSON ({err})") from None
        return cls.from_dict(raw)


@dataclass(frozen=True)
class SpecChange:
    """One field in which two specs differ: its value in the spec compared with (``before``, e.g. a
    checkpoint's) and in this one (``after``), and what the difference changes."""

    field: str
    before: Any
    after: Any
    impact: Impact


def base_fields(base_config) -> dict[str, Any]:
    """:data:`BASE_FIELDS` of a Hugging Face LLaVA config (the base model's ``config``)."""
    text = base_config.text_config
    return {"family": base_config.model_type, "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers}


def config_key(name: str) -> str | None:
    """The run config's dotted key that spec field ``name`` comes from (none for the base's fields)."""
    return next(f.metadata["config_key"] for f in dataclasses.fields(AdapterSpec) if f.name == name)


# -------------------------------------------------------------------------------------- helpers

_UNSET: Any = object()

_IMAGE_KEYS = {"processor_backend": "image_processor_backend", "min_pixels": "min_pixels", "max_pixels": "max_pixels",
               "image_grid_pinpoints": "image_grid_pinpoints", "vision_aspect_ratio": "vision_aspect_ratio"}
"""The :class:`ImageSpec` fields version 3 added, by their ``mole_config.json`` key."""
_V1_REQUIRED = ("format_version", "hidden_size", "num_hidden_layers", "num_experts", "routing", "r", "alpha",
                "dropout", "attn_targets", "mlp_targets", "train_projector")
# versions 1 and 2 recorded no image processor backend or limits: their adapters took the model directory's (null)
_V2_DEFAULTS = {key: None for key in _IMAGE_KEYS.values()}
# version 1 did not require what it always wrote (base_model, aux_loss); its first files lack the image record
_V1_DEFAULTS = {"base_model": None, "family": "llava", "aux_loss": "switch", "image_aspect": "pad",
                "image_backend": "fast", **_V2_DEFAULTS}
_V2_REQUIRED = (*_V1_REQUIRED, "base_model", "family", "aux_loss", "image_aspect", "image_backend")
_V3_REQUIRED = (*_V2_REQUIRED, *_IMAGE_KEYS.values(), "domains")
_KEYS = {1: (_V1_REQUIRED, {**_V1_DEFAULTS, "domains": ()}), 2: (_V2_REQUIRED, {**_V2_DEFAULTS, "domains": ()}),
         3: (_V3_REQUIRED, {"router_input": "token"})}
"""Per readable format version: the keys a file must hold, and defaults for those it may leave out."""


def _run_settings(get, image: ImageSpec | None = None) -> dict[str, Any]:
    """The spec fields a run config sets, read with ``get(dotted key)`` (which may answer ``_UNSET``;
    ``image`` then supplies the image preparation left unrecorded)."""
    settings = {}
    for f in dataclasses.fields(AdapterSpec):
        if f.metadata["config_key"] is not None:
            settings[f.name] = get(f.metadata["config_key"])
    domains = settings["domains"]  # the run's data.domains: their names, when routing by them
    if domains is not _UNSET:
        names = tuple(d.get("name") if isinstance(d, dict) else getattr(d, "name", d) for d in domains or ())
        settings["domains"] = names if settings["routing"] == "domain" else ()
    chosen = {f.name: get(f.metadata["config_key"]) for f in dataclasses.fields(ImageSpec)}
    defaults = dataclasses.asdict(image) if image is not None else {}
    settings["image"] = ImageSpec(**{name: defaults[name] if value is _UNSET else value for name, value in chosen.items()})
    return settings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise SpecError(f"{name}: {problem}", name)


def _choice(value: Any, choice: Any, name: str) -> None:
    allowed = options(choice)
    _require(value in allowed and isinstance(value, str), name, f"must be one of {', '.join(allowed)}; got {value!r}")
