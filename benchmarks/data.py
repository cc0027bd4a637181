"""``data`` bench: samples per second one DataLoader worker (one thread) turns into model inputs.

COCO-sized photos (640x480 JPEG, ~100 KB, drawn deterministically) go to LLaVA-1.5's 336-px input:
a ``CLIPImageProcessor`` configured as llava-1.5-7b-hf's (shortest edge 336, centre crop 336,
bicubic, CLIP mean/std) with the bundled tiny model's tokenizer and chat template, 576 image tokens,
``max_length`` 2048, images padded to a square first (``image_aspect: pad``). Variants, timed
interleaved (see :mod:`benchmarks`), each over the same ``--samples`` samples per round:

* ``decode``: ``decode_image`` alone (Pillow, libjpeg-turbo);
* ``processor``: decode + transformers' image processor (its PIL backend, what transformers uses
  without torchvision) — the baseline of the ratios, reported as ``processor_samples_per_s``;
* ``fast``: decode + :class:`~mole.data.images.FastPixels`;
* ``worker``: what a DataLoader worker does per sample with the default ``image_backend: fast``:
  read the tar shard, validate, decode, preprocess, tokenise with labels, collate batches of 8 —
  reported as ``samples_per_s_per_worker``;
* ``worker_processor``: the same with ``image_backend: processor``.

``tolerance`` compares ``fast`` with ``processor`` pixel values on every bench image.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from benchmarks import interleaved, machine, print_table, summarize, write_json
from mole.data.images import FastPixels, ProcessorPixels, decode_image, max_level_difference
from mole.data.stream import Domain, MixedStream, SampleProcessor

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("decode", "processor", "fast", "worker", "worker_processor")
BATCH_SIZE = 8
CONVERSATION = [  # a COCO conversation in LLaVA-1.5's mix: three rounds about one photo
    ("<image>\nWhat are the colors of the bus in the image?", "The bus in the image is white and red."),
    ("What feature can be seen on the back of the bus?", "The back of the bus features an advertisement."),
    ("Is the bus driving down the street or pulled off to the side?",
     "The bus is driving down the street, which is crowded with people and other vehicles."),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks data", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="samples per variant per round")
    p.add_argument("--images", type=int, default=32, help="distinct 640x480 JPEGs (samples cycle through them)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    p.add_argument("--model", default=str(REPO / "models" / "tiny-llava"), help="tokenizer + chat template source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    return p.parse_args(argv)


def llava15_processor(model_dir: str):
    """The tiny model's processor with llava-1.5-7b-hf's image processor (336 px, 576 image tokens)."""
    import transformers
    from transformers import AutoProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_processor = image_processor_class(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    processor.patch_size = 14
    return processor


def coco_like_jpeg(seed: int, width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG: smooth gradients, blurred shapes and sensor-like noise, quality 90 (~100 KB)."""
    rng, shapes = np.random.default_rng(seed), random.Random(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / (30 + 10 * c) + seed) * 60 + np.cos(y / (40 + 7 * c)) * 60 + 128 for c in range(3)], -1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x0, y0 = shapes.randint(0, width - 40), shapes.randint(0, height - 40)
        box = (x0, y0, x0 + shapes.randint(10, 200), y0 + shapes.randint(10, 200))
        draw.ellipse(box, fill=tuple(shapes.randint(0, 255) for _ in range(3)))
    noisy = np.asarray(image.filter(ImageFilter.GaussianBlur(2))).astype(np.int16) + rng.normal(0, 10, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_bench_shard(path: Path, jpegs: list[bytes], count: int) -> None:
    import webdataset as wds

    turns = []
    for question, answer in CONVERSATION:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    with wds.TarWriter(str(path)) as sink:
        for i in range(count):
            record = {"id": i, "image": f"coco/train2017/{i:012d}.jpg", "conversations": turns}
            sink.write({"__key__": f"{i:09d}", "json": json.dumps(record).encode(), "jpg": jpegs[i % len(jpegs)]})


def tolerance(jpegs: list[bytes], image_processor) -> dict:
    """How far ``fast`` is from ``processor`` on the bench images, in uint8 levels and normalised units."""
    fast, reference = FastPixels(image_processor, "pad"), ProcessorPixels(image_processor, "pad")
    levels, normalised, over_one, pixels = 0.0, 0.0, 0, 0
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    for data in jpegs:
        image = decode_image(data)
        a, b = fast(image), reference(image)
        levels = max(levels, max_level_difference(a, b, image_processor))
        normalised = max(normalised, float((a - b).abs().max()))
        over_one += int(((a - b).abs() * std * 255 > 1.01).sum())
        pixels += a.numel()
    return {"max_level_difference": round(levels, 4), "max_abs_diff_normalised": round(normalised, 6),
            "fraction_over_one_level": over_one / pixels, "images": len(jpegs)}


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker's share of the CPU
    processor = llava15_processor(args.model)
    jpegs = [coco_like_jpeg(args.seed + i) for i in range(args.images)]
    images = [jpegs[i % len(jpegs)] for i in range(args.samples)]
    fast, reference = FastPixels(processor.image_processor, "pad"), ProcessorPixels(processor.image_processor, "pad")

    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "coco-000000.tar"
        write_bench_shard(shard, jpegs, max(args.samples, 2 * len(jpegs)))
        domain = [Domain("coco", [str(shard)], 1.0)]
        streams = {
            backend: iter(MixedStream(domain, SampleProcessor(processor, 2048, "pad", image_backend=backend),
                                      batch_size=BATCH_SIZE, pad_token_id=processor.tokenizer.pad_token_id,
                                      seed=args.seed, rank=0))
            for backend in ("fast", "processor")
        }
        batches = -(-args.samples // BATCH_SIZE)

        def worker(backend: str):
            def run():
                for _ in range(batches):
                    batch = next(streams[backend])
                    assert not batch["skipped"], batch["skipped"]
            return run

        fns = {
            "decode": lambda: [decode_image(data) for data in images],
            "processor": lambda: [reference(decode_image(data)) for data in images],
            "fast": lambda: [fast(decode_image(data)) for data in images],
            "worker": worker("fast"),
            "worker_processor": worker("processor"),
        }
        times = interleaved(fns, args.repeats, args.warmup, torch.device("cpu"))

    result = summarize(times, baseline="processor")
    per_call = {"worker": batches * BATCH_SIZE, "worker_processor": batches * BATCH_SIZE}
    rate = {name: round(per_call.get(name, args.samples) / median, 1) for name, median in result["medians_s"].items()}
    result = {
        "samples_per_s_per_worker": rate["worker"],
        "processor_samples_per_s": rate["processor"],
        "samples_per_s": rate,
        "tolerance": tolerance(jpegs, processor.image_processor),
        **result,
    }
    result["setup"] = {
        "bench": "data", "what": __doc__.split("\n\n")[0], "image_size": [640, 480],
        "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])), "samples_per_round": args.samples,
        "batch_size": BATCH_SIZE, "max_length": 2048, "image_aspect": "pad",
        "image_processor": type(processor.image_processor).__name__, "pillow": Image.__version__,
        "repeats": args.repeats, "warmup": args.warmup, "machine": machine(torch.device("cpu")),
    }
    print_table(result, "processor")
    print(f"samples/s per worker: {rate['worker']} (fast path), {rate['worker_processor']} (processor); "
          f"decode + processor alone: {rate['processor']}; fast vs processor: "
          f"<= {result['tolerance']['max_level_difference']} uint8 levels")
    write_json(args.json, result)
    return result
