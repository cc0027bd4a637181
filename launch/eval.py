"""Evaluate a trained adapter per domain on held-out shards: answer loss, answer accuracy, routing NMI.

    python launch/eval.py --adapter runs/tiny/adapter                      # one process
    torchrun --nproc_per_node 2 launch/eval.py --adapter runs/tiny/adapter # data sharded over ranks
    deepspeed --num_gpus 2 launch/eval.py --adapter runs/tiny/adapter      # the same, DeepSpeed's launcher

Every rank loads a full model copy (no ZeRO). By default the domains are the bundled ones, read from
``<data-root>/<name>/<split>-*.tar``; ``--shards NAME=PATTERN`` (repeatable) names the domains and
their shards instead. ``--metric NAME=METRIC[,METRIC]`` (repeatable) chooses a domain's benchmark
metrics (``charts=relaxed_accuracy``, ``docs=anls``; ``mole.scoring``), normalized_match otherwise. Rank 0 prints the table and writes ``metrics.json``, ``predictions.jsonl`` and
(K>1) ``routing.png`` to ``--out`` (default: ``eval/`` next to the adapter directory). An adapter trained
with ``mole.routing: domain`` needs ``--domain NAME``: that domain's expert answers every evaluated domain.
"""

import argparse
import contextlib
import os
import sys

from mole.choices import Metric, options
from mole.cli import add_adapter_args, add_preparation_args
from mole.process_exit import exit_with


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_adapter_args(parser)
    parser.add_argument("--split", default="test", help="shard prefix for the default domains (default: test)")
    parser.add_argument("--data-root", default="data_shards", help="root of the default domains' shards, relative to the working directory")
    parser.add_argument("--domains", nargs="+", default=["shapes", "charts", "tissue"], help="default domain names")
    parser.add_argument("--shards", action="append", default=[], metavar="NAME=PATTERN",
                        help="a domain and its shards (glob or brace pattern); replaces the default domains")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME=METRIC[,METRIC]",
                        help=f"a domain's metrics, one or more of: {', '.join(options(Metric))} (default: normalized_match)")
    parser.add_argument("--max-samples", type=int, help="samples per domain (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=2048, help="token budget per sample, image tokens included")
    add_preparation_args(parser, device_help="default: this rank's GPU if there is one, else cpu")
    parser.add_argument("--out", help="output directory (default: eval/ next to the adapter directory)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)
    for option in ("max_samples", "batch_size", "max_new_tokens", "max_length"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    return args


def eval_domains(args: argparse.Namespace):
    from mole.evaluate import expand_eval_shards
    from mole.scoring import DEFAULT_METRICS, parse_metric_choices

    if args.shards:
        pairs = [item.split("=", 1) for item in args.shards]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            raise ValueError(f"--shards takes NAME=PATTERN, got {args.shards}")
    else:
        if not os.path.isdir(args.data_root):
            raise ValueError(f"--data-root {args.data_root!r} is not a directory (relative paths start at the working "
                             f"directory {os.getcwd()!r}; run from the repository root or pass --data-root or --shards)")
        pairs = [(name, os.path.join(args.data_root, name, f"{args.split}-*.tar")) for name in args.domains]
    metrics = parse_metric_choices(args.metric, [name for name, _ in pairs])
    return [expand_eval_shards(name, pattern, metrics.get(name, DEFAULT_METRICS)) for name, pattern in pairs]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out!r} exists and is not a directory", file=sys.stderr)
        return 2
    import torch

    from mole.adapter import AdapterError, read_adapter_spec
    from mole.adapter_check import resolve_base
    from mole.cli import chosen_domain
    from mole.evaluate import evaluate, format_table, save_results
    from mole.inference import load_model, load_processor

    try:
        domains = eval_domains(args)
        spec = read_adapter_spec(args.adapter)
        chosen_domain(spec, args.domain)
        route = {domain.name: args.domain for domain in domains} if args.domain else None
        named_by = "--base" if args.base else f"base_model in {os.path.join(args.adapter, 'mole_config.json')}"
        base = resolve_base(args.base or spec.base_model, named_by, args.allow_remote_base)
        image = spec.image.overridden(args.image_aspect, args.image_backend)
    except (AdapterError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    rank, world_size = 0, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cleanup = contextlib.nullcontext()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mole.distributed import init_distributed, releasing_shared_memory

        info = init_distributed()
        rank, world_size, device = info.rank, info.world_size, info.device
        cleanup = releasing_shared_memory(info)  # under the deepspeed launcher, 69 MB per rank in /dev/shm
    try:  # an adapter that does not fit the base fails every rank alike, inside the cleanup
        with cleanup:
            if args.device:
                device = torch.device(args.device)
            model = load_model(base, args.adapter, device=device, dtype=args.dtype)
            processor = load_processor(base, adapter_dir=args.adapter)
            results = evaluate(
                model, processor, domains,
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_samples=args.max_samples,
                max_length=args.max_length, image_aspect=image.aspect, image_backend=image.backend, rank=rank,
                world_size=world_size, route=route,
            )
            if rank == 0:
                results["adapter"], results["base"], results["world_size"] = os.path.abspath(args.adapter), os.path.abspath(base), world_size
                results["adapter_config"] = spec.to_dict()
                out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.adapter)), "eval")
                name = os.path.join(*os.path.abspath(args.adapter).split(os.sep)[-2:])
                routed = f" {args.domain}" if args.domain else ""
                title = f"{name} (K={spec.num_experts}, {spec.routing}{routed}): share of each domain's tokens per expert"
                paths = save_results(results, out, title)
                print(f"adapter {os.path.abspath(args.adapter)} (K={spec.num_experts}, routing {spec.routing}), "
                      f"{world_size} rank(s)")
                print(format_table(results))
                print("wrote " + ", ".join(paths))
            if world_size > 1:
                import torch.distributed as dist

                dist.barrier()
                dist.destroy_process_group()
            return 0
    except AdapterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_with(lambda: main(sys.argv[1:]))
