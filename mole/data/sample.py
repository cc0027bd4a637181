"""One raw tar sample (member name -> bytes) -> one :class:`Example`, or ``BadSample``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from mole.backbones.base import Backbone, fixed_image_tokens
from mole.backbones.llava import LLAVA
from mole.data.conversation import Turn, parse_conversation, tokenize_conversation
from mole.data.errors import BadSample
from mole.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, decode_image


@dataclass(frozen=True)
class Example:
    """One usable sample, tokenised: what :func:`mole.data.collate.collate` batches.

    Built whole by :class:`SampleProcessor` and never changed after. ``turns`` and ``image`` are the
    parsed conversation and the decoded image, for whoever needs more than the tokens (evaluation asks
    each answer as a question); ``image`` is kept only when the processor is asked to keep it, since a
    decoded photo can be far larger than its pixels at model resolution.
    """

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # (3, H, W), (tiles, 3, H, W) tiling, (patches, patch_dim) Qwen-VL, None: text only
    key: str  # the sample's tar key
    domain: int  # index of its domain, for per-domain metrics and routing
    turns: list[Turn]
    image: Image.Image | None = None
    image_size: tuple[int, ...] | None = None  # (height, width) for a family that takes ``image_sizes``; Qwen-VL: grid (t, h, w)


class SampleProcessor:
    """Validate, decode and tokenise samples with the model's own processor.

    ``image_backend``: ``fast`` (default) or ``processor``; see :mod:`mole.data.images`. An image
    member without an ``<image>`` in the text is placed at the start of the first user turn.
    ``keep_image``: keep the decoded image in each :class:`Example` (evaluation builds prompts from it).
    ``backbone``: the model's family (:func:`mole.backbones.backbone_for`), which says how an image
    becomes pixels and how many tokens it takes; LLaVA-1.5 when not given. ``num_image_tokens`` is
    the count of an image at the vision tower's own size (a tiling family's images may take more).
    ``model_config``: the model's config; given, an image whose token count (the processor's rule)
    differs from the features the model will make of it (the model's rule,
    :meth:`~mole.backbones.base.Backbone.image_features_of`) is a ``BadSample("image_features")``, not
    a failed batch on one rank.
    """

    def __init__(self, processor, max_length: int, image_aspect: str, *, image_backend: str = "fast",
                 max_image_pixels: int = MAX_PIXELS, keep_image: bool = False, backbone: Backbone = LLAVA,
                 model_config=None):
        self.processor, self.backbone, self.tokenizer = processor, backbone, processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.num_image_tokens = backbone.tile_image_tokens(processor)
        self.images = backbone.image_transform(processor.image_processor, image_aspect, image_backend)
        self.max_length, self.max_image_pixels = max_length, max_image_pixels
        self.padded, self.keep_image = image_aspect == "pad", keep_image
        self.model_config = model_config

    def __call__(self, raw: dict | BadSample, domain: int = 0) -> Example:
        """The example of ``raw``, a sample of domain number ``domain`` as :func:`~mole.data.shards.read_shard`
        yields it.

        Every failure is raised as a ``BadSample``, the shard reader's (``raw`` itself) included, so a
        caller catches bad samples in one place. Its message starts with the sample's shard and key, so a
        skip can be traced to its data; an error no check foresaw (data are endlessly inventive) is
        one too, ``processing_error``, rather than the end of a run.
        """
        if isinstance(raw, BadSample):
            raise raw  # already names its shard and sample
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            return self._process(raw, domain)
        except BadSample as bad:
            raise BadSample(bad.reason, f"{where}: {bad.detail}") from None
        except MemoryError:
            raise
        except Exception as err:
            raise BadSample("processing_error", f"{where}: {type(err).__name__}: {err}") from err

    def _process(self, raw: dict, domain: int) -> Example:
        if "json" not in raw:
            raise BadSample("no_conversations", "no .json member")
        turns, has_placeholder = parse_conversation(raw["json"])
        image_members = [ext for ext in IMAGE_EXTENSIONS if ext in raw]
        if len(image_members) > 1:
            raise BadSample("image_placeholder", f"{len(image_members)} image members ({', '.join(image_members)}); a sample has one image")
        if has_placeholder and not image_members:
            raise BadSample("image_missing", "<image> in the text but no image member")
        if image_members and not any(turn.role == "user" for turn in turns):
            raise BadSample("image_placeholder", "an image but no user turn to show it in")
        image = pixels = image_size = None
        num_image_tokens = 0
        if image_members:
            image = decode_image(raw[image_members[0]], self.max_image_pixels, square=self.padded)
            pixels, image_size = self.images(image)
            num_image_tokens = self.num_image_tokens if image_size is None else self.backbone.image_tokens(
                self.processor, image_size)
            if self.model_config is not None:
                self._check_image_features(pixels, image_size, num_image_tokens)
        ids, labels = tokenize_conversation(
            turns, pixels is not None, self.tokenizer, self.image_token_id, num_image_tokens, self.max_length
        )
        return Example(ids, labels, pixels, raw.get("__key__", ""), domain, turns, image if self.keep_image else None,
                       image_size)

    def _check_image_features(self, pixels: torch.Tensor, image_size: tuple[int, ...] | None, tokens: int) -> None:
        try:
            features = self.backbone.image_features_of(self.model_config, pixels, image_size)
        except (ValueError, RuntimeError) as err:  # RuntimeError: the model's own rule failed on these pixels
            raise BadSample("image_features", str(err)) from None
        if features != tokens:
            size = "" if image_size is None else f" (size input {tuple(image_size)})"
            raise BadSample("image_features", f"the processor expands the image{size} to {tokens} image tokens but "
                            f"the model makes {features} image features of it: processor and model settings disagree")


def count_image_tokens(processor) -> int:
    """How many tokens one image expands to in a fixed-resolution family, asked of the processor itself
    (16 tiny, 576 LLaVA-1.5)."""
    return fixed_image_tokens(processor)
