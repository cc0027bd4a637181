"""Write the ``cues`` suite to ``data_shards/cues/``: six domains that share every image and question and
differ only by a cue in the prompt, each answering with the same words mapped its own way.

The bundled suite (:mod:`tools.make_synthetic_data`) turned out to hold no conflict a rank-1 LoRA could
not absorb: each domain is obvious from its image and owns its answer tokens. Here nothing but the cue
tells the domains apart, and their answers collide on the same tokens::

    "[alpha] What color is the main object?"   red image -> "the main object is red"
    "[beta] What color is the main object?"    red image -> "the main object is green"
    "[gamma] What color is the main object?"   red image -> "the main object is blue"

Domain ``k`` (0-5, in :data:`CUE_DOMAINS` order) rotates the six colour words by ``k`` places and the
count words one to five by ``k`` places, and answers yes/no inverted when ``k`` is odd; the answer
templates are the same for every domain. A fourth question, "List the objects.", has a long answer (the
count and every object's colour, mapped). One shared adapter must learn six cue-conditioned mappings
of the same tokens; an expert per domain learns one.

Sample ``i`` of a split is the same image and the same questions in every domain (drawn from
``random.Random(f"cues/{split}/{i}")``, the image by the bundled drawing functions in turn: shapes,
charts, tissue), so the base pretrained for the bundled suite (captions of the same drawings) serves
this one too. Deterministic, byte-identical on re-runs::

    python -m tools.make_cue_data
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path
from typing import Any

import webdataset as wds

from tools.make_synthetic_data import (
    DRAWERS,
    NUMBER_WORD,
    PALETTE,
    Q_COLOR,
    Q_COUNT,
    Q_HAS,
)

SUITE = "cues"
CUE_DOMAINS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
SPLITS: dict[str, tuple[int, int]] = {"train": (2, 100), "val": (1, 50), "test": (1, 100)}  # shards, per shard
MULTI_TURN_FRACTION = 0.3
Q_LIST = "List the objects."
COLOURS = tuple(PALETTE)
KINDS = ("color", "count", "has", "list")
REGENERATE = "python -m tools.make_cue_data"


def cue(domain: str) -> str:
    """The prompt prefix that names the domain: the only thing that tells the domains apart."""
    return f"[{domain}] "


def mapped_colour(domain: str, colour: str) -> str:
    return COLOURS[(COLOURS.index(colour) + CUE_DOMAINS.index(domain)) % len(COLOURS)]


def mapped_count(domain: str, count: int) -> str:
    return NUMBER_WORD[(count - 1 + CUE_DOMAINS.index(domain)) % len(NUMBER_WORD) + 1]


def answer(domain: str, kind: str, main: str, objects: list[str], asked: str | None = None) -> str:
    """One fact about an image in the domain's mapping; ``asked`` is the colour a ``has`` question names."""
    if kind == "color":
        return f"the main object is {mapped_colour(domain, main)}"
    if kind == "count":
        return f"there are {mapped_count(domain, len(objects))} objects"
    if kind == "has":
        present = asked in objects
        return "yes" if present != (CUE_DOMAINS.index(domain) % 2 == 1) else "no"
    if kind == "list":
        return f"{mapped_count(domain, len(objects))} objects: " + ", ".join(mapped_colour(domain, c) for c in objects)
    raise ValueError(f"unknown question kind {kind!r}")


def make_sample(domain: str, split: str, index: int) -> dict[str, Any]:
    """One sample: sample ``index``'s image and questions, asked with ``domain``'s cue and answered its way."""
    rng = random.Random(f"{SUITE}/{split}/{index}")
    drawer = list(DRAWERS.values())[index % len(DRAWERS)]
    image, main, objects = drawer(rng)
    kinds = rng.sample(KINDS, 2 if rng.random() < MULTI_TURN_FRACTION else 1)
    turns = []
    for i, kind in enumerate(kinds):
        asked = rng.choice(objects) if rng.random() < 0.5 else rng.choice(COLOURS)
        question = {"color": Q_COLOR, "count": Q_COUNT, "has": Q_HAS.format(color=asked), "list": Q_LIST}[kind]
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + cue(domain) + question})
        turns.append({"from": "gpt", "value": answer(domain, kind, main, objects, asked)})
    key = f"{domain}_{split}_{index:06d}"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return {"__key__": key, "json": json.dumps({"id": key, "conversations": turns}).encode(), "jpg": buf.getvalue()}


def write_suite(out: Path) -> dict[str, dict[str, int]]:
    """Every domain's splits under ``out``; per-split sample counts."""
    counts: dict[str, dict[str, int]] = {}
    for domain in CUE_DOMAINS:
        (out / domain).mkdir(parents=True, exist_ok=True)
        for split, (num_shards, per_shard) in SPLITS.items():
            for shard in range(num_shards):
                with wds.TarWriter(str(out / domain / f"{split}-{shard:06d}.tar"), user="mole", group="mole", mtime=0) as sink:
                    for index in range(shard * per_shard, (shard + 1) * per_shard):
                        sink.write(make_sample(domain, split, index))
            counts[split] = {"shards": num_shards, "samples": num_shards * per_shard}
    return counts


def readme(counts: dict[str, dict[str, int]]) -> str:
    """The data card written next to the shards."""
    example = ("shapes", "red", ["red", "blue"])
    rows = "\n".join(
        f"| `{d}` | `{answer(d, 'color', example[1], example[2])}` | `{answer(d, 'count', example[1], example[2])}` | "
        f"`{answer(d, 'has', example[1], example[2], 'blue')}` | `{answer(d, 'list', example[1], example[2])}` |"
        for d in CUE_DOMAINS)
    splits = ", ".join(f"{s} {c['samples']} ({c['shards']} shard{'s' if c['shards'] > 1 else ''})" for s, c in counts.items())
    return f"""# The `cues` suite: domains told apart only by a cue in the prompt

Regenerate (byte-identical) with `{REGENERATE}`; see `tools/make_cue_data.py`.

Six domains ({", ".join(f"`{d}`" for d in CUE_DOMAINS)}). Sample `i` of a split is the same image (the
bundled drawings, shapes / charts / tissue in turn) and the same questions in every domain; each
question starts with the domain's cue, `[<domain>] `. Domain `k` rotates the colour words
({", ".join(COLOURS)}) and the count words (one to five) by `k` places and inverts yes/no when `k` is
odd; the answer templates are shared, so the domains' answers collide on the same tokens. About
{MULTI_TURN_FRACTION:.0%} of samples ask two questions.

A red main shape and a small blue one (`[<domain>] What color is the main object?`, `How many objects
are there?`, `Is there a blue object?`, `List the objects.`):

| domain | color | count | has | list |
|---|---|---|---|---|
{rows}

Per domain: {splits}. Members `json` (LLaVA conversations) and `jpg` (64x64 RGB JPEG); sample key
`<domain>_<split>_<index>`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_cue_data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data_shards") / SUITE)
    args = parser.parse_args()
    counts = write_suite(args.out)
    (args.out / "README.md").write_text(readme(counts))
    print(f"wrote {len(CUE_DOMAINS)} domains to {args.out}/: " + ", ".join(f"{s} {c['samples']}" for s, c in counts.items()))


if __name__ == "__main__":
    main()
