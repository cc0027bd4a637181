"""launch/make_shards.py on a small LLaVA-format JSON and image folder written by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from transformers import AutoProcessor

from mole.data.errors import BadSample
from mole.data.shards import expand_shards, read_shard
from mole.data.stream import SampleProcessor
from tests.helpers import REPO, TINY_MODEL


def turns(*pairs) -> list[dict]:
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


@pytest.fixture(scope="module")
def llava_json(tmp_path_factory):
    """Entries like llava_v1_5_mix665k.json: sources coco/gqa/ocr_vqa, text-only ones, int and str ids, bad ones."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    for rel, fmt in [("coco/train2017/a.jpg", "JPEG"), ("coco/train2017/b.jpg", "JPEG"), ("gqa/images/c.png", "PNG")]:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), (10, 200, 30)).save(images / rel, format=fmt)
    (images / "vg").mkdir()
    (images / "vg" / "broken.jpg").write_bytes(b"not an image")
    (images / "vg" / "anim.gif").write_bytes(b"GIF89a")
    entries = [
        {"id": "000000033471", "image": "coco/train2017/a.jpg",
         "conversations": turns(("<image>\nWhat is this?", "A field."), ("Is it green?", "Yes."))},
        {"id": 17, "image": "coco/train2017/b.jpg", "conversations": turns(("What color?\n<image>", "Green."))},
        {"id": "gqa_1", "image": "gqa/images/c.png", "conversations": turns(("<image>\nAny animals?", "No."))},
        {"id": "sharegpt_1", "conversations": turns(("Say hi in French.", "Bonjour."), ("And in German?", "Hallo."))},
        {"id": 99, "conversations": turns(("2+2?", "4"))},
        # bad ones: reason expected in skipped.jsonl
        {"id": "missing", "image": "ocr_vqa/images/nope.jpg", "conversations": turns(("<image>\nTitle?", "X"))},
        {"id": "broken", "image": "vg/broken.jpg", "conversations": turns(("<image>\nWhat?", "Y"))},
        {"id": "gif", "image": "vg/anim.gif", "conversations": turns(("<image>\nWhat?", "Y"))},
        {"id": "escape", "image": "../outside.jpg", "conversations": turns(("<image>\nWhat?", "Y"))},
        {"id": "no_image", "conversations": turns(("<image>\nWhat is shown?", "Z"))},
        {"id": "no_answer", "conversations": [{"from": "human", "value": "hello"}]},
        {"id": "no_conversations"},
        ["not", "an", "entry"],
        {"id": "speaker_list", "conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "a"}]},
        {"id": "lone_surrogate", "conversations": turns(("Say \ud800", "no"))},
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(entries))
    return path, images


EXPECTED_SKIPS = {"image_missing_file": 1, "broken_image": 1, "unsupported_image_type": 1, "bad_image_path": 1,
                  "image_missing": 1, "no_answer": 1, "no_conversations": 1, "wrong_type": 2,
                  "non_utf8": 1}


def make_shards(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's mole, whatever is pip-installed
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, f"make_shards failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_make_shards_splits_by_source_skips_bad_entries_and_the_loader_reads_every_sample(llava_json, tmp_path):
    json_path, images = llava_json
    out = tmp_path / "shards"
    proc = make_shards("--json", json_path, "--images", images, "--out", out, "--split-by", "source", "--max-count", 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {name: s["samples"] for name, s in manifest["sources"].items()} == {"coco": 2, "gqa": 1, "text": 2}, manifest
    assert manifest["sources"]["coco"]["shards"] == 2, "--max-count 1 must give one shard per sample"
    assert manifest["skipped_by_reason"] == EXPECTED_SKIPS, manifest["skipped_by_reason"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {r["id"] for r in skipped if r["id"] is not None} >= {"missing", "broken", "gif", "escape", "no_image"}, skipped
    assert "5 of 15 entries written" in proc.stdout, proc.stdout

    processor = AutoProcessor.from_pretrained(TINY_MODEL)
    process = SampleProcessor(processor, 256, "pad")
    ids = {}
    for name, source in manifest["sources"].items():
        urls = expand_shards(name, source["pattern"])
        assert len(urls) == source["shards"] and all(u.startswith(str(out / name)) for u in urls), urls
        for item in (i for url in urls for i in read_shard(url)):
            assert not isinstance(item, BadSample), f"{name}: a written sample does not load: {item}"
            example = process(item)
            ids[json.loads(item["json"])["id"]] = (name, example.pixel_values is not None)
    assert ids == {"000000033471": ("coco", True), 17: ("coco", True), "gqa_1": ("gqa", True),
                   "sharegpt_1": ("text", False), 99: ("text", False)}, ids


def test_make_shards_without_split_writes_one_shard_set(llava_json, tmp_path):
    from mole.data.convert import convert

    json_path, images = llava_json
    manifest = convert(json_path, images, tmp_path / "all", progress=False)
    assert manifest["sources"] == {"all": {"samples": 5, "shards": 1, "pattern": str(tmp_path / "all" / "shard-{000000..000000}.tar")}}
    first = (tmp_path / "all" / "shard-000000.tar").read_bytes()
    convert(json_path, images, tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "shard-000000.tar").read_bytes() == first, "conversion must be byte-for-byte reproducible"


def test_make_shards_with_the_model_skips_special_token_spellings_training_would_skip(tmp_path):
    from mole.data.convert import convert

    entries = [{"id": "ok", "conversations": turns(("Say bye.", "bye"))},
               {"id": "eos", "conversations": turns(("Say bye.", "bye</s>"))}]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    (tmp_path / "images").mkdir()
    without = convert(tmp_path / "llava.json", tmp_path / "images", tmp_path / "plain", progress=False)
    assert without["written"] == 2, "without a tokenizer the spelling cannot be judged here"
    manifest = convert(tmp_path / "llava.json", tmp_path / "images", tmp_path / "checked", progress=False, model=TINY_MODEL)
    assert (manifest["written"], manifest["skipped_by_reason"]) == (1, {"special_token": 1}), manifest
    skipped = json.loads((tmp_path / "checked" / "skipped.jsonl").read_text())
    assert skipped["id"] == "eos" and "'</s>'" in skipped["detail"], skipped


@pytest.mark.parametrize("problem", ["images", "out", "model"])
def test_make_shards_refuses_a_wrong_path_before_converting(llava_json, tmp_path, problem):
    json_path, images = llava_json
    (tmp_path / "a_file").write_text("")
    args = {"--json": json_path, "--images": images, "--out": tmp_path / "out"}
    if problem == "images":
        args["--images"] = tmp_path / "no_such_folder"
    elif problem == "out":
        args["--out"] = tmp_path / "a_file"
    else:
        args["--model"] = tmp_path
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), *map(str, sum(args.items(), ()))],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and f"--{problem}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists(), "nothing converted"


def test_image_paths_are_judged_as_written_and_merging_sources_are_refused(tmp_path):
    """A folder inside --images that links elsewhere (``coco -> /datasets/coco``, a common layout) is
    converted, an empty path is named as such, and with ``split_by="source"`` two folders whose shard
    sets would merge are refused before anything is written."""
    from mole.data.convert import convert

    elsewhere, images = tmp_path / "datasets" / "coco", tmp_path / "images"
    elsewhere.mkdir(parents=True)
    images.mkdir()
    Image.new("RGB", (48, 32), (10, 200, 30)).save(elsewhere / "1.jpg", format="JPEG")
    (images / "coco").symlink_to(elsewhere, target_is_directory=True)
    entries = [{"id": "linked", "image": "coco/1.jpg", "conversations": turns(("<image>\nWhat?", "Grass."))},
               {"id": "empty", "image": "", "conversations": turns(("<image>\nWhat?", "Y"))}]
    (tmp_path / "ok.json").write_text(json.dumps(entries))
    manifest = convert(tmp_path / "ok.json", images, tmp_path / "out", split_by="source", progress=False)
    assert (manifest["written"], manifest["skipped_by_reason"]) == (1, {"bad_image_path": 1}), manifest
    assert "empty path" in (tmp_path / "out" / "skipped.jsonl").read_text()
    for clash in (["a b/1.jpg", "a_b/2.jpg"], ["text/1.jpg", None]):
        merging = [{"id": str(i), **({"image": image} if image else {}), "conversations": turns(("Q?", "A"))}
                   for i, image in enumerate(clash)]
        (tmp_path / "clash.json").write_text(json.dumps(merging))
        with pytest.raises(ValueError, match="would share the shard set"):
            convert(tmp_path / "clash.json", images, tmp_path / "clash", split_by="source", progress=False)
        assert not (tmp_path / "clash").exists(), "refused before anything was written"


def test_converting_again_into_the_same_folder_leaves_no_shard_of_the_first_conversion(llava_json, tmp_path):
    """A glob over the output (``out/coco/*.tar``) must see only the latest conversion; files the
    earlier one did not write stay."""
    from mole.data.convert import convert

    json_path, images = llava_json
    first = convert(json_path, images, tmp_path / "out", split_by="source", max_count=1, progress=False)
    assert first["sources"]["coco"]["shards"] == 2, "precondition: coco spans two shards of one sample"
    (tmp_path / "out" / "coco" / "notes.txt").write_text("mine")
    fewer = [entry for entry in json.loads(json_path.read_text()) if isinstance(entry, dict) and entry.get("id") != 17]
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    second = convert(tmp_path / "fewer.json", images, tmp_path / "out", split_by="source", max_count=1, progress=False)
    assert second["sources"]["coco"]["shards"] == 1
    assert sorted(p.name for p in (tmp_path / "out" / "coco").iterdir()) == ["notes.txt", "shard-000000.tar"]
