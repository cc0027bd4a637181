"""``ops`` bench: the aten ops one MLP block dispatches per call, MoLE vs its peers (a count, no clock).

Where a GPU waits on its host (an MLP block of a few thousand tokens on an H100, a decode step), the
time a layer takes is the host's: Python, autograd and one dispatch per op, most a kernel launch.
This bench counts those dispatches, with the ``layer`` bench's variants on the same shapes, for a
training call (``--layers`` blocks, each its own module as in a model, chained by residual adds as
decoder layers are, the switch balance loss over their routing statistics as training computes it,
backward through both; reported per block, so the loss's per-model part is shared as in a real
model, and each block's count includes its residual add and that add's gradient) and an eval-mode no-grad forward of a prefill and of one decoded token. Views
(``t``, ``view``, ``expand``...) are left out: they launch nothing; allocations (``empty_like``) are
counted: they cost the host a dispatch without launching a kernel. A count does not depend on the
machine's speed or load, so a change to the layer shows its effect on host work exactly, on a CPU too.
It does depend on the device where an op dispatches differently: dropout is four dispatches on a CPU
and one fused op on a GPU.

MoLE variants run on the grouped-GEMM path, a GPU's default (forced on a CPU where torch has a CPU
``torch._grouped_mm`` and the widths are multiples of 8; otherwise the per-expert loop, noted in
``setup``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import layer as layer_bench
from benchmarks import machine, write_json
from mole.balance import switch_loss
from mole.choices import DType, options
from mole.expert_kernels import grouped_mm_runs_on_cpu
from mole.experts import MoleMLP
from mole.model import DTYPES

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
    p = argparse.ArgumentParser(prog="python -m benchmarks ops", description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r); counts do not depend on it")
    p.add_argument("--tokens", type=int, default=64, help="prefill and training tokens (one sequence)")
    p.add_argument("--hidden", type=int, default=64, help="counts do not depend on the widths")
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--layers", type=int, default=32, help="blocks per training call (LLaVA-1.5-7B: 32); counts are per block")
    p.add_argument("--dtype", choices=options(DType), default="bf16",
                   help="bf16, as on a GPU (casts of the fp32 router output count), or fp32")
    p.add_argument("--variants", help="comma-separated subset (lora is always run); default: every CPU variant "
                   "of the layer bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    layer_args = layer_bench.parse_args([
        "--rank", str(args.rank), "--tokens", str(args.tokens), "--hidden", str(args.hidden),
        "--intermediate", str(args.intermediate), "--experts", str(args.experts), "--device", "cpu",
        "--seed", str(args.seed), "--dtype", args.dtype, *(["--variants", args.variants] if args.variants else []),
    ])
    dtype = DTYPES[args.dtype]
    # one module per block, as in a model: a module reused for every block would accumulate each
    # parameter's gradient over the blocks (adds a model does not do) and hide per-module work
    stacks = [layer_bench.build_variants(layer_args, torch.device("cpu"), dtype) for _ in range(args.layers)]
    notes = stacks[0][1]
    blocks_of = {name: [modules[name] for modules, _ in stacks] for name in stacks[0][0]}
    # the grouped GEMM needs 16-byte rows (bf16: widths a multiple of 8), as on a GPU
    aligned = all(width % 8 == 0 for width in (args.hidden, args.intermediate, args.rank))
    dispatch = "grouped" if grouped_mm_runs_on_cpu() and aligned else "loop"
    for blocks in blocks_of.values():
        for module in blocks:
            if isinstance(module, MoleMLP) and dispatch == "grouped":
                module.grouped_mm = "always"
    torch.manual_seed(args.seed + 2)
    x = torch.randn(1, args.tokens, args.hidden, dtype=dtype, requires_grad=True)
    token = torch.randn(1, 1, args.hidden, dtype=dtype)

    def train(blocks):
        hidden, stats = x, []
        for module in blocks:
            module.train()
            # the residual keeps the activations, and so the routing, alive through the blocks
            hidden = hidden + module(hidden)
            if getattr(module, "stats", None) is not None:
                stats.append(module.stats)
        loss = hidden.float().sum()
        if stats:  # training adds the balance loss over every layer's routing statistics
            loss = loss + 0.01 * switch_loss(stats)
        loss.backward()
        x.grad = None
        for module in blocks:
            for param in module.parameters():
                param.grad = None

    @torch.no_grad()
    def infer(module, hidden):
        module.eval()  # no dropout, as in generation
        module(hidden)

    counts: dict[str, dict[str, float]] = {}  # per block
    per_op: dict[str, dict[str, dict[str, float]]] = {}
    for name, blocks in blocks_of.items():
        phases = {"train": lambda b=blocks: train(b),
                  "prefill": lambda m=blocks[0]: infer(m, x),
                  "decode": lambda m=blocks[0]: infer(m, token)}
        ops = {phase: count_ops(fn) for phase, fn in phases.items()}
        blocks = {"train": args.layers, "prefill": 1, "decode": 1}
        counts[name] = {phase: round(sum(c.values()) / blocks[phase], 2) for phase, c in ops.items()}
        per_op[name] = {phase: {op: round(n / blocks[phase], 2) for op, n in sorted(c.items())} for phase, c in ops.items()}
    result = {
        "ratios": {name: c["train"] / counts["lora"]["train"] for name, c in counts.items()},
        "counts": counts,
        "per_op": per_op,
        "setup": {
            "bench": "ops", "what": "aten ops (views excluded) per MLP block, training with its residual add; "
                                    "ratios are of training counts",
            "tokens": args.tokens, "hidden": args.hidden, "intermediate": args.intermediate,
            "experts": args.experts, "rank": args.rank, "layers": args.layers, "dropout": layer_bench.DROPOUT, "dtype": args.dtype,
            "mole_dispatch": dispatch, "torch": torch.__version__, "machine": machine(torch.device("cpu")),
            "notes": notes,
        },
    }
    print(f"{'variant':14s} {'train':>7s} {'prefill':>8s} {'decode':>7s}  train/lora   (dispatches per block)")
    for name, c in counts.items():
        print(f"{name:14s} {c['train']:7.2f} {c['prefill']:8g} {c['decode']:7g}  {result['ratios'][name]:.3f}")
    for name, note in notes.items():
        print(f"{name}: {note}")
    write_json(args.json, result)
    return result
