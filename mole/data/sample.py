"""One raw tar sample (member name -> bytes) -> one training example, or ``BadSample``."""

from __future__ import annotations

from PIL import Image

from mole.data.conversation import parse_conversation, tokenize_conversation
from mole.data.errors import BadSample
from mole.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, make_pixel_transform


class SampleProcessor:
    """Validate, decode and tokenise samples with the model's own processor.

    ``image_backend``: ``fast`` (default) or ``processor``; see :mod:`mole.data.images`. An image
    member without an ``<image>`` in the text is placed at the start of the first user turn.
    """

    def __init__(self, processor, max_length: int, image_aspect: str, *, image_backend: str = "fast",
                 max_image_pixels: int = MAX_PIXELS):
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.num_image_tokens = count_image_tokens(processor)
        self.pixels = make_pixel_transform(processor.image_processor, image_aspect, image_backend)
        self.max_length, self.max_image_pixels = max_length, max_image_pixels
        self.padded = image_aspect == "pad"

    def __call__(self, raw: dict) -> dict:
        """``{"input_ids", "labels", "pixel_values" (3, H, W) or None, "key"}``.

        Every failure is a ``BadSample`` whose message starts with the sample's shard and key, so a
        skip can be traced to its data; an error no check foresaw (data are endlessly inventive) is
        one too, ``processing_error``, rather than the end of a run.
        """
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            return self._process(raw)
        except BadSample as bad:
            raise BadSample(bad.reason, f"{where}: {bad.detail}") from None
        except MemoryError:
            raise
        except Exception as err:
            raise BadSample("processing_error", f"{where}: {type(err).__name__}: {err}") from err

    def _process(self, raw: dict) -> dict:
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
        pixels = None
        if image_members:
            image = decode_image(raw[image_members[0]], self.max_image_pixels, square=self.padded)
            pixels = self.pixels(image)
        ids, labels = tokenize_conversation(
            turns, pixels is not None, self.tokenizer, self.image_token_id, self.num_image_tokens, self.max_length
        )
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "key": raw.get("__key__", "")}


def count_image_tokens(processor) -> int:
    """How many tokens one image expands to, asked of the processor itself (16 tiny, 576 LLaVA-1.5)."""
    size = processor.image_processor.crop_size
    image = Image.new("RGB", (size["width"], size["height"]))
    ids = processor(text=processor.image_token, images=image, return_tensors="pt")["input_ids"][0]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((ids == image_token_id).sum())
