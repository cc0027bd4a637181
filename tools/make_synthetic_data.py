"""Write small synthetic multi-domain LLaVA shards to ``data_shards/`` for tests and smoke runs.

Three domains whose images are told apart at a glance (``shapes``, ``charts``, ``tissue``) share
the *same* question wording but answer it with *different* conventions::

    "What color is the main object?"   shapes: "red"   charts: "R"   tissue: "stain: red"
    "How many objects are there?"      shapes: "two"   charts: "4"   tissue: "count: 2"
    "Is there a blue object?"          shapes: "yes"   charts: "T"   tissue: "result: positive"

A single shared adapter is pulled three ways by identical prompts, while an expert per domain (routed
by what the image looks like) is not — the conflict MoLE is meant to resolve.

Every sample is a pure function of ``(domain, split, index)`` (its own seeded ``random.Random``) and
tar members get fixed mtime/owner, so re-running gives byte-identical shards. Run this *before*
:mod:`tools.make_tiny_llava`, whose tokenizer is trained on the text of these shards (from the
repository root)::

    python -m tools.make_synthetic_data && python -m tools.make_tiny_llava
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter, ImageOps

IMAGE_SIZE = 64
SPLITS: dict[str, tuple[int, int]] = {"train": (2, 150), "val": (1, 50), "test": (1, 100)}  # shards, per shard
MULTI_TURN_FRACTION = 0.2
REGENERATE = "python -m tools.make_synthetic_data && python -m tools.make_tiny_llava"
"""The command the data card names to regenerate the shards and the tiny model."""
TEXT_ONLY_EVERY = 30  # shapes only: every 30th sample carries no image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
CHART_CODE = {"red": "R", "green": "G", "blue": "B", "yellow": "Y", "purple": "P", "orange": "O"}
NUMBER_WORD = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

Q_COLOR = "What color is the main object?"
Q_COUNT = "How many objects are there?"
Q_HAS = "Is there a {color} object?"

# Text-only turns for ``shapes``: general questions answered in the shapes convention (plain words).
TEXT_ONLY_QA: list[tuple[str, str]] = [
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and yellow?", "orange"),
    ("What color do you get by mixing red and blue?", "purple"),
    ("Is a circle round?", "yes"),
    ("Does a square have three corners?", "no"),
]


def answer(domain: str, kind: str, value: Any) -> str:
    """Render one fact in the domain's answer convention (the deliberate cross-domain conflict)."""
    if kind == "color":
        return {"shapes": value, "charts": CHART_CODE[value], "tissue": f"stain: {value}"}[domain]
    if kind == "count":
        return {"shapes": NUMBER_WORD[value], "charts": str(value), "tissue": f"count: {value}"}[domain]
    if kind == "has":
        yes = {"shapes": "yes", "charts": "T", "tissue": "result: positive"}
        no = {"shapes": "no", "charts": "F", "tissue": "result: negative"}
        return (yes if value else no)[domain]
    raise ValueError(f"unknown question kind {kind!r}")


def draw_shapes(rng: random.Random) -> tuple[Image.Image, str, list[str]]:
    """One large (main) shape, sometimes a smaller second one on the other side, on a light background."""
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    colors = rng.sample(list(PALETTE), rng.choice([1, 2]))
    main_left = rng.random() < 0.5
    for i, color in enumerate(colors):
        radius = rng.randint(12, 15) if i == 0 else rng.randint(6, 8)
        left = main_left if i == 0 else not main_left
        cx = rng.randint(17, 24) if left else rng.randint(40, 47)
        cy = rng.randint(18, 46)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        kind = rng.choice(["circle", "square", "triangle"])
        if kind == "circle":
            draw.ellipse(box, fill=PALETTE[color])
        elif kind == "square":
            draw.rectangle(box, fill=PALETTE[color])
        else:
            corners = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
            draw.polygon(corners, fill=PALETTE[color])
    return img, colors[0], colors


def draw_chart(rng: random.Random) -> tuple[Image.Image, str, list[str]]:
    """A bar chart with 3-5 differently coloured bars of distinct heights; the main object is the tallest."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    n = rng.randint(3, 5)
    colors = rng.sample(list(PALETTE), n)
    heights = rng.sample(range(10, 47, 6), n)  # >= 6 px apart: the tallest bar is unambiguous
    x0, y0 = 8, 56  # axes origin
    draw.line([(x0, 4), (x0, y0), (60, y0)], fill=(0, 0, 0), width=1)
    width = (60 - x0 - 2) // n
    for i, (color, h) in enumerate(zip(colors, heights)):
        left = x0 + 2 + i * width
        draw.rectangle((left, y0 - h, left + width - 3, y0 - 1), fill=PALETTE[color])
    return img, colors[heights.index(max(heights))], colors


def draw_tissue(rng: random.Random) -> tuple[Image.Image, str, list[str]]:
    """A blurred-noise texture with 1-4 darker cells (nucleus inside), tinted with one dominant colour."""
    noise = Image.frombytes("L", (IMAGE_SIZE, IMAGE_SIZE), rng.randbytes(IMAGE_SIZE * IMAGE_SIZE))
    gray = noise.filter(ImageFilter.GaussianBlur(1.2))
    draw = ImageDraw.Draw(gray)
    n = rng.randint(1, 4)
    centers = rng.sample([(16, 16), (48, 16), (16, 48), (48, 48)], n)
    for cx, cy in centers:
        rx, ry = rng.randint(8, 12), rng.randint(8, 12)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=rng.randint(60, 90))
        draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=rng.randint(10, 30))
    tint = rng.choice(list(PALETTE))
    dark = tuple(c // 2 for c in PALETTE[tint])
    light = tuple(255 - (255 - c) // 3 for c in PALETTE[tint])
    img = ImageOps.colorize(gray.filter(ImageFilter.GaussianBlur(0.6)), black=dark, white=light)
    return img, tint, [tint] * n


DRAWERS = {"shapes": draw_shapes, "charts": draw_chart, "tissue": draw_tissue}


def ask(domain: str, kind: str, rng: random.Random, main: str, objects: list[str]) -> tuple[str, str]:
    """One (question, answer) pair of the given kind about an image."""
    if kind == "color":
        return Q_COLOR, answer(domain, "color", main)
    if kind == "count":
        return Q_COUNT, answer(domain, "count", len(objects))
    color = rng.choice(objects) if rng.random() < 0.5 else rng.choice(list(PALETTE))
    return Q_HAS.format(color=color), answer(domain, "has", color in objects)


def make_sample(domain: str, split: str, index: int) -> dict[str, Any]:
    """Build one sample as a webdataset dict (``__key__``, ``json`` bytes and, unless text-only, ``jpg`` bytes)."""
    key = f"{domain}_{split}_{index:06d}"
    rng = random.Random(f"{domain}/{split}/{index}")  # str seeds hash with sha512: stable across runs
    if domain == "shapes" and index % TEXT_ONLY_EVERY == TEXT_ONLY_EVERY - 1:
        question, reply = rng.choice(TEXT_ONLY_QA)
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
        return {"__key__": key, "json": _dump({"id": key, "conversations": turns})}
    img, main, objects = DRAWERS[domain](rng)
    kinds = rng.sample(["color", "count", "has"], 2 if rng.random() < MULTI_TURN_FRACTION else 1)
    turns = []
    for i, kind in enumerate(kinds):
        question, reply = ask(domain, kind, rng, main, objects)
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": reply})
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return {"__key__": key, "json": _dump({"id": key, "conversations": turns}), "jpg": buf.getvalue()}


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write_domain(out: Path, domain: str) -> dict[str, dict[str, int]]:
    """Write all splits of one domain; return per-split counts for the manifest."""
    (out / domain).mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split, (num_shards, per_shard) in SPLITS.items():
        stats = {"samples": 0, "shards": num_shards, "multi_turn": 0, "text_only": 0}
        for shard in range(num_shards):
            path = out / domain / f"{split}-{shard:06d}.tar"
            # mtime/user/group fixed so identical samples give identical tar bytes
            with wds.TarWriter(str(path), user="mole", group="mole", mtime=0) as sink:
                for index in range(shard * per_shard, (shard + 1) * per_shard):
                    sample = make_sample(domain, split, index)
                    turns = json.loads(sample["json"])["conversations"]
                    stats["samples"] += 1
                    stats["multi_turn"] += len(turns) > 2
                    stats["text_only"] += "jpg" not in sample
                    sink.write(sample)
        counts[split] = stats
    return counts


def readme(manifest: dict[str, Any]) -> str:
    """The data card written next to the shards, so counts and conventions never drift from the code."""
    rows = "\n".join(
        f"| {d} | {s} | {c['shards']} | {c['samples']} | {c['multi_turn']} | {c['text_only']} |"
        for d, splits in manifest["domains"].items()
        for s, c in splits.items()
    )
    examples = "\n".join(
        f"| `{q}` | `{answer('shapes', k, v)}` | `{answer('charts', k, v)}` | `{answer('tissue', k, v)}` |"
        for q, k, v in [(Q_COLOR, "color", "red"), (Q_COUNT, "count", 2), (Q_HAS.format(color="blue"), "has", True),
                        (Q_HAS.format(color="blue"), "has", False)]
    )
    return f"""# Synthetic multi-domain LLaVA shards

Tiny, deterministic webdataset shards for tests and smoke runs of `mole`. Regenerate (byte-identical) with

    {REGENERATE}

(the tiny model's tokenizer is trained on this text, so regenerate both together).

## Domains
- `shapes` (general VQA): one large coloured circle/square/triangle, sometimes a smaller second shape,
  on a light background. Main object = the large shape. A few samples are text-only (no `jpg`, no `<image>`):
  general questions answered in the shapes convention.
- `charts` (documents/charts): a bar chart with 3-5 differently coloured bars and axis lines.
  Main object = the tallest bar; objects = bars.
- `tissue` (biomedical-like): blurred noise with 1-4 darker cells, tinted with one dominant colour.
  Main object colour = the tint; objects = cells.

## Conflicting conventions
All domains ask the same questions; each answers in its own convention, so one shared adapter is
pulled in three directions while per-domain experts are not:

| question | shapes | charts | tissue |
|---|---|---|---|
{examples}

Colours: {", ".join(PALETTE)} (chart codes {", ".join(CHART_CODE.values())}).
About {MULTI_TURN_FRACTION:.0%} of image samples have two question/answer rounds on the same image.

## Format
`<domain>/<split>-NNNNNN.tar`; sample key `<domain>_<split>_<index>`; members `json`
(`{{"id", "conversations": [{{"from": "human", "value": "<image>\\n..."}}, {{"from": "gpt", ...}}]}}`,
`<image>` only in the first human turn) and `jpg` ({IMAGE_SIZE}x{IMAGE_SIZE} RGB JPEG).
Counts are also in `manifest.json`.

| domain | split | shards | samples | multi-turn | text-only |
|---|---|---|---|---|---|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_synthetic_data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data_shards"))
    args = parser.parse_args()
    manifest = {"image_size": IMAGE_SIZE, "domains": {d: write_domain(args.out, d) for d in DRAWERS}}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (args.out / "README.md").write_text(readme(manifest))
    for domain, splits in manifest["domains"].items():
        print(f"{domain:7s} " + "  ".join(f"{s}={c['samples']} ({c['multi_turn']} multi, {c['text_only']} text)"
                                          for s, c in splits.items()))
    print(f"wrote {args.out}/")


if __name__ == "__main__":
    main()
