"""``ops`` bench: the aten ops one MLP block dispatches per call, MoLE vs its peers (a count, no clock).

Where a GPU waits on its host (an MLP block of a few thousand tokens on an H100, a decode step), the
time a layer takes is the host's: Python, autograd and one dispatch per op, each op a kernel launch.
This bench counts those dispatches, with the ``layer`` bench's variants on the same shapes, for a
training call (forward, the routing statistics training reads, backward) and an eval-mode no-grad
forward of a prefill and of one decoded token. Views (``t``, ``view``, ``expand``...) are left out: they launch
nothing. Counts do not depend on the machine or its load, so a change to the layer shows its effect
on host work exactly, on a CPU too.

MoLE variants run on the grouped-GEMM path, a GPU's default (forced on a CPU where torch has a CPU
``torch._grouped_mm``; otherwise the per-expert loop, noted in ``setup``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mole.bench import write_json
from mole.bench import layer as layer_bench
from mole.experts import MoleMLP

PHASES = ("train", "prefill", "decode")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, views and pure aliases excepted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ != "_unsafe_view":
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> Counter:
    """Ops of one call of ``fn``, after one uncounted call (lazy initialisation is not per-call work)."""
    fn()
    with OpCounter() as counter:
        fn()
    return counter.ops


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py ops", description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r); counts do not depend on it")
    p.add_argument("--tokens", type=int, default=64, help="prefill and training tokens (one sequence)")
    p.add_argument("--hidden", type=int, default=64, help="counts do not depend on the widths")
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--variants", help="comma-separated subset (lora is always run); default: every CPU variant "
                   "of the layer bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    return p.parse_args(argv)


def _grouped_mm_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 8), offs=torch.tensor([1, 4], dtype=torch.int32))
    except (AttributeError, TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    layer_args = layer_bench.parse_args([
        "--rank", str(args.rank), "--tokens", str(args.tokens), "--hidden", str(args.hidden),
        "--intermediate", str(args.intermediate), "--experts", str(args.experts), "--device", "cpu",
        "--seed", str(args.seed), *(["--variants", args.variants] if args.variants else []),
    ])
    modules, notes = layer_bench.build_variants(layer_args, torch.device("cpu"), torch.float32)
    dispatch = "grouped" if _grouped_mm_on_cpu() else "loop"
    for module in modules.values():
        if isinstance(module, MoleMLP) and dispatch == "grouped":
            module.grouped_mm = "always"
    torch.manual_seed(args.seed + 2)
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    token = torch.randn(1, 1, args.hidden)

    def train(module):
        module.train()
        out = module(x)
        getattr(module, "stats", None)  # training reads the routing statistics every step
        out.backward(torch.ones_like(out))
        x.grad = None
        for param in module.parameters():
            param.grad = None

    @torch.no_grad()
    def infer(module, hidden):
        module.eval()  # no dropout, as in generation
        module(hidden)

    counts: dict[str, dict[str, int]] = {}
    per_op: dict[str, dict[str, dict[str, int]]] = {}
    for name, module in modules.items():
        phases = {"train": lambda m=module: train(m),
                  "prefill": lambda m=module: infer(m, x),
                  "decode": lambda m=module: infer(m, token)}
        ops = {phase: count_ops(fn) for phase, fn in phases.items()}
        counts[name] = {phase: sum(c.values()) for phase, c in ops.items()}
        per_op[name] = {phase: dict(sorted(c.items())) for phase, c in ops.items()}
    result = {
        "ratios": {name: c["train"] / counts["lora"]["train"] for name, c in counts.items()},
        "counts": counts,
        "per_op": per_op,
        "setup": {
            "bench": "ops", "what": "aten ops (views excluded) per call of one MLP block; ratios are training calls",
            "tokens": args.tokens, "hidden": args.hidden, "intermediate": args.intermediate,
            "experts": args.experts, "rank": args.rank, "dropout": layer_bench.DROPOUT,
            "mole_dispatch": dispatch, "torch": torch.__version__, "notes": notes,
        },
    }
    print(f"{'variant':14s} {'train':>6s} {'prefill':>8s} {'decode':>7s}  train/lora")
    for name, c in counts.items():
        print(f"{name:14s} {c['train']:6d} {c['prefill']:8d} {c['decode']:7d}  {result['ratios'][name]:.3f}")
    for name, note in notes.items():
        print(f"{name}: {note}")
    write_json(args.json, result)
    return result
