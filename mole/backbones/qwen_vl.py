"""Qwen2.5-VL and Qwen3-VL through their stock classes: dynamic resolution, M-RoPE and (Qwen3-VL) DeepStack.

What sets these families apart, and how mole keeps each exact:

- **Dynamic resolution.** The image processor resizes an image to a multiple of ``patch x merge``
  pixels between ``min_pixels`` and ``max_pixels`` (aspect ratio kept) and returns its patches
  flattened, ``pixel_values`` (patches, channels x temporal_patch x patch x patch), and its grid
  ``image_grid_thw`` (3,). An image takes ``t * h * w / merge^2`` image tokens, so images of
  different sizes take different numbers of tokens. A batch concatenates its images' patches and
  stacks their grids.
- **M-RoPE.** Position ids are (3, batch, seq): text tokens count on all three rows, an image's tokens
  take their (t, h, w) grid coordinates. The model computes them itself (``get_rope_index``) only
  when it is given ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw``; fed ``inputs_embeds``
  alone it silently numbers every token 0, 1, 2, ... (or, after a generation, reuses that
  generation's offsets). So :func:`forward` never hands the model embeddings: it runs the vision
  tower itself and passes the result as ``mm_encoder_outputs`` beside the token ids, and the stock
  forward embeds, scatters, adds DeepStack features and numbers positions exactly as it would from
  its own processor's inputs. Held-out generation during training starts ``generate`` the same way
  (:meth:`QwenVLBackbone.prefill_inputs`): the stock ``generate`` hands the encoder output to the
  prefill forward only and numbers the new tokens' positions from the prompt's. A packed batch is the exception: the model would number a row as one
  sequence, so :meth:`QwenVLBackbone.packed_positions` numbers each sample with the model's own
  ``get_rope_index`` and hands the stock forward (4, batch, seq) position ids, the text row first.
- **DeepStack (Qwen3-VL).** Features of several ViT blocks, each through its own merger, are added
  into the hidden states of the first LLM layers at the image positions; they travel in the same
  encoder output.

A text-only batch still runs the whole vision path (blocks, merger, DeepStack mergers) on a minimal
dummy image on every rank, as ZeRO-3 requires; its features join the graph multiplied by zero and cut
to no rows, so the stock forward scatters nothing and numbers the text 0, 1, 2, ... as it would.

The combined processor classes (``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) need torchvision for
their video processor; mole reads the tokenizer and the PIL image processor
(``Qwen2VLImageProcessorPil``) directly and expands ``<|image_pad|>`` as the processor would. Image
aspect ``crop`` hands the processor the image as it is (it never crops: dynamic resolution keeps the
aspect ratio), which is the family's own path; ``pad`` pads to a square with the mean colour first.

In mole's batches an image's size input travels as ``image_sizes``; for these families it is the
image's patch grid (t, h, w), handed to the model as ``image_grid_thw``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from mole.backbones.base import Backbone, ImageInputs, check_backend, varlen_kwargs
from mole.data.images import mean_colour, pad_to_square
from mole.spec import ImageSpec

IMAGE_TOKEN = "<|image_pad|>"
IMAGE_TYPE = 1
"""``mm_token_type_ids`` value of an image token (text 0, video 2)."""


@dataclass(frozen=True)
class QwenProcessor:
    """What the data path reads of a processor: ``tokenizer``, ``image_processor``, ``image_token``."""

    tokenizer: object
    image_processor: object
    image_token: str = IMAGE_TOKEN

    def save_pretrained(self, path: str) -> None:
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class QwenImages:
    """One decoded RGB image -> ``(pixel_values (patches, patch_dim), grid (t, h, w))`` by the family's
    image processor, padded to a square with its mean colour first for ``aspect: pad``."""

    def __init__(self, image_processor, aspect: str):
        self.image_processor, self.aspect = image_processor, aspect
        self.fill = mean_colour(image_processor)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if self.aspect == "pad":
            image = pad_to_square(image, self.fill)
        out = self.image_processor(images=image, return_tensors="pt")
        return out["pixel_values"], tuple(int(side) for side in out["image_grid_thw"][0])


class QwenVLBackbone(Backbone):
    """Qwen2.5-VL / Qwen3-VL: dynamic resolution, M-RoPE, (Qwen3-VL) DeepStack; see the module docstring."""

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """The merged features (image tokens, hidden); :meth:`forward` also passes on the DeepStack ones."""
        out = model.model.get_image_features(pixel_values, extra["image_sizes"], return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def dummy_image(self, config, dtype: torch.dtype, device: torch.device) -> ImageInputs:
        """One ``merge x merge`` patch grid of zeros (one image token): the smallest image the vision path takes."""
        vision = config.vision_config
        merge = vision.spatial_merge_size
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {"pixel_values": torch.zeros(merge * merge, patch_dim, dtype=dtype, device=device),
                "image_sizes": torch.tensor([[1, merge, merge]], device=device)}

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                images: ImageInputs | None, position_ids: torch.Tensor | None = None):
        """The stock forward on token ids, ``mm_token_type_ids`` and ``image_grid_thw`` (so the model
        numbers its own M-RoPE positions) with the vision path's output passed in as
        ``mm_encoder_outputs`` (so it scatters the features and adds the DeepStack ones itself).

        ``images``: ``pixel_values`` (patches, patch_dim) and ``image_sizes`` (images, 3), the grids,
        in image-token order; ``None`` for a text-only batch, whose dummy image's features (and DeepStack
        features) join the graph times zero and cut to no rows, so the model scatters nothing. A packed
        batch's ``position_ids`` (batch, seq), restarting per sample, become :meth:`packed_positions`.
        """
        hook = None
        if torch.is_grad_enabled():  # see Backbone.embed: the first MoLE MLP's input must carry a gradient
            hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        encoded, grids = self.encode_images(model, images, input_ids.device)
        token_types = self.token_types(model, input_ids)
        varlen = varlen_kwargs(model, position_ids)  # from the text positions, before M-RoPE's rows join them
        if position_ids is not None:
            position_ids = self.packed_positions(model, input_ids, token_types, grids, position_ids)
        try:
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                mm_token_type_ids=token_types,
                image_grid_thw=grids,
                mm_encoder_outputs={"image": encoded},
                use_cache=False,
                **varlen,
            )
        finally:
            if hook is not None:
                hook.remove()

    def encode_images(self, model: nn.Module, images: ImageInputs | None, device: torch.device):
        """The vision path's output as the stock forward takes it (``mm_encoder_outputs["image"]``) and the
        grids it goes with, ``image_sizes`` (images, 3). ``images`` ``None`` (a text-only batch) runs it on
        the :meth:`dummy_image` and returns its features (and DeepStack features) times zero, cut to no
        rows, and no grids: the model scatters nothing and numbers the text 0, 1, 2, ..."""
        text_only = images is None
        if text_only:
            images = self.dummy_image(model.config, model.dtype, device)
        encoded = model.model.get_image_features(images["pixel_values"], images["image_sizes"], return_dict=True)
        if text_only:
            encoded.pooler_output = (_no_rows(encoded.pooler_output),)
            if getattr(encoded, "deepstack_features", None) is not None:
                encoded.deepstack_features = [(_no_rows(level),) for level in encoded.deepstack_features]
        return encoded, None if text_only else images["image_sizes"]

    @staticmethod
    def token_types(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """``mm_token_type_ids`` of a batch: image tokens :data:`IMAGE_TYPE`, the rest text (0)."""
        return (input_ids == model.config.image_token_id).int() * IMAGE_TYPE

    def packed_positions(self, model: nn.Module, input_ids: torch.Tensor, token_types: torch.Tensor,
                         grids: torch.Tensor | None, text_positions: torch.Tensor) -> torch.Tensor:
        """A packed batch's position ids as the stock model takes them, (4, batch, seq): the text
        positions first (0, 1, 2, ... restarting per sample: the model keeps the samples apart by them),
        then the three M-RoPE rows of each sample numbered by the model's own rule on that sample alone
        (``get_rope_index`` on its tokens and its images' grids, ``grids`` (images, 3) in token order).

        A sample starts where ``text_positions`` is 0; the row's padding is one more such stretch of
        text.
        """
        rope = torch.zeros(3, *token_types.shape, dtype=torch.long, device=token_types.device)
        image = 0
        for row in range(token_types.shape[0]):
            starts = (text_positions[row] == 0).nonzero().flatten().tolist() + [token_types.shape[1]]
            for start, end in zip(starts, starts[1:]):
                types = token_types[row : row + 1, start:end]  # (1, sample length)
                is_image = types[0] == IMAGE_TYPE
                images = int(is_image[0]) + int((is_image[1:] & ~is_image[:-1]).sum())  # runs of image tokens
                sample_grids = grids[image : image + images] if images else None
                positions, _ = model.model.get_rope_index(input_ids[row : row + 1, start:end], types,
                                                          image_grid_thw=sample_grids)
                rope[:, row, start:end] = positions[:, 0]
                image += images
        return torch.cat([text_positions[None].to(rope), rope])

    def embed(self, model: nn.Module, input_ids: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
        """Refused: the stock model numbers M-RoPE positions from token ids, not from embeddings
        (:meth:`prefill_inputs` is how generation starts with the vision path always run)."""
        raise ValueError(f"{self.family}: the model numbers its M-RoPE positions from token ids, so it cannot "
                         "start from input embeddings")

    def prefill_inputs(self, model: nn.Module, input_ids: torch.Tensor, images: ImageInputs | None) -> dict:
        """The token ids, ``mm_token_type_ids`` and ``image_grid_thw``, from which the model numbers its
        M-RoPE positions as in :meth:`generation_inputs`, with the vision path's output as
        ``mm_encoder_outputs`` (:meth:`encode_images`: run on the dummy image for a text-only batch), which
        ``generate`` hands to the prefill forward only. ``generate`` returns prompt and new tokens."""
        encoded, grids = self.encode_images(model, images, input_ids.device)
        return {"input_ids": input_ids, "mm_token_type_ids": self.token_types(model, input_ids),
                "image_grid_thw": grids, "mm_encoder_outputs": {"image": encoded}}

    def generation_inputs(self, model: nn.Module, input_ids: torch.Tensor, images: ImageInputs | None) -> dict:
        """The processor's inputs for ``generate``: it numbers M-RoPE positions from ``mm_token_type_ids``
        and ``image_grid_thw`` (left padding is masked out of them)."""
        if images is None:
            return {}
        return {"pixel_values": images["pixel_values"].to(model.dtype), "image_grid_thw": images["image_sizes"],
                "mm_token_type_ids": self.token_types(model, input_ids)}

    def load_processor(self, path: str, local_files_only: bool = True, image: ImageSpec | None = None) -> QwenProcessor:
        """The tokenizer and image processor (PIL unless ``image`` records torchvision) of a model
        directory; ``image``'s ``min_pixels`` / ``max_pixels`` replace the directory's (the family's
        defaults) where it records them."""
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=local_files_only,
                                                             **self.backend_kwargs(image))
        check_backend(image_processor, image)
        size = dict(image_processor.size)
        if image is not None and image.min_pixels is not None:
            size["shortest_edge"] = image.min_pixels
        if image is not None and image.max_pixels is not None:
            size["longest_edge"] = image.max_pixels
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}")
        image_processor.size = size
        return QwenProcessor(tokenizer, image_processor)

    def prepared_image(self, image: ImageSpec, processor) -> ImageSpec:
        size = processor.image_processor.size
        return dataclasses.replace(super().prepared_image(image, processor), min_pixels=size["shortest_edge"],
                                   max_pixels=size["longest_edge"])

    def image_transform(self, image_processor, aspect, backend) -> QwenImages:
        return QwenImages(image_processor, aspect)

    def image_features_of(self, config, pixels: torch.Tensor, image_size: tuple[int, int, int]) -> int:
        """One feature per ``merge x merge`` patches of the grid (t, h, w), ``spatial_merge_size`` of the
        model's vision config; the pixels must be the grid's patches, each of the model's patch size."""
        vision = config.vision_config
        t, h, w = image_size
        merge = vision.spatial_merge_size
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        if tuple(pixels.shape) != (t * h * w, patch_dim) or h % merge or w % merge:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)} but the model takes a grid of {t}x{h}x{w} as "
                             f"{t * h * w} patches of {patch_dim} values, h and w multiples of {merge}")
        return t * h * w // merge**2

    def image_tokens(self, processor, image_size: tuple[int, ...]) -> int:
        """Image tokens of an image: of its grid (t, h, w) as :class:`QwenImages` gives it, one per
        ``merge x merge`` patches; of a (height, width) in pixels, after the processor's resize."""
        image_processor = processor.image_processor
        if len(image_size) == 2:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

            factor = image_processor.patch_size * image_processor.merge_size
            height, width = smart_resize(*image_size, factor=factor, min_pixels=image_processor.size["shortest_edge"],
                                         max_pixels=image_processor.size["longest_edge"])
            image_size = (1, height // image_processor.patch_size, width // image_processor.patch_size)
        t, h, w = image_size
        return t * h * w // image_processor.merge_size**2

    def tile_image_tokens(self, processor) -> int:
        """The fewest image tokens an image takes: ``min_pixels`` is an area, not a side, so this is the
        count of the smallest image (one ``patch x merge`` square), which the processor's own
        ``smart_resize`` scales up to at least ``min_pixels``."""
        image_processor = processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        return self.image_tokens(processor, (factor, factor))


def _no_rows(features: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-image features as no rows at all, still computed from them: (0, hidden), zero gradient back."""
    return (torch.cat(features) * 0.0)[:0]
