"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP (no CLS, ``full`` features),
AnyRes tiles with ``image_sizes`` as LLaVA-NeXT, but *AnyRes-max*: a grid of more than
``anyres_max_N`` tiles' worth of features is downscaled, so the token count saturates; a Qwen2 LLM
with the ChatML template.

transformers builds OneVision's combined processor only beside its video processor, which needs
torchvision; mole needs neither videos nor torchvision, so :class:`OnevisionProcessing` is the
combined processor's image-and-text half: the family's image processor (the PIL backend without
torchvision), the tokenizer, and the image-token count by the processor's own code.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from PIL import Image

from mole.backbones.base import check_backend
from mole.backbones.llava_next import AnyResBackbone, set_pinpoints
from mole.spec import ImageSpec


class OnevisionProcessing:
    """``LlavaOnevisionProcessor`` for single images and text: ``tokenizer``, ``image_processor``,
    ``image_token``, and ``processor(text=..., images=...)`` giving what the stock processor gives
    (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_sizes``, ``batch_num_images``).

    The settings the count needs come from the model's config, which decides the features: tokens per
    tile (``(image_size / patch_size)**2``), ``vision_aspect_ratio``, ``vision_feature_select_strategy``.
    """

    def __init__(self, image_processor, tokenizer, config, image_token: str = "<image>"):
        from transformers import LlavaOnevisionProcessor

        self.image_processor, self.tokenizer, self.image_token = image_processor, tokenizer, image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        vision = config.vision_config
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        self.vision_aspect_ratio = config.vision_aspect_ratio
        self.vision_feature_select_strategy = config.vision_feature_select_strategy
        self._counts = LlavaOnevisionProcessor  # its counting methods read only the attributes above

    def image_tokens(self, height: int, width: int) -> int:
        """Tokens of one image of (``height``, ``width``) as the processor saw it."""
        side = self.image_processor.size["height"]
        count = self._counts._get_number_of_features(self, height, width, side, side)
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def _get_unpadded_features(self, *args):
        return self._counts._get_unpadded_features(self, *args)

    def __call__(self, text: str | list[str], images: Image.Image | list[Image.Image] | None = None,
                 padding: bool = False, return_tensors: str = "pt", **kwargs) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        out = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors=return_tensors)
            out.update(pixels)
            sizes = iter(pixels["image_sizes"].tolist())
            expanded = []
            for piece in texts:
                parts = piece.split(self.image_token)
                counts = [self.image_tokens(*next(sizes)) for _ in parts[1:]]
                expanded.append(parts[0] + "".join(self.image_token * n + part for n, part in zip(counts, parts[1:])))
            texts = expanded
        out.update(self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kwargs))
        return out

    def save_pretrained(self, path: str) -> None:
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class OnevisionBackbone(AnyResBackbone):
    def load_processor(self, path: str, local_files_only: bool = True, image: ImageSpec | None = None):
        """The image-and-text processor with ``image``'s backend, grid pinpoints and ``vision_aspect_ratio``
        where it records them, else the model directory's."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        kwargs = {"local_files_only": local_files_only}
        image_processor = AutoImageProcessor.from_pretrained(path, **kwargs, **self.backend_kwargs(image))
        check_backend(image_processor, image)
        set_pinpoints(image_processor, image)
        processing = OnevisionProcessing(image_processor, AutoTokenizer.from_pretrained(path, **kwargs),
                                         AutoConfig.from_pretrained(path, **kwargs))
        if image is not None and image.vision_aspect_ratio is not None:
            processing.vision_aspect_ratio = image.vision_aspect_ratio
        return processing

    def prepared_image(self, image: ImageSpec, processor) -> ImageSpec:
        return dataclasses.replace(super().prepared_image(image, processor),
                                   vision_aspect_ratio=processor.vision_aspect_ratio)

    def image_tokens(self, processor, image_size: tuple[int, int]) -> int:
        return processor.image_tokens(*image_size)

    def tile_image_tokens(self, processor) -> int:
        side = processor.image_processor.size["height"]
        return self.image_tokens(processor, (side, side))

    def pack_image_features(self, config, features, image_sizes):
        """The stock ``LlavaOnevisionModel.pack_image_features`` (it reads only the model's ``config``)."""
        from transformers import LlavaOnevisionModel

        return LlavaOnevisionModel.pack_image_features(SimpleNamespace(config=config), features, image_sizes,
                                                       image_newline=torch.zeros(1),
                                                       vision_aspect_ratio=config.vision_aspect_ratio)


LLAVA_ONEVISION = OnevisionBackbone(
    family="llava_onevision",
    model_class_name="LlavaOnevisionForConditionalGeneration",
    projector_prefixes=("multi_modal_projector", "image_newline"),
    extra_image_inputs=("image_sizes",),
    fast_images=False,
)
