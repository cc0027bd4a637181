"""Ragged instruction samples shaped like LLaVA-1.5's ``llava_v1_5_mix665k`` (generated, nothing downloaded),
and the batches each ``data.packing`` mode makes of them (``python -m benchmarks step --packing ...``).

The mix's shape, at LLaVA-1.5's scale (576 image tokens, 2,048-token budget): about 94 % of samples
carry an image, and their text is short to medium (VQA, captioning and grounding turns merged into
multi-turn conversations, a long tail of LLaVA-Instruct conversations), lognormal around 150 text
tokens; about 6 % are text-only ShareGPT conversations, lognormal around 600 tokens up to the budget.
The lengths are then scaled to the bench's budget (``max_length / 2048``) with the model's own
image-token count, so that a smaller model sees the same proportions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from mole.data.collate import collate
from mole.data.packing import collate_packed, consecutive_batches, grouped_batches, packed_batches
from mole.data.sample import Example

FULL_BUDGET, FULL_IMAGE_TOKENS = 2048, 576
IMAGE_SHARE = 0.94


def llava665k_lengths(n: int, rng: random.Random) -> list[tuple[int, bool]]:
    """``n`` (text tokens, has an image) pairs at LLaVA-1.5's scale; image + text never exceeds 2,048."""
    samples = []
    for _ in range(n):
        if rng.random() < IMAGE_SHARE:
            text = int(math.exp(rng.gauss(math.log(150), 0.9)))
            samples.append((max(8, min(text, FULL_BUDGET - FULL_IMAGE_TOKENS)), True))
        else:
            text = int(math.exp(rng.gauss(math.log(600), 0.8)))
            samples.append((max(32, min(text, FULL_BUDGET)), False))
    return samples


ImageMaker = Callable[[torch.Generator], tuple[torch.Tensor, "tuple[int, ...] | None"]]
"""One sample's image inputs as the family's data path makes them: ``Example.pixel_values`` and ``image_size``."""


def ragged_examples(n: int, seed: int, max_length: int, image_tokens: int, image: ImageMaker, vocab: int,
                    image_token_id: int) -> list[Example]:
    """``n`` examples: lengths from :func:`llava665k_lengths` scaled to ``max_length``, random tokens, the
    ``image_tokens`` image tokens first (their pixels from ``image``), loss on the text's second half
    (the answers)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scale = max_length / FULL_BUDGET
    examples = []
    for index, (text, has_image) in enumerate(llava665k_lengths(n, rng)):
        text = max(4, min(int(text * scale), max_length - (image_tokens + 1 if has_image else 1)))
        ids = [1] + [image_token_id] * (image_tokens if has_image else 0) + torch.randint(3, vocab - 2, (text,), generator=gen).tolist()
        labels = [-100] * (len(ids) - text // 2) + ids[len(ids) - text // 2 :]
        pixels, size = image(gen) if has_image else (None, None)
        examples.append(Example(input_ids=ids, labels=labels, pixel_values=pixels, key=str(index), domain=0, turns=[],
                                image_size=size))
    return examples


def mode_batches(examples: list[Example], mode: str, rows: int, max_length: int, buffer: int, pad: int,
                 count: int, seed: int) -> list[dict]:
    """``count`` collated micro-batches of ``examples`` (cycled) as ``data.packing=mode`` makes them:
    ``rows`` samples padded (``none``, ``grouped``) or ``rows`` packed rows of ``max_length`` tokens."""
    def endless():
        while True:
            yield from examples

    stream = endless()
    if mode == "packed":
        made = packed_batches(stream, rows, max_length, buffer)
        return [collate_packed(next(made), pad) for _ in range(count)]
    made = grouped_batches(stream, rows, buffer, random.Random(seed)) if mode == "grouped" else consecutive_batches(stream, rows)
    return [collate(next(made), pad) for _ in range(count)]
