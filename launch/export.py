"""Export a trained adapter for use outside mole, or consolidate a DeepSpeed checkpoint into one.

    python launch/export.py --adapter runs/lora/adapter --format peft   --out exported/peft
    python launch/export.py --adapter runs/lora/adapter --format merged --out exported/merged
    python launch/export.py --adapter runs/tiny/checkpoints/step_100 --format mole --out exported/mole
    python launch/export.py --adapter runs/tiny/adapter --format hf --out exported/hf

``peft`` and ``merged`` need a plain-LoRA adapter (K=1); ``hf`` takes any adapter directory and
writes a model directory that ``AutoModelForImageTextToText.from_pretrained(dir,
trust_remote_code=True)`` loads without mole; ``mole`` takes any adapter directory, or a
DeepSpeed checkpoint (a ``step_<N>`` directory, a checkpoints root with ``latest``, or a run's
output_dir), whose files DeepSpeed unpickles: consolidate only checkpoints you trust.
"""

import argparse
import os
import sys

from mole.choices import DType, ExportFormat, options


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="mole adapter directory, or a DeepSpeed checkpoint for --format mole")
    parser.add_argument("--format", required=True, choices=options(ExportFormat))
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--base", help="base LLaVA directory for --format merged or hf (default: the adapter's base_model)")
    parser.add_argument("--dtype", choices=options(DType), default="fp32", help="weights of --format hf")
    parser.add_argument("--config", help="for a checkpoint: its mole_config.json or the run's config.yaml (default: found above it)")
    parser.add_argument("--allow-remote-base", action="store_true",
                        help="let a base that is not a local directory be downloaded from the Hugging Face Hub")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out!r} exists and is not a directory", file=sys.stderr)
        return 2

    from mole.adapter import AdapterError
    from mole.export import ExportError, export_merged, export_mole, export_peft
    from mole.hf_export import export_hf

    try:
        if args.format == "peft":
            written = ", ".join(export_peft(args.adapter, args.out))
        elif args.format == "merged":
            written = export_merged(args.adapter, args.out, args.base, args.allow_remote_base)
        elif args.format == "hf":
            written = export_hf(args.adapter, args.out, args.base, args.allow_remote_base, args.dtype)
        else:
            written = export_mole(args.adapter, args.out, args.config)
    except (AdapterError, ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
