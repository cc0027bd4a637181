"""Write a tiny *random* LLaVA-1.5-shaped checkpoint to ``models/tiny-llava/`` for CPU tests and smoke runs.

The directory loads exactly like ``llava-hf/llava-1.5-7b-hf``: ``LlavaForConditionalGeneration``,
``AutoProcessor`` (a ``LlavaProcessor``) and ``AutoTokenizer`` ``.from_pretrained(dir)``, with the
same chat template, ``vision_feature_layer=-2`` / ``"default"`` feature selection (CLS dropped), a
2-layer GELU projector and ``<image>`` expanded by the processor into one token per patch — only
every size is shrunk (CLIP 56 px / patch 14 -> 16 image tokens, Llama hidden 64, ~600-token vocab),
so the whole checkpoint is well under 2 MB.

The byte-level BPE tokenizer is trained on the conversation text of ``data_shards/`` plus the chat
template strings, so run the data generator first (from the repository root)::

    python -m tools.make_synthetic_data && python -m tools.make_tiny_llava

Everything is seeded (``torch.manual_seed(0)``, deterministic BPE training on sorted shards), so
re-running gives byte-identical files. ``build_tokenizer`` / ``build_processor`` / ``build_model``
take sizes so tests can build other variants in memory.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tools.make_synthetic_data import REGENERATE

# Verbatim from llava-hf/llava-1.5-7b-hf chat_template.json (also pinned in transformers'
# tests/models/llava/test_processing_llava.py): "USER: <image>\n{text} ASSISTANT: {reply} ".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN = "<image>"
CARD_COMMAND_AS_TRAINED = "    python launch/make_synthetic_data.py && python launch/make_tiny_llava.py"
"""The data card's regeneration line as it read when the bundled tokenizer was trained (the generators
then lived in ``launch/``). The card's text is tokenizer training data, so :func:`data_corpus` reads
the card's current command line as this one: renaming the command must not move the bundled
tokenizer's token ids, which the tests and the committed results rest on."""


def data_corpus(shard_dir: Path) -> list[str]:
    """Tokenizer training text: one ``USER: ... ASSISTANT: ...`` line per conversation in every ``*.tar``
    under ``shard_dir`` (sorted, for determinism), plus the lines of its ``README.md`` data card — the
    conversations alone saturate BPE at ~450 tokens, the card's prose takes it to ~600. The card's
    regeneration command is read as :data:`CARD_COMMAND_AS_TRAINED`."""
    shards = sorted(shard_dir.rglob("*.tar"))
    card = shard_dir / "README.md"
    if not shards or not card.is_file():
        raise FileNotFoundError(f"no shards/README.md under {shard_dir}; run python -m tools.make_synthetic_data first")
    roles = {"human": "USER: ", "gpt": " ASSISTANT: "}
    lines = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    turns = json.load(tar.extractfile(member))["conversations"]
                    lines.append("".join(roles[t["from"]] + t["value"] for t in turns) + "</s>")
    card_lines = card.read_text(encoding="utf-8").splitlines()
    return lines + [CARD_COMMAND_AS_TRAINED if line.strip() == REGENERATE else line for line in card_lines]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes without ``<unk>``) with LLaVA's special tokens.

    Ids follow llava-hf: ``<unk>``=0, ``<s>``=1, ``</s>``=2, then the BPE vocab, then ``<image>`` and
    ``<pad>`` appended last. Encoding with special tokens prepends ``<s>`` and appends nothing.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # room for <image> and <pad>
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template_text = ["USER: <image>\n", " ASSISTANT:", "ASSISTANT: ", "USER: ", "SYSTEM: "]
    tok.train_from_iterator([*template_text, *corpus], trainer=trainer)
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 56, patch_size: int = 14) -> LlavaProcessor:
    """CLIP preprocessing at ``image_size`` and a LlavaProcessor expanding ``<image>`` to (image/patch)^2 tokens."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which "default" then drops
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA-1.5 (CLIP ViT -> 2-layer GELU MLP -> Llama) at the given sizes."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **special,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **special,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**special, max_new_tokens=16)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_tiny_llava", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/tiny-llava"))
    parser.add_argument("--shards", type=Path, default=Path("data_shards"), help="tokenizer training text")
    parser.add_argument("--vocab-size", type=int, default=600)
    args = parser.parse_args()

    tokenizer = build_tokenizer(data_corpus(args.shards), args.vocab_size)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)  # also writes the tokenizer files and chat template
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}/: {params:,} params, vocab {len(tokenizer)}, "
          f"image token {model.config.image_token_id} x {model.config.image_seq_length}")


if __name__ == "__main__":
    main()
