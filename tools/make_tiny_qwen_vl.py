"""Write tiny *random* Qwen2.5-VL- and Qwen3-VL-shaped checkpoints to ``models/tiny-qwen2-5-vl/`` and
``models/tiny-qwen3-vl/`` for CPU tests and smoke runs.

Each directory loads like ``Qwen/Qwen2.5-VL-7B-Instruct`` / ``Qwen/Qwen3-VL-8B-Instruct``:
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``, ``AutoTokenizer`` and
``AutoImageProcessor`` (the PIL backend, ``Qwen2VLImageProcessorPil``) ``.from_pretrained(dir)``, with
the family's chat template and special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
``<|image_pad|>``, ``<|vision_end|>``, ...), dynamic resolution (``image_grid_thw``), M-RoPE sections,
Qwen2.5-VL's window attention (windows of 2x2 merged patches, the last block global) and Qwen3-VL's
DeepStack mergers (features of both ViT blocks added into the first two LLM layers). Only the sizes
are shrunk: hidden 64, 2 LLM layers, ~600-token vocab, and ``min_pixels``/``max_pixels`` such that an
image becomes 4 to 16 image tokens, so each checkpoint is well under 1 MB.

The byte-level BPE tokenizer is trained like the tiny LLaVA's (:func:`tools.make_tiny_llava.data_corpus`)
with Qwen's pre-tokenizer split, so run the data generator first (from the repository root)::

    python -m tools.make_synthetic_data && python -m tools.make_tiny_qwen_vl

Everything is seeded, so re-running gives byte-identical files. ``build_tokenizer`` /
``build_image_processor`` / ``build_model`` take the family so tests can build variants in memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tools.make_tiny_llava import data_corpus

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
OUT = {family: Path(f"models/tiny-{family.replace('_', '-')}") for family in FAMILIES}

# Verbatim from Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen/Qwen3-VL-8B-Instruct's chat template without its tool-calling branches: no default system
# prompt, user images as <|vision_start|><|image_pad|><|vision_end|>, the same turn markers.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content_item in message.content %}"
    "{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- elif message.role == 'system' and not loop.first %}"
    "{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_TEMPLATES = {"qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen's control tokens in Qwen's order (151643, 151644, ... in the real vocabulary), appended after the BPE vocab."""
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's tokenizer.json split pattern (single digits, words with one leading non-letter)."""

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_STATS = {"qwen2_5_vl": (CLIP_MEAN, CLIP_STD), "qwen3_vl": ([0.5] * 3, [0.5] * 3)}
PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}
MERGE_SIZE = 2


def build_tokenizer(corpus: Iterable[str], family: str, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's split pattern and control tokens; no BOS, EOS ``<|im_end|>``, pad
    ``<|endoftext|>``, as the Instruct checkpoints' tokenizer_config.json has them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template_text = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "\n"]
    tok.train_from_iterator([*template_text, *corpus], trainer=trainer)
    tok.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATES[family],
        model_max_length=32768,
    )


def build_image_processor(family: str, min_tokens: int = 4, max_tokens: int = 16) -> Qwen2VLImageProcessorPil:
    """The family's image processor with ``min_pixels``/``max_pixels`` giving ``min_tokens`` to
    ``max_tokens`` image tokens per image (one token per ``merge x merge`` patches)."""
    mean, std = IMAGE_STATS[family]
    token_pixels = (PATCH_SIZE[family] * MERGE_SIZE) ** 2
    return Qwen2VLImageProcessorPil(
        min_pixels=min_tokens * token_pixels,
        max_pixels=max_tokens * token_pixels,
        patch_size=PATCH_SIZE[family],
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
        image_mean=mean,
        image_std=std,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, family: str, *, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of ``family`` at the given sizes (head dim 16, M-RoPE sections 16/2
    split as the real models split 128/2)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    special = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    head_dim = hidden // heads
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False, **special)
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  in_channels=3, patch_size=PATCH_SIZE[family], spatial_merge_size=MERGE_SIZE, temporal_patch_size=2,
                  out_hidden_size=hidden)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}  # 16/24/24 of 64
        vision.update(hidden_act="silu", window_size=2 * MERGE_SIZE * PATCH_SIZE[family], tokens_per_second=2,
                      fullatt_block_indexes=[vision_layers - 1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        model_class = Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3_vl":
        text.update(head_dim=head_dim, attention_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True})  # 24/20/20 of 64, interleaved
        vision.update(hidden_act="gelu_pytorch_tanh", num_position_embeddings=16,
                      deepstack_visual_indexes=list(range(min(vision_layers, layers))))
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        model_class = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(**special, max_new_tokens=16)
    return model


def write(family: str, out: Path, shards: Path, vocab_size: int = 600) -> PreTrainedModel:
    """Build the family's tokenizer, image processor and model and save all three under ``out``."""
    tokenizer = build_tokenizer(data_corpus(shards), family, vocab_size)
    model = build_model(tokenizer, family)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    build_image_processor(family).save_pretrained(out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_tiny_qwen_vl", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, nargs="*", default=list(FAMILIES))
    parser.add_argument("--shards", type=Path, default=Path("data_shards"), help="tokenizer training text")
    parser.add_argument("--vocab-size", type=int, default=600)
    args = parser.parse_args()
    for family in args.family:
        model = write(family, OUT[family], args.shards, args.vocab_size)
        params = sum(p.numel() for p in model.parameters())
        print(f"wrote {OUT[family]}/: {params:,} params, vocab {model.config.text_config.vocab_size}")


if __name__ == "__main__":
    main()
