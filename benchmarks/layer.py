"""``layer`` bench: one LLaMA MLP block, forward + backward with the base frozen, MoLE vs its peers.

Variants, all on the same frozen weights, the same input and the same upstream gradient:

* ``base``: the bare frozen MLP (the input still needs its gradient, as inside a model);
* ``lora``: peft LoRA on gate/up/down (the baseline every ratio is taken against);
* ``mole``, ``mole_hard``, ``mole_scaled``: :class:`~mole.experts.MoleMLP`, top-1 of K experts;
  ``mole`` is the default routing mode (``scaled``) timed as its own variant, so the ``mole`` vs
  ``mole_scaled`` difference shows the bench's noise on identical code;
* ``dense``: MoleMLP in ``dense`` mode (every expert on every token, softmax-weighted);
* ``mixlora``: the ``mixlora`` package's ``MixLoraSparseMoe`` with ``top_k=1`` (skipped, with a note,
  when the optional package is not installed).

Every adapter uses rank ``r``, alpha ``2r`` and dropout 0.05 (MixLoRA refuses dropout 0). Defaults
are LLaVA-1.5-7B's MLP (hidden 4096, intermediate 11008), 256 tokens, K=3, r=128.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from benchmarks import add_clock_args, apply_threads, interleaved, machine, print_table, summarize, write_json, write_profile
from mole.choices import DType, Family, Routing, options
from mole.experts import MoleMLP, RoutingContext
from mole.model import DTYPES

VARIANTS = ("base", "lora", "mole", "mole_hard", "mole_scaled", "dense", "mixlora", "mole_loop")
CPU_VARIANTS = VARIANTS[:-1]
"""``mole_loop``: the default mode forced onto the per-expert loop (host-side counts). It differs from
``mole`` only where ``mole`` takes the grouped-GEMM path, a GPU, so it runs by default only there."""
DEFAULT_ROUTING: Routing = "scaled"
DROPOUT = 0.05
TINY_MODELS = Path(__file__).resolve().parents[1] / "models"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks layer", description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=128, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--backbone", choices=options(Family),
                   help="take hidden and intermediate from the family's bundled tiny model (models/tiny-<family>); "
                        "every family's LLM MLP is the same gated SiLU block")
    p.add_argument("--hidden", type=int, help="default 4096, or the --backbone's")
    p.add_argument("--intermediate", type=int, help="default 11008, or the --backbone's")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--repeats", type=int, default=12, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="uncounted rounds first")
    p.add_argument("--variants", help="comma-separated subset (lora is always run); default: all on a GPU, "
                   "all but mole_loop on a CPU")
    p.add_argument("--dtype", choices=options(DType), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    add_clock_args(p)
    p.add_argument("--profile", help="after timing, profile one more call per variant and write the tables here")
    args = p.parse_args(argv)
    sizes = {"hidden": 4096, "intermediate": 11008}
    if args.backbone:
        text = json.loads((TINY_MODELS / f"tiny-{args.backbone.replace('_', '-')}" / "config.json").read_text())["text_config"]
        sizes = {"hidden": text["hidden_size"], "intermediate": text["intermediate_size"]}
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def shared_mlp(base: LlamaMLP, config: LlamaConfig) -> LlamaMLP:
    """A new LlamaMLP module holding the *same* frozen weight tensors as ``base`` (no copy)."""
    with torch.device("meta"):
        mlp = LlamaMLP(config)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).weight = getattr(base, name).weight
    return mlp


def build_peft_lora(base: LlamaMLP, config: LlamaConfig, r: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.mlp = shared_mlp(base, config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=DROPOUT, target_modules=["gate_proj", "up_proj", "down_proj"])
    return inject_adapter_in_model(lora, holder).mlp


def build_mole(base: LlamaMLP, config: LlamaConfig, r: int, experts: int, routing: str, router: nn.Linear) -> MoleMLP:
    mlp = MoleMLP(shared_mlp(base, config), config.hidden_size, experts, r, alpha=2 * r, dropout=DROPOUT,
                  routing=routing, context=RoutingContext())
    if mlp.router is not None:  # K=1 (--experts 1) is plain LoRA on our code: no router
        mlp.router.load_state_dict(router.state_dict())
    return mlp


class MixLoraLayer(nn.Module):
    """``mixlora.model.MixLoraSparseMoe`` built as its ``_inject_mlp_module`` builds it, made trainable.

    MixLoRA keeps its router as a plain tensor (``gate_``) and its experts in a dict, because it loads
    trained adapters for inference; here the router is a Parameter and the experts' LoRA matrices and
    dropouts are registered submodules, so the optimizer, autograd and ``.eval()`` see them. Its
    forward is the package's own.
    """

    def __init__(self, base_mlp: LlamaMLP, r: int, experts: int, router: nn.Linear, dtype: torch.dtype):
        super().__init__()
        from mixlora.config import MixLoraConfig
        from mixlora.lora_linear import LoraLinear
        from mixlora.model import MixLoraSparseMoe

        cfg = MixLoraConfig(
            dtype_=dtype, model_type_="llama", routing_strategy_="mixlora", lora_init_="original",
            lora_r_=r, lora_alpha_=2 * r, lora_dropout_=DROPOUT, num_experts_=experts, top_k_=1,
            act_fn_="silu", jitter_noise_=0.0, use_dora_=False, use_rslora_=False,
            target_modules_={"gate_proj": True, "up_proj": True, "down_proj": True},
        )
        self.moe = MixLoraSparseMoe(base_mlp, cfg)
        self.gate = nn.Parameter(router.weight.detach().clone().to(dtype))
        self.moe.gate_ = self.gate
        self.lora = nn.ModuleDict()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for e in range(experts):
                expert = LoraLinear(getattr(base_mlp, proj), cfg)
                self.moe.experts_[f"experts.{e}.{proj}"] = expert
                # the dropout too, so that .eval() reaches it (not the LoraLinear: it holds the frozen base)
                self.lora[f"{proj}_{e}"] = nn.ModuleDict({"lora_A": expert.lora_A, "lora_B": expert.lora_B,
                                                          "dropout": expert.dropout_})
        self.base_mlp = base_mlp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden)


def build_variants(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """Modules per variant and notes on variants that could not be built."""
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, hidden_act="silu")
    torch.manual_seed(args.seed)
    base = LlamaMLP(config).to(device=device, dtype=dtype)
    router = nn.Linear(args.hidden, args.experts, bias=True)
    chosen = args.variants.split(",") if args.variants else (VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    wanted = [v for v in VARIANTS if v in chosen or v == "lora"]
    modules, notes = {}, {}
    for name in wanted:
        torch.manual_seed(args.seed + 1)  # every adapter starts from the same draws
        if name == "base":
            module = shared_mlp(base, config)
        elif name == "lora":
            module = build_peft_lora(base, config, args.rank)
        elif name == "mixlora":
            try:
                module = MixLoraLayer(shared_mlp(base, config), args.rank, args.experts, router, dtype)
            except ImportError as e:
                notes[name] = f"skipped: optional package mixlora not importable ({e}); pip install --no-deps mixlora"
                continue
        else:
            routing = {"mole": DEFAULT_ROUTING, "mole_hard": "hard", "mole_scaled": "scaled", "dense": "dense",
                       "mole_loop": DEFAULT_ROUTING}[name]
            module = build_mole(base, config, args.rank, args.experts, routing, router)
            if name == "mole_loop":
                module.grouped_mm = "never"
        module = module.to(device=device, dtype=dtype).train()
        for pname, param in module.named_parameters():
            param.requires_grad_(is_adapter(pname))
            if "lora_B" in pname:  # B starts at zero; non-zero B makes every gradient path real
                with torch.no_grad():
                    param.normal_(std=1.0 / math.sqrt(args.rank))
        modules[name] = module
    return modules, notes


def is_adapter(name: str) -> bool:
    """Adapter parameters (trainable) by name; everything else is the frozen base."""
    return "lora" in name or "router" in name or name == "gate"


def trainable_params(modules: dict) -> dict:
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in modules.items()}


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    modules, notes = build_variants(args, device, dtype)
    torch.manual_seed(args.seed + 2)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)

    def step(module: nn.Module):
        def run():
            out = module(x)
            getattr(module, "stats", None)  # MoLE computes its routing statistics when read; training reads them every step
            out.backward(grad_out)
            x.grad = None
            for param in module.parameters():
                param.grad = None
        return run

    fns = {name: step(m) for name, m in modules.items()}
    times = interleaved(fns, args.repeats, args.warmup, device, args.clock)
    result = summarize(times, baseline="lora")
    if args.profile:
        write_profile(args.profile, fns, device, result["medians_s"])
    result["setup"] = {
        "bench": "layer", "what": "one MLP block forward + backward, base frozen, input requires grad",
        "backbone": args.backbone, "tokens": args.tokens, "hidden": args.hidden, "intermediate": args.intermediate,
        "experts": args.experts, "rank": args.rank, "alpha": 2 * args.rank, "dropout": DROPOUT,
        "dtype": args.dtype, "default_routing": DEFAULT_ROUTING, "repeats": args.repeats, "warmup": args.warmup, "clock": args.clock,
        "trainable_params": trainable_params(modules), "machine": machine(device), "notes": notes,
    }
    print_table(result, "lora")
    for name, note in notes.items():
        print(f"{name}: {note}")
    write_json(args.json, result)
    return result
