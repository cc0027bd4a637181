"""Convert LLaVA-format JSON + images to webdataset shards:
``python launch/make_shards.py --json llava_v1_5_mix665k.json --images DIR --out DIR [--split-by source]``.

See :mod:`mole.data.convert`; the manifest it writes gives each shard set's pattern for ``data.domains``.
"""

import argparse
import sys

from mole.data.convert import convert, summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Convert LLaVA-format JSON + images to webdataset shards: with --split-by source one shard set "
                    "per image source under OUT/<source>/, else all under OUT/; skipped entries in OUT/skipped.jsonl, "
                    "counts and shard patterns in OUT/manifest.json")
    parser.add_argument("--json", required=True, help="LLaVA-format JSON: a list of {id, image?, conversations}")
    parser.add_argument("--images", required=True, help="folder the entries' image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder (shards, manifest.json, skipped.jsonl)")
    parser.add_argument("--split-by", choices=["source"], help="one shard set per image source under OUT/<source>/")
    parser.add_argument("--model", help="the LLaVA directory training will use: also skip text that spells one of "
                        "its tokenizer's special tokens (training would skip it)")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
    parser.add_argument("--max-size", type=lambda s: int(float(s)), default=1_000_000_000, help="bytes per shard (about)")
    args = parser.parse_args()
    try:
        manifest = convert(args.json, args.images, args.out, args.split_by, args.max_count, args.max_size,
                           model=args.model)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
