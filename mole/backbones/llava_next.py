"""LLaVA-NeXT / 1.6 (``LlavaNextForConditionalGeneration``): AnyRes tiles.

An image is resized to the best of the ``image_grid_pinpoints`` resolutions, cut into tiles of the
vision tower's size plus one whole-image tile; the features of the tiles are unpadded back to the
image's aspect ratio with a learned ``image_newline`` after each row. So the model takes each image's
``image_sizes`` (height, width) beside ``pixel_values``, and the image-token count depends on them.
``image_newline`` is part of the projection and trains with the projector.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from mole.backbones.base import Backbone, ProcessorTiles
from mole.spec import ImageSpec


class AnyResBackbone(Backbone):
    """A family of tiles and ``image_sizes``: token counts asked of the processor per image size."""

    def dummy_image(self, config, dtype: torch.dtype, device: torch.device):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        side = config.vision_config.image_size
        tiles = image_size_to_num_patches((side, side), config.image_grid_pinpoints, side)
        return {"pixel_values": torch.zeros(tiles, config.vision_config.num_channels, side, side, dtype=dtype, device=device),
                "image_sizes": torch.tensor([[side, side]], device=device)}

    def load_processor(self, path: str, local_files_only: bool = True, image: ImageSpec | None = None):
        """The processor with ``image``'s grid pinpoints where it records them (see :meth:`Backbone.load_processor`)."""
        processor = super().load_processor(path, local_files_only, image)
        set_pinpoints(processor.image_processor, image)
        return processor

    def prepared_image(self, image: ImageSpec, processor) -> ImageSpec:
        return dataclasses.replace(super().prepared_image(image, processor),
                                   image_grid_pinpoints=processor.image_processor.image_grid_pinpoints)

    def configure(self, config, image: ImageSpec) -> None:
        """The model reads the pinpoints too (to split an image's tiles back into its grid) and, for
        OneVision, ``vision_aspect_ratio``: both must be what the processor used."""
        if image.image_grid_pinpoints is not None:
            config.image_grid_pinpoints = [list(point) for point in image.image_grid_pinpoints]
        if image.vision_aspect_ratio is not None:
            config.vision_aspect_ratio = image.vision_aspect_ratio

    def image_transform(self, image_processor, aspect, backend):
        return ProcessorTiles(image_processor, aspect)

    def image_tokens(self, processor, image_size: tuple[int, int]) -> int:
        return int(processor._get_num_multimodal_tokens(image_sizes=[list(image_size)]).num_image_tokens[0])

    def image_features_of(self, config, pixels: torch.Tensor, image_size: tuple[int, int]) -> int:
        """The tiles the model cuts ``pixels`` into for ``image_size`` (``image_size_to_num_patches``), then
        the count of the model's own ``pack_image_features`` (unpadding, AnyRes-max downscaling, a
        newline per row) run on features of width 1: the model's rule, read off its config alone."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vision = config.vision_config
        tiles = image_size_to_num_patches(image_size, config.image_grid_pinpoints, vision.image_size)
        if pixels.dim() != 4 or pixels.shape[0] != tiles or tuple(pixels.shape[-2:]) != (vision.image_size,) * 2:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)} but the model cuts an image of {tuple(image_size)} "
                             f"into {tiles} tiles of {vision.image_size}x{vision.image_size}")
        side = vision.image_size // vision.patch_size
        features = [torch.zeros(tiles, side * side, 1)]  # (tiles, patches per tile, width 1)
        _, lengths = self.pack_image_features(config, features, torch.tensor([list(image_size)]))
        return int(lengths[0])

    def pack_image_features(self, config, features: list[torch.Tensor], image_sizes: torch.Tensor):
        """The stock ``LlavaNextModel.pack_image_features`` (it reads only the model's ``config``)."""
        from transformers import LlavaNextModel

        return LlavaNextModel.pack_image_features(SimpleNamespace(config=config), features, image_sizes,
                                                  config.vision_feature_select_strategy, image_newline=torch.zeros(1))


def set_pinpoints(image_processor, image: ImageSpec | None) -> None:
    """``image``'s grid pinpoints, where it records them, as ``image_processor``'s."""
    if image is not None and image.image_grid_pinpoints is not None:
        image_processor.image_grid_pinpoints = [list(point) for point in image.image_grid_pinpoints]


LLAVA_NEXT = AnyResBackbone(
    family="llava_next",
    model_class_name="LlavaNextForConditionalGeneration",
    projector_prefixes=("multi_modal_projector", "image_newline"),
    extra_image_inputs=("image_sizes",),
    fast_images=False,
)
