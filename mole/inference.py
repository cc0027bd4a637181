"""Use a trained adapter: rebuild the MoLE LLaVA on its base model, and answer questions with ``generate``.

:func:`load_model` is the one loader that evaluation and export build on. It checks the adapter
against the base *before* loading the base weights (hidden size, layer count), then after surgery
requires the adapter to hold exactly the tensors the surgery created, with the same shapes: a
partial load would silently evaluate a half-adapted model. Weights are read from safetensors only.

Prompts are built exactly as training builds them (:func:`mole.data.conversation.render_conversation`,
i.e. the model's own chat template, with EOS after earlier answers) plus the template's generation
prompt, and images go through the same pad-to-square + image-processor path, so a question at
inference looks token for token like the questions the adapter was trained on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig

from mole.adapter import AdapterError, load_adapter, read_adapter_spec
from mole.adapter_check import resolve_base
from mole.backbones import Backbone, backbone_for
from mole.backbones.llava import LLAVA
from mole.data.conversation import IMAGE_PLACEHOLDER, Turn, render_conversation, to_chat_messages
from mole.experts import MoleMLP, RoutingContext
from mole.model import DTYPES
from mole.spec import AdapterSpec, ImageSpec
from mole.surgery import apply_mole


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def load_model(
    base_dir: str,
    adapter_dir: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    allow_remote: bool = False,
) -> nn.Module:
    """The base model (its family's stock class) with the adapter's MoLE layers (K>1) or plain LoRA (K=1) in place, in eval mode.

    The adapter directory is untrusted input (:mod:`mole.adapter_check`): before the base weights load
    or any adapter tensor is allocated, its spec must record the base's family and shapes and its file
    must hold exactly the float tensors surgery creates, with their shapes; then no value may be NaN or
    infinite. ``base_dir`` is a local directory unless ``allow_remote`` (a Hub id is then downloaded).
    Any problem raises :class:`mole.adapter.AdapterError` naming it. Every parameter is frozen; the
    model's routing context is :func:`routing_context`. The model's config reads the adapter's recorded
    image limits where the model uses them (AnyRes's grid pinpoints, OneVision's ``vision_aspect_ratio``):
    prepare its images with :func:`load_processor` given the adapter.
    """
    dtype = resolve_dtype(dtype)
    base_dir = resolve_base(base_dir, "base_dir", allow_remote)
    spec = read_adapter_spec(adapter_dir)
    base_config = check_base_fits(spec, base_dir, adapter_dir)
    state, spec = load_adapter(adapter_dir, base_config)
    backbone = backbone_for(base_config)
    model = backbone.model_class.from_pretrained(base_dir, dtype=dtype, local_files_only=True)
    backbone.configure(model.config, spec.image)  # e.g. AnyRes's grid pinpoints, as the processor's
    with torch.random.fork_rng(devices=[]):  # surgery initialises modules we overwrite; keep the caller's RNG
        apply_mole(model, spec)  # the model keeps the spec (model.mole_spec), e.g. how training prepared images
    _load_adapter_weights(model, state, adapter_dir, dtype)
    model.requires_grad_(False)
    model.config.use_cache = True
    return model.to(device).eval()


def model_image_settings(model, image_aspect: str | None = None, image_backend: str | None = None) -> tuple[str, str]:
    """``(image_aspect, image_backend)``: each as given, else as the adapter :func:`load_model` read
    records (``model.mole_spec.image``), else training's defaults."""
    spec = getattr(model, "mole_spec", None)
    image = (spec.image if spec is not None else ImageSpec()).overridden(image_aspect, image_backend)
    return image.aspect, image.backend


def check_base_fits(spec: AdapterSpec, base_dir: str, adapter_dir: str = "the adapter"):
    """The adapter's recorded base family and shapes against ``base_dir/config.json``, before any weight
    is read; returns the base's config. ``adapter_dir`` names the adapter in the error."""
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise AdapterError(f"base model {base_dir!r} has no config.json; expected a local Hugging Face LLaVA directory")
    base = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    if base.model_type != spec.family:
        raise AdapterError(f"base model {base_dir!r} holds a {base.model_type!r} model; expected a LLaVA directory "
                           f"of the adapter's family {spec.family!r}")
    mismatches = [change for change in spec.on_base(base).diff(spec) if change.impact == "shape"]
    if mismatches:
        change = mismatches[0]
        raise AdapterError(
            f"{os.path.join(adapter_dir, 'mole_config.json')}: adapter was trained on a base with {change.field}={change.before} (base_model {spec.base_model!r}), "
            f"but {base_dir!r} has {change.field}={change.after}: wrong base model for this adapter"
        )
    return base


def _load_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor], adapter_dir: str, dtype: torch.dtype) -> None:
    """Copy the adapter into exactly the parameters surgery made trainable; anything else is an error."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise AdapterError(
            f"adapter {adapter_dir!r} does not match the model its mole_config.json describes: "
            f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected tensors {unexpected[:3]}"
        )
    wrong = [f"{n}: adapter {tuple(state[n].shape)} vs model {tuple(p.shape)}" for n, p in params.items() if state[n].shape != p.shape]
    if wrong:
        raise AdapterError(f"adapter {adapter_dir!r} has tensors of the wrong shape: {wrong[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.data = state[name].to(dtype=dtype).clone()


def routing_context(model: nn.Module) -> RoutingContext:
    """The shared routing context of a MoLE model (its ``stats()`` are the latest forward's, per layer)."""
    for module in model.modules():
        if isinstance(module, MoleMLP):
            return module.context
    raise ValueError("the model has no MoLE layers: load it with mole.load_model")


def routes_by_domain(model: nn.Module) -> bool:
    """Whether the model's adapter routes by domain (``mole.routing: domain``): its callers must then say,
    per prompt or sample, which of the adapter's domains (``model.mole_spec.domains``) it is."""
    spec = getattr(model, "mole_spec", None)
    return spec is not None and spec.routing == "domain"


def mole_layers(model: nn.Module) -> list[MoleMLP]:
    return [module for module in model.modules() if isinstance(module, MoleMLP)]


# ------------------------------------------------------------------------------------- prompts


def prompt_text(turns: list[Turn], has_image: bool, tokenizer) -> str:
    """A conversation ending with a user turn, rendered as in training, plus the generation prompt."""
    if not turns or turns[-1].role != "user":
        raise ValueError("a prompt must end with a user turn")
    text, _ = render_conversation(turns, has_image, tokenizer)
    messages = to_chat_messages(turns, has_image)
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not with_prompt.startswith(plain):
        raise ValueError("the chat template's generation prompt is not a suffix of the conversation")
    return text + with_prompt[len(plain) :]


def question_turns(question: str, has_image: bool) -> list[Turn]:
    """A single user question, with the image placeholder LLaVA data puts before it."""
    return [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question)]


@dataclass
class Prompt:
    """One generation request: the conversation so far (ending with the user's question) and its image."""

    turns: list[Turn]
    image: Image.Image | None = None


class PromptEncoder:
    """Prompts -> a left-padded generation batch (``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_sizes``: ``None`` where the batch or the family has none).

    Left padding keeps every prompt's last token in the last column, where ``generate`` appends.
    Images take the path training took (``image_aspect``, ``image_backend``: the adapter records
    them, :attr:`mole.spec.AdapterSpec.image`; the family's image path, ``backbone``, LLaVA-1.5 when
    not given), so the model sees the pixels it was trained on, not ones a level or two apart.
    """

    def __init__(self, processor, image_aspect: str = "pad", image_backend: str = "fast", backbone: Backbone = LLAVA):
        self.processor, self.tokenizer, self.backbone = processor, processor.tokenizer, backbone
        self.images = backbone.image_transform(processor.image_processor, image_aspect, image_backend)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.num_image_tokens = backbone.tile_image_tokens(processor)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One image's pixels as training prepared them: (3, H, W), or (tiles, 3, H, W) for AnyRes."""
        return self.images(image)[0]

    def token_ids(self, prompt: Prompt, image_size: tuple[int, int] | None = None) -> list[int]:
        text = prompt_text(prompt.turns, prompt.image is not None, self.tokenizer)
        count = self.num_image_tokens if image_size is None else self.backbone.image_tokens(self.processor, image_size)
        ids: list[int] = []
        for token in self.tokenizer(text, add_special_tokens=True)["input_ids"]:
            ids += [token] * (count if token == self.image_token_id else 1)
        if ids.count(self.image_token_id) != (count if prompt.image is not None else 0):
            raise ValueError("a prompt needs exactly one image placeholder when it has an image, none otherwise")
        return ids

    def __call__(self, prompts: list[Prompt]) -> dict:
        prepared = [self.images(prompt.image.convert("RGB")) if prompt.image is not None else (None, None)
                    for prompt in prompts]
        rows = [self.token_ids(prompt, size) for prompt, (_, size) in zip(prompts, prepared)]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row) :] = torch.tensor(row)
            attention_mask[i, length - len(row) :] = 1
        tiles = [pixels.unsqueeze(0) if pixels.dim() == 3 else pixels  # one (3, H, W) image is one tile
                 for pixels, _ in prepared if pixels is not None]
        sizes = [size for _, size in prepared if size is not None]
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": torch.cat(tiles) if tiles else None,
                "image_sizes": torch.tensor(sizes, dtype=torch.long) if sizes else None}


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor,
    prompts: list[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    image_aspect: str | None = None,
    encoder: PromptEncoder | None = None,
    image_backend: str | None = None,
    domain: int | list[int] | None = None,
) -> list[str]:
    """Greedy answers, ``batch_size`` prompts per ``generate`` call (KV cache on), decoded without specials.

    Images are prepared as ``image_aspect`` and ``image_backend`` say, by default as the adapter's
    training prepared them (:func:`model_image_settings`). ``encoder`` (built from ``processor`` and
    those when not given) may be reused across calls. ``domain``: for an adapter that routes by domain
    (and only for one), the index in ``model.mole_spec.domains`` whose expert answers, for every prompt
    or one per prompt.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if routes_by_domain(model) != (domain is not None):
        raise ValueError("this adapter routes by domain: say which domain answers" if domain is None else
                         "a domain applies to a domain-routed adapter only")
    if isinstance(domain, list) and len(domain) != len(prompts):
        raise ValueError(f"{len(domain)} domains for {len(prompts)} prompts")
    check_processor(model, processor)
    backbone = backbone_for(model.config)
    encoder = encoder or PromptEncoder(processor, *model_image_settings(model, image_aspect, image_backend),
                                       backbone=backbone)
    device = model.device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = encoder(prompts[start : start + batch_size])
        if domain is not None:  # the rows of every forward of this generate call, prompt and decode steps alike
            routing_context(model).route(domain[start : start + batch_size] if isinstance(domain, list) else domain)
        input_ids = batch["input_ids"].to(device)
        images = None
        if batch["pixel_values"] is not None:
            images = {"pixel_values": batch["pixel_values"].to(device)}
            if batch["image_sizes"] is not None:
                images["image_sizes"] = batch["image_sizes"].to(device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            **backbone.generation_inputs(model, input_ids, images),  # never pixel_values=None
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=processor.tokenizer.pad_token_id,
            eos_token_id=processor.tokenizer.eos_token_id,
        )
        answers += decode_answers(processor.tokenizer, out[:, batch["input_ids"].shape[1] :])
    return answers


def decode_answers(tokenizer, new_tokens: torch.Tensor) -> list[str]:
    """Generated token rows as text, special tokens and surrounding space removed. An answer cut by
    ``max_new_tokens`` inside a character that byte-fallback tokens spell (accents, CJK, emoji) would
    end in U+FFFD, the replacement for its missing bytes: that half character is dropped."""
    return [text.strip().rstrip("\ufffd") for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def load_processor(base_dir: str, allow_remote: bool = False, adapter_dir: str | None = None):
    """The base's processor as its family loads it, from its local directory unless ``allow_remote``
    (:func:`mole.adapter_check.resolve_base`). With ``adapter_dir``, images are prepared as that
    adapter's training prepared them (its recorded image processor backend and pixel or tile limits,
    :class:`mole.spec.ImageSpec`), not as the base directory says; a recorded backend that cannot be
    built here (torchvision not installed) is an :class:`~mole.adapter.AdapterError` naming the adapter:
    the PIL and torchvision classes resize with different code and are not shown equal for any family,
    so one does not stand in for the other."""
    config = AutoConfig.from_pretrained(base_dir, local_files_only=not allow_remote)
    image = read_adapter_spec(adapter_dir).image if adapter_dir is not None else None
    try:
        return backbone_for(config).load_processor(base_dir, local_files_only=not allow_remote, image=image)
    except ValueError as err:
        raise AdapterError(f"adapter {adapter_dir!r}: {err}") from None


def check_processor(model: nn.Module, processor) -> None:
    """A one-line ``ValueError`` when ``processor`` would prepare images otherwise than the training of the
    adapter ``model`` was loaded with (:func:`load_model`) recorded: another backend, other pixel or tile limits."""
    spec = getattr(model, "mole_spec", None)
    if spec is None:
        return
    difference = image_preparation_difference(spec.image, backbone_for(model.config), processor)
    if difference is not None:
        name, recorded, used = difference
        raise ValueError(f"the processor prepares images with {name} {used!r}, but the adapter was trained with "
                         f"{recorded!r}: load it with mole.inference.load_processor(base, adapter_dir=...)")


def image_preparation_difference(recorded: ImageSpec, backbone, processor) -> tuple[str, object, object] | None:
    """The first setting ``recorded`` (an adapter's image record) holds that ``processor`` prepares images
    otherwise with, as ``(name, recorded value, processor's value)``; None when the processor agrees
    (a setting not recorded, ``None``, agrees with any)."""
    built = backbone.prepared_image(recorded, processor)
    for f in dataclasses.fields(ImageSpec):
        value, used = getattr(recorded, f.name), getattr(built, f.name)
        if value is not None and value != used:
            return f.name, value, used
    return None
