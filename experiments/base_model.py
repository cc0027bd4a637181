"""A small, *non-random* LLaVA-shaped base for experiments: pretrained fully on generic captions.

Adapters compared on a random backbone say little about a method meant for a pretrained one, so the
conflict experiment first trains every weight of a small LLaVA (vision tower, projector, LLM) on
image-caption pairs drawn by the same functions as the bundled domains, with captions in a *neutral*
convention (colour words, counts written as a digit or a word at random, no domain's answer format),
then freezes it, as the paper finetunes on a pretrained LLaVA-1.5.

This is experiment setup, not the product: a plain torch loop in one process, deterministic from a
seed (one CPU thread or a deterministic device). Samples go through :class:`mole.data.sample.SampleProcessor`,
so the base sees exactly the chat format and image pipeline that finetuning uses.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from mole.data.collate import collate
from mole.data.sample import SampleProcessor
from mole.train.optim import warmup_cosine

log = logging.getLogger(__name__)

# drawer(rng) -> (image, main colour, colours of the objects), as in tools/make_synthetic_data.py
Drawer = Callable[[random.Random], tuple[Image.Image, str, list[str]]]

CAPTION_PROMPTS = ("Describe the image.", "What does the picture show?", "Write a short caption.")
NUMBER_WORD = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _number(n: int, rng: random.Random) -> str:
    return str(n) if rng.random() < 0.5 else NUMBER_WORD[n]


def caption(domain: str, main: str, objects: list[str], rng: random.Random) -> str:
    """A neutral description of a drawn image: what it is, how many objects, their colours."""
    n = len(objects)
    if domain == "shapes":
        if n == 1:
            return f"a drawing of {_number(1, rng)} {main} shape on a light background."
        return (f"a drawing of {_number(n, rng)} shapes on a light background: a large {main} shape "
                f"and a small {objects[1]} shape.")
    if domain == "charts":
        return (f"a bar chart with {_number(n, rng)} bars, coloured {', '.join(objects)}. "
                f"the tallest bar is {main}.")
    if domain == "tissue":
        return f"a tissue image with {_number(n, rng)} {'cell' if n == 1 else 'cells'}, tinted {main}."
    raise ValueError(f"no caption convention for domain {domain!r}")


def caption_sample(domain: str, drawer: Drawer, seed: int, index: int) -> dict:
    """One raw sample (``json`` + ``jpg`` bytes, as in a shard), a pure function of its arguments.

    The rng stream is disjoint from the bundled shards' (``"<domain>/<split>/<index>"``) by its prefix.
    """
    rng = random.Random(f"caption/{seed}/{domain}/{index}")
    image, main, objects = drawer(rng)
    turns = [{"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
             {"from": "gpt", "value": caption(domain, main, objects, rng)}]
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)  # as the bundled shards store them
    return {"__key__": f"caption_{domain}_{index:06d}", "json": json.dumps({"conversations": turns}).encode(),
            "jpg": buffer.getvalue()}


@dataclass
class PretrainConfig:
    samples_per_domain: int = 2000
    """Distinct caption samples drawn per domain (cycled through in shuffled epochs)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup over ``warmup_steps``, then cosine to 10%)."""
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    max_length: int = 128


def pretrain(model, processor, drawers: dict[str, Drawer], cfg: PretrainConfig) -> dict:
    """Train every parameter of ``model`` (a ``LlavaForConditionalGeneration``) on generated captions.

    Returns a summary (losses at the start and end, seconds, the config) for the experiment record.
    """
    started = time.perf_counter()
    process = SampleProcessor(processor, cfg.max_length, "pad")
    examples = []
    for domain, drawer in drawers.items():
        for index in range(cfg.samples_per_domain):
            examples.append(process(caption_sample(domain, drawer, cfg.seed, index)))
    log.info("pretraining data: %d captions in %.1f s", len(examples), time.perf_counter() - started)

    torch.manual_seed(cfg.seed)
    order_rng = random.Random(cfg.seed)
    model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps, floor=0.1))
    order: list[int] = []
    losses: list[float] = []
    pad = processor.tokenizer.pad_token_id
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(examples)))
            order_rng.shuffle(fresh)
            order += fresh
        batch = collate([examples[i] for i in order[: cfg.batch_size]], pad)
        del order[: cfg.batch_size]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(out.loss.item())
        if (step + 1) % 100 == 0 or step == 0:
            log.info("pretrain step %d/%d loss %.4f (%.0f s)", step + 1, cfg.steps,
                     sum(losses[-100:]) / len(losses[-100:]), time.perf_counter() - started)
    model.eval()
    model.requires_grad_(False)
    window = max(1, min(50, len(losses)))
    return {"config": asdict(cfg), "first_loss": losses[0], "final_loss": sum(losses[-window:]) / window,
            "seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def caption_accuracy(model, processor, drawers: dict[str, Drawer], seed: int, samples_per_domain: int = 32,
                     offset: int = 1_000_000) -> dict[str, float]:
    """Share of freshly drawn images (indices from ``offset``, unseen in pretraining) whose greedy
    caption equals the reference caption exactly, up to the count written as digit or word: the
    base's grasp of domain, colours and counts. Prompt: the first caption prompt."""
    from mole.data.conversation import Turn
    from mole.inference import Prompt, generate_answers

    scores = {}
    for domain, drawer in drawers.items():
        prompts, references = [], []
        for index in range(offset, offset + samples_per_domain):
            rng = random.Random(f"caption/{seed}/{domain}/{index}")
            image, main, objects = drawer(rng)
            prompts.append(Prompt([Turn("user", "<image>\n" + CAPTION_PROMPTS[0])], image))
            references.append(caption(domain, main, objects, random.Random(0)))
        answers = generate_answers(model, processor, prompts, max_new_tokens=48, batch_size=16)
        scores[domain] = sum(_digits(a) == _digits(r) for a, r in zip(answers, references)) / len(references)
    return scores


def _digits(text: str) -> str:
    words = {w: str(n) for n, w in NUMBER_WORD.items()}
    return " ".join(words.get(token, token) for token in text.strip().split(" "))


def write_base(out_dir: str, model, processor, drawers: dict[str, Drawer], cfg: PretrainConfig, recipe: dict) -> dict:
    """Pretrain ``model`` (freshly built by the caller from ``recipe``), save it where the trainer's
    ``model.name_or_path`` can load it (``save_pretrained`` + processor) with ``base.json``; return that record.

    An ``out_dir`` whose ``base.json`` records the same recipe and pretraining config is reused as is.
    """
    import os

    record_path = os.path.join(out_dir, "base.json")
    wanted = {"recipe": recipe, "pretrain_config": asdict(cfg)}
    if os.path.isfile(record_path):
        with open(record_path) as handle:
            record = json.load(handle)
        if {k: record.get(k) for k in wanted} == wanted:
            log.info("reusing the pretrained base in %s", out_dir)
            return record
    torch.manual_seed(cfg.seed)
    summary = pretrain(model, processor, drawers, cfg)
    accuracy = caption_accuracy(model, processor, drawers, cfg.seed)
    log.info("base caption accuracy on unseen images: %s", accuracy)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    record = {**wanted, "pretrain": summary, "caption_accuracy": accuracy,
              "parameters": sum(p.numel() for p in model.parameters())}
    with open(record_path, "w") as handle:
        json.dump(record, handle, indent=1)
    return record
