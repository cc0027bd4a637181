"""What one backbone family is, for mole: :class:`Backbone`, and :func:`backbone_for` choosing it.

A family description says only what differs between the multimodal LLMs mole adapts through their
stock Hugging Face classes: where the decoder's MLPs and attention projections are, which modules
are the vision tower and the projector, how an image becomes pixels and image tokens, the extra
inputs the model takes beside ``pixel_values``, how a packed batch's positions are numbered, and what a
minimal dummy image is (a text-only batch still runs the vision path on every rank under ZeRO-3).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from mole.choices import Family, ImageAspect, ImageBackend, ProcessorBackend, options
from mole.data.images import PixelTransform, make_pixel_transform, mean_colour, pad_to_square
from mole.spec import ImageSpec

ImageInputs = dict[str, torch.Tensor]
"""Image inputs of the model: ``pixel_values`` and the family's extras (``image_sizes``)."""


@dataclass(frozen=True)
class Backbone:
    """One family's description; the LLaVA-1.5 values are the defaults, each family file overrides.

    Methods that need the model take it; methods that prepare data take the family's image processor
    (or processor) and never the model, so data workers stay light.
    """

    family: Family
    """The base config's ``model_type``."""
    model_class_name: str
    """The stock transformers class, e.g. ``LlavaForConditionalGeneration``."""
    mlp_pattern: str = r"(.*\.)?language_model\.layers\.\d+\.mlp"
    """Full-match pattern of every decoder layer's MLP (each becomes a MoLE MLP)."""
    attention_pattern: str = r"(.*\.)?language_model\.layers\.\d+\.self_attn\.({targets})"
    """Full-match pattern of the attention projections named by ``{targets}`` (plain LoRA)."""
    projector_prefixes: tuple[str, ...] = ("multi_modal_projector",)
    """Parameters named with one of these train when ``train.train_projector`` is on."""
    vision_tower_prefix: str = "vision_tower"
    """The vision tower's module name: it stays frozen."""
    extra_image_inputs: tuple[str, ...] = ()
    """Model inputs beside ``pixel_values`` that describe the batch's images (``image_sizes``)."""
    fast_images: bool = True
    """Whether mole's fast image path may stand in for the image processor (checked on probe images)."""
    default_processor_backend: ProcessorBackend | None = None
    """The image processor backend built when the run names none; ``None``: transformers' choice
    (torchvision where importable, else PIL)."""

    # ------------------------------------------------------------------------------ the model

    @property
    def model_class(self) -> type[nn.Module]:
        import transformers

        return getattr(transformers, self.model_class_name)

    def attention_regex(self, targets: list[str]) -> str:
        return self.attention_pattern.format(targets="|".join(re.escape(t) for t in targets))

    def is_projector(self, name: str) -> bool:
        return any(prefix in name for prefix in self.projector_prefixes)

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """The projected image features of a batch's images, in image-token order: (image tokens, hidden)."""
        out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
        return torch.cat(list(out.pooler_output), dim=0)

    def dummy_image(self, config, dtype: torch.dtype, device: torch.device) -> ImageInputs:
        """The smallest image inputs the vision path accepts (a text-only batch's stand-in), batched."""
        vision = config.vision_config
        return {"pixel_values": torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size,
                                            dtype=dtype, device=device)}

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                images: ImageInputs | None, position_ids: torch.Tensor | None = None):
        """The stock model's output (its ``logits``; mole computes the LM loss) on a batch, the vision
        path run whether or not the batch has an image (``images`` ``None``: the family's
        :meth:`dummy_image`, its features joined to the graph times zero), so every rank gathers the
        same parameters under ZeRO-3.

        A packed batch (:mod:`mole.data.packing`) comes with ``position_ids`` (batch, seq), 0, 1, 2, ...
        restarting at each sample, and no ``attention_mask``: the model then keeps the samples of a row
        apart (under flash attention through :func:`varlen_kwargs`). This default hands the model :meth:`embed`'s embeddings and those positions: right for a
        family whose positions are 0, 1, 2, ... (checked against each stock model by the tests). A
        family that numbers positions from its inputs (M-RoPE) or adds features deeper in the LLM
        overrides it.
        """
        embeds = self.embed(model, input_ids, images)
        return model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                     **varlen_kwargs(model, position_ids))

    def embed(self, model: nn.Module, input_ids: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
        """(batch, seq, hidden) token embeddings with the image features scattered into the image-token
        positions; without images the :meth:`dummy_image`'s features join them times zero."""
        embeds = model.get_input_embeddings()(input_ids)
        if torch.is_grad_enabled():
            # ZeRO-3 reduces a leaf module's gradients (each MoLE MLP is one) from a full backward hook,
            # which fires before the module's own backward when none of its inputs requires a gradient:
            # with nothing trainable below the first MLP (no attention LoRA, frozen projector) it would
            # reduce zeros. Its input carries a gradient anyway whenever the projector trains.
            embeds.requires_grad_(True)
        text_only = images is None
        if text_only:
            images = self.dummy_image(model.config, embeds.dtype, embeds.device)
        extra = {name: images[name] for name in self.extra_image_inputs}
        features = self.image_features(model, images["pixel_values"].to(embeds.dtype), **extra)
        features = features.to(embeds.dtype)  # (image tokens, hidden)
        if text_only:
            return embeds + features.sum() * 0.0
        image_positions = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        if image_positions.sum() != features.numel():
            raise ValueError(
                f"{int(image_positions.sum()) // embeds.shape[-1]} image tokens in the batch but "
                f"{features.shape[0]} image features: the data and the model's processor disagree"
            )
        return embeds.masked_scatter(image_positions, features)

    def prefill_inputs(self, model: nn.Module, input_ids: torch.Tensor, images: ImageInputs | None) -> dict:
        """What ``generate`` starts from (beside ``attention_mask``) when every rank must run the vision
        path, image or not: held-out answers under ZeRO-3 (:mod:`mole.train.heldout`), where the stock
        ``generate`` would skip the vision tower on a text-only batch. Here :meth:`embed`'s embeddings as
        ``inputs_embeds``; ``generate`` then returns the new tokens only."""
        return {"inputs_embeds": self.embed(model, input_ids, images)}

    def generation_inputs(self, model: nn.Module, input_ids: torch.Tensor, images: ImageInputs | None) -> dict:
        """What ``generate`` takes beside ``input_ids`` and ``attention_mask`` for a batch's images
        (``pixel_values`` and the family's size input ``image_sizes``, on the model's device), none for
        a batch without one."""
        if images is None:
            return {}
        return {"pixel_values": images["pixel_values"].to(model.dtype),
                **{name: images[name] for name in self.extra_image_inputs}}

    # ------------------------------------------------------------------------------- the data

    def load_processor(self, path: str, local_files_only: bool = True, image: ImageSpec | None = None):
        """The processor whose ``tokenizer``, ``image_processor`` and ``image_token`` the data path reads,
        with the image processor backend and the family's limits of ``image`` where it records them
        (else the model directory's); a backend that cannot be built is a one-line ``ValueError``."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only, **self.backend_kwargs(image))
        check_backend(processor.image_processor, image)
        return processor

    def backend_kwargs(self, image: ImageSpec | None) -> dict:
        """``from_pretrained``'s ``backend`` argument for ``image``'s processor backend, or the family's default."""
        wanted = (image.processor_backend if image is not None else None) or self.default_processor_backend
        return {"backend": wanted} if wanted else {}

    def prepared_image(self, image: ImageSpec, processor) -> ImageSpec:
        """``image`` with what ``processor`` (built by :meth:`load_processor`) prepares images with: its
        backend and the family's limits, the values an adapter records."""
        return dataclasses.replace(image, processor_backend=processor.image_processor.backend)

    def configure(self, config, image: ImageSpec) -> None:
        """Set in the model's ``config`` what the model reads of ``image``'s limits (AnyRes tiling); none here."""

    def image_transform(self, image_processor, aspect: ImageAspect, backend: ImageBackend) -> ImageTransform:
        """How the data path turns a decoded RGB image into its :data:`ImageInputs`: mole's fast path
        where the family allows it and it is proven on probe images, else the image processor."""
        return FixedResolution(make_pixel_transform(image_processor, aspect, backend if self.fast_images else "processor"))

    def image_tokens(self, processor, image_size: tuple[int, int]) -> int:
        """How many image tokens an image of ``image_size`` (height, width) expands to."""
        return fixed_image_tokens(processor)

    def image_features_of(self, config, pixels: torch.Tensor, image_size: tuple[int, ...] | None) -> int:
        """How many image features the model makes of one image, its ``pixels`` and size input as the
        data path prepared them, by the model's own rule (its ``config``), not the processor's. The data
        path checks a sample's image-token count against it (:class:`mole.data.sample.SampleProcessor`):
        a processor whose settings disagree with the model's then skips the sample, rather than failing
        the batch in :meth:`embed` on one rank while the others wait in a collective. Pixels the model
        cannot take at all are a ``ValueError`` saying why.

        Here one tile at the vision tower's size, one feature per patch (and the CLS token with the
        ``full`` feature strategy)."""
        vision = config.vision_config
        if tuple(pixels.shape[-2:]) != (vision.image_size, vision.image_size):
            raise ValueError(f"pixels of {tuple(pixels.shape[-2:])} but the vision tower takes "
                             f"{vision.image_size}x{vision.image_size}")
        return (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")

    def tile_image_tokens(self, processor) -> int:
        """The image-token count of an image at the vision tower's own size (a tiling family's
        larger images take more): what every image takes at least, near enough, for length checks."""
        crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
        side = crop.get("height") or crop.get("shortest_edge")
        return self.image_tokens(processor, (side, side))


def check_backend(image_processor, image: ImageSpec | None) -> None:
    """A one-line ``ValueError`` when ``image`` records a processor backend other than the one built
    (transformers builds the PIL class, with a warning, when torchvision is asked for but missing)."""
    wanted = image.processor_backend if image is not None else None
    if wanted is not None and image_processor.backend != wanted:
        fix = "pip install torchvision" if wanted == "torchvision" else "use a transformers with PIL image processors"
        raise ValueError(f"images must go through the {wanted} image processor, but {type(image_processor).__name__} "
                         f"was built ({fix})")


def fixed_image_tokens(processor) -> int:
    """How many tokens one image expands to when the count is fixed, asked of the processor itself."""
    size = processor.image_processor.crop_size
    image = Image.new("RGB", (size["width"], size["height"]))
    ids = processor(text=processor.image_token, images=image, return_tensors="pt")["input_ids"][0]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((ids == image_token_id).sum())


class FixedResolution:
    """One tile per image, no size input: ``(pixels (3, H, W), None)``."""

    def __init__(self, pixels: PixelTransform):
        self.pixels = pixels

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int] | None]:
        return self.pixels(image), None


class ProcessorTiles:
    """The family's image processor on one image: ``(pixels (tiles, 3, H, W), (height, width))``, the
    size being the image's as the processor saw it (after padding to a square with ``aspect: pad``)."""

    def __init__(self, image_processor, aspect: ImageAspect):
        self.image_processor, self.aspect = image_processor, aspect
        self.fill = mean_colour(image_processor)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int] | None]:
        if self.aspect == "pad":
            image = pad_to_square(image, self.fill)
        out = self.image_processor(images=image, return_tensors="pt")
        height, width = (int(side) for side in out["image_sizes"][0])
        return out["pixel_values"][0], (height, width)


ImageTransform = FixedResolution | ProcessorTiles


class UnsupportedBackbone(ValueError):
    """A base model whose family mole has no description of."""


def varlen_kwargs(model: nn.Module, position_ids: torch.Tensor | None) -> dict:
    """Flash attention's varlen arguments for a packed batch's (batch, seq) text positions, restarting at
    0 per sample; nothing under another attention or for a padded batch.

    transformers reads sample boundaries from position ids itself only for a single row (its
    ``_is_packed_sequence`` wants batch size 1); on several rows it would run causal flash attention
    over each whole row, letting a row's samples attend to each other. So the boundaries are passed:
    transformers' own ``prepare_fa_kwargs_from_position_ids`` on the flattened rows (every row starts
    a sample at 0, so row ends are sample ends; a row's padding is one more segment), which the model
    hands through its keyword arguments to every decoder attention layer."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    from transformers.utils.generic import is_flash_attention_requested

    if position_ids is None or not is_flash_attention_requested(model.config.get_text_config()):
        return {}
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}


def backbone_for(config) -> Backbone:
    """The family description of a base, from its Hugging Face config (``model_type``), or a one-line
    :class:`UnsupportedBackbone` naming the supported families."""
    from mole.backbones import FAMILIES

    model_type = getattr(config, "model_type", None) if not isinstance(config, dict) else config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedBackbone(f"model_type {model_type!r} is not a supported backbone family; "
                                  f"supported: {', '.join(options(Family))}")
    return FAMILIES[model_type]
