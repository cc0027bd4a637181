"""LLaVA-format JSON + image folder -> webdataset shards that ``mole`` streams (``launch/make_shards.py``).

The input is a list of entries as in ``llava_v1_5_mix665k.json``: ``{"id": str | int, "image"?:
"<source>/<...>.jpg", "conversations": [{"from": "human" | "gpt", "value": str}, ...]}``, image paths
relative to the image folder, no ``image`` for text-only entries. Each usable entry becomes one sample:
key = its position in the JSON (ids repeat in the real mix), ``json`` = the entry, and the image file's
bytes under its extension. Entries are checked with the loader's own rules: malformed conversations, a
missing, unreadable or unsupported image, an ``<image>`` with no image and, given the model's tokenizer,
text that spells one of its special tokens are skipped and reported in ``skipped.jsonl``. Left to
training, which skips and counts them: what depends on its settings (``too_long`` for
``data.max_length``, ``data.max_image_pixels``, extreme aspect ratios) and image data damaged past a
valid header (only headers are read here). ``manifest.json`` counts samples per source and gives each shard set's brace pattern,
ready for a domain's ``shards``.

With ``split_by="source"`` each source gets its own shard set under ``OUT/<source>/``: the first path
component of ``image`` (``coco``, ``gqa``, ``ocr_vqa``, ``textvqa``, ``vg`` in LLaVA-1.5's mix) or
``text`` for entries without an image, so a config can weight sources as domains. Folders whose
sets would merge (``a b`` and ``a_b``, or a folder named ``text``) are refused before anything is
written. Image paths are judged as written (no absolute paths, no ``..``), so a folder inside the
image folder may link elsewhere. Converting again into the same ``OUT`` first deletes the shards the
previous conversion's ``manifest.json`` lists there, so no stale shard is left for a glob to find.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mole.data.conversation import parse_conversation, refuse_special_tokens
from mole.data.errors import BadSample
from mole.data.images import IMAGE_EXTENSIONS, IMAGE_FORMATS

log = logging.getLogger(__name__)

TEXT_SOURCE = "text"
SHARD_NAME = "shard-%06d.tar"
SHARD_FILE = re.compile(re.escape(SHARD_NAME).replace("%06d", r"\d{6}"))  # a file named by SHARD_NAME


def source_of(entry: dict) -> str:
    """The shard set an entry belongs to: the first component of its image path, or ``text``."""
    return _source(entry)[0]


def _source(entry: dict) -> tuple[str, str]:
    """(shard set name, what it was made from): a folder name made safe for a path, ``images`` for
    images at the top of the image folder, ``text`` for entries without an image."""
    image = entry.get("image")
    if not image or not isinstance(image, str):
        return TEXT_SOURCE, "(entries without an image)"
    parts = Path(image).parts
    if len(parts) == 1:
        return "images", "(images at the top of the image folder)"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", parts[0]), parts[0]


def check_sources(entries: list) -> None:
    """Refuse, before anything is written, image folders whose shard sets would merge: two names made
    the same by :func:`source_of` (``a b`` and ``a_b``), or a folder named like a set of its own
    (``text``, ``images``); mixing them would mislabel a domain without a word."""
    made_from: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict):
            name, raw = _source(entry)
            if made_from.setdefault(name, raw) != raw:
                raise ValueError(f"split_by source: {made_from[name]!r} and {raw!r} would share the shard set "
                                 f"{name!r}; rename one of them")


def to_sample(index: int, entry, images: Path, tokenizer=None) -> dict:
    """The webdataset sample for one entry, or ``BadSample`` saying why it cannot train (the special-token
    check needs the model's ``tokenizer``; without one it is left to training)."""
    if not isinstance(entry, dict):
        raise BadSample("wrong_type", f"entry is {type(entry).__name__}, expected an object")
    try:
        encoded = json.dumps(entry, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate from a \ud800 escape
        raise BadSample("non_utf8", str(err)) from None
    turns, has_placeholder = parse_conversation(encoded)
    if tokenizer is not None:
        refuse_special_tokens(turns, tokenizer)
    sample = {"__key__": f"{index:09d}", "json": encoded}
    image = entry.get("image")
    if image is None:
        if has_placeholder:
            raise BadSample("image_missing", "<image> in the text but the entry has no image")
        return sample
    if not isinstance(image, str):
        raise BadSample("wrong_type", f"'image' is {type(image).__name__}, expected a path")
    if not image:
        raise BadSample("bad_image_path", "'image' is an empty path")
    # judged as written, not resolved: a folder inside that links elsewhere (coco -> /datasets/coco) is fine
    if Path(image).is_absolute() or ".." in Path(image).parts:
        raise BadSample("bad_image_path", f"{image!r} points outside the image folder")
    path = images / image
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise BadSample("unsupported_image_type", f"{image!r}: expected one of {', '.join(IMAGE_EXTENSIONS)}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadSample("image_missing_file", f"{image!r}: {err.strerror}") from None
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as header:  # the header only: catches non-images cheaply
            header.size
    except Exception as err:  # PIL raises many types on non-images
        raise BadSample("broken_image", f"{image!r}: {type(err).__name__}: {err}") from None
    sample[ext] = data
    return sample


def convert(json_path: str | Path, images: str | Path, out: str | Path, split_by: str | None = None,
            max_count: int = 10_000, max_size: int = 1_000_000_000, progress: bool = True,
            model: str | Path | None = None) -> dict:
    """Write the shards and ``manifest.json`` / ``skipped.jsonl`` under ``out``; return the manifest.

    ``model``: the LLaVA directory training will use; its tokenizer's special tokens are then checked
    here too."""
    images, out = Path(images), Path(out)
    if split_by not in (None, "source"):
        raise ValueError(f"split_by must be None or 'source', got {split_by!r}")
    if not images.is_dir():  # else every image entry would be skipped as missing, the run "succeeding"
        raise ValueError(f"--images {str(images)!r} is not a directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    tokenizer = None
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"--model {str(model)!r} is not a Hugging Face model directory (no config.json)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model))
    try:
        entries = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{json_path}: not a readable JSON file: {type(err).__name__}: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: expected a JSON list of LLaVA entries, got {type(entries).__name__}")
    if split_by == "source":
        check_sources(entries)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_shards(out)
    writers: dict[str, wds.ShardWriter] = {}
    counts: Counter = Counter()
    skipped: Counter = Counter()
    try:
        with open(out / "skipped.jsonl", "w", encoding="utf-8", errors="backslashreplace") as skipped_log:
            for index, entry in enumerate(tqdm(entries, desc="entries", unit="", disable=not progress)):
                try:
                    sample = to_sample(index, entry, images, tokenizer)
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    record = {"index": index, "id": entry.get("id") if isinstance(entry, dict) else None,
                              "reason": bad.reason, "detail": str(bad)}
                    skipped_log.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")
                    continue
                source = source_of(entry) if split_by == "source" else ""
                if source not in writers:
                    (out / source).mkdir(parents=True, exist_ok=True)
                    writers[source] = wds.ShardWriter(str(out / source / SHARD_NAME), maxcount=max_count,
                                                      maxsize=max_size, verbose=0, user="mole", group="mole", mtime=0)
                writers[source].write(sample)
                counts[source] += 1
    finally:  # shards written so far end with their end-of-archive marker, whatever stopped the loop
        shard_counts = {source: writer.shard for source, writer in writers.items()}  # close() deletes .shard
        for writer in writers.values():
            writer.close()
    sources = {}
    for source, shards in sorted(shard_counts.items()):
        sources[source or "all"] = {
            "samples": counts[source], "shards": shards,
            "pattern": str(out / source / SHARD_NAME.replace("%06d", f"{{000000..{shards - 1:06d}}}")),
        }
    manifest = {
        "json": str(Path(json_path).resolve()), "images": str(images.resolve()), "split_by": split_by,
        "model": str(Path(model).resolve()) if model is not None else None,
        "entries": len(entries), "written": sum(counts.values()), "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())), "sources": sources,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _remove_previous_shards(out: Path) -> None:
    """Delete the shards an earlier conversion into ``out`` wrote (as its ``manifest.json`` lists them),
    so that a glob over the folder cannot mix them with this conversion's. Only files inside ``out``
    are touched, whatever paths the old manifest holds (the folder may have been copied or moved)."""
    try:
        previous = json.loads((out / "manifest.json").read_text())
        sources = previous["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    removed = 0
    for name, info in sources.items() if isinstance(sources, dict) else ():
        if not isinstance(info, dict) or name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            continue  # not a shard set this module names: a folder outside out, or a hand-edited manifest
        folder = out / ("" if name == "all" else name)
        for path in wds.shardlists.expand_urls(str(info.get("pattern", ""))):
            stale = folder / Path(path).name
            if SHARD_FILE.fullmatch(stale.name) and stale.is_file():
                stale.unlink()
                removed += 1
    if removed:
        log.info("removed %d shards of the previous conversion into %s", removed, out)


def summary(manifest: dict) -> str:
    lines = [f"{manifest['written']} of {manifest['entries']} entries written, {manifest['skipped']} skipped"]
    lines += [f"  {name:>12}: {s['samples']:>8} samples in {s['shards']:>4} shards  {s['pattern']}"
              for name, s in manifest["sources"].items()]
    lines += [f"  skipped {reason}: {n}" for reason, n in manifest["skipped_by_reason"].items()]
    return "\n".join(lines)
