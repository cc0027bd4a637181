"""Write tiny *random* checkpoints of the other backbone families to ``models/tiny-<family>/``, shaped
like their real checkpoints (the stock Hugging Face class, processor files and chat template) with
every size shrunk, for CPU tests and smoke runs.

- ``llava_next``: like ``llava-hf/llava-v1.6-vicuna-7b-hf`` (CLIP ViT with AnyRes tiles, a 2-layer GELU
  projector, ``image_newline``, a Llama LLM, the Vicuna chat template): 28 px tiles of 14 px patches,
  grid pinpoints up to 56x56, so an image takes 4 base tokens plus up to 20 AnyRes tokens.

- ``llava_onevision``: like ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` (SigLIP, no CLS, last layer,
  ``full`` features; AnyRes-max; a Qwen2 LLM; the ChatML template with ``<|im_end|>`` as EOS): 28 px
  tiles of 14 px patches, grid pinpoints up to 56x56 and ``anyres_max_1``, so the largest grids are
  downscaled as the real model's beyond 9 tiles are. torchvision is not needed, so no combined
  processor is written (transformers builds OneVision's only with its video processor): the image
  processor's and the tokenizer's files, as the real checkpoint has them too.

The tokenizer is the one :mod:`tools.make_tiny_llava` trains on the bundled conversations (the
Vicuna-templated families share LLaVA's special tokens; OneVision's adds ChatML's). Everything is
seeded, so re-running gives the same files. From the repository root::

    python -m tools.make_synthetic_data && python -m tools.make_tiny_backbones llava_next
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from tools.make_tiny_llava import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer, data_corpus

TILE, PATCH = 28, 14
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]


def _special(tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _llama(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=1024, tie_word_embeddings=False, **_special(tokenizer))


def build_llava_next(tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """(model, processor) of a random LLaVA-NeXT: CLIP 28 px tiles -> GELU MLP -> Llama, AnyRes up to 56x56."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH, projection_dim=32, hidden_act="quick_gelu")
    config = LlavaNextConfig(
        vision_config=vision, text_config=_llama(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=PINPOINTS, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(TILE // PATCH) ** 2, **_special(tokenizer),
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**_special(tokenizer), max_new_tokens=16)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


# After llava-hf/llava-onevision-qwen2-7b-ov-hf's chat template (ChatML, images first in a turn).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% for content in message['content'] "
    "| selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] "
    "| selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>", "<video>"]


def onevision_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The bundled tokenizer with ChatML's special tokens, ``<|im_end|>`` as EOS and OneVision's template."""
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    return tokenizer


def build_llava_onevision(tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """(model, image processor, tokenizer) of a random LLaVA-OneVision: SigLIP 28 px tiles -> GELU MLP -> Qwen2."""
    tokenizer = onevision_tokenizer(tokenizer)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH)
    special = _special(tokenizer)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, **special)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_1", vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", **special,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**special, max_new_tokens=16)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_convert_rgb=True,
    )
    return model, image_processor, tokenizer


BUILDERS = {"llava_next": build_llava_next, "llava_onevision": build_llava_onevision}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_tiny_backbones", description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(BUILDERS))
    parser.add_argument("--out", type=Path, help="default: models/tiny-<family with dashes>")
    parser.add_argument("--shards", type=Path, default=Path("data_shards"), help="tokenizer training text")
    args = parser.parse_args()

    out = args.out or Path("models") / f"tiny-{args.family.replace('_', '-')}"
    model, *processing = BUILDERS[args.family](build_tokenizer(data_corpus(args.shards)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for part in processing:  # a processor (also writes the tokenizer files and chat template), or its parts
        part.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/: {params:,} params, vocab {model.config.text_config.vocab_size}")


if __name__ == "__main__":
    main()
