"""``generate`` bench: tokens/s of Hugging Face ``generate`` with the KV cache, MoLE (K experts) vs plain LoRA (K=1).

Both models are the same random LLaVA (a preset of :mod:`benchmarks.step`) given MoLE by
:func:`mole.surgery.apply_mole` directly, in eval mode, with non-zero LoRA B matrices so every expert
changes the output. Each call prefills one image plus a text prompt per sample, then decodes exactly
``--new-tokens`` tokens greedily (``min_new_tokens`` = ``max_new_tokens``); the variants alternate.
The reported ratio is time / plain-LoRA time (so tokens/s of MoLE = tokens/s of LoRA / ratio).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import add_clock_args, apply_threads, interleaved, machine, print_table, summarize
from benchmarks import write_json
from benchmarks.step import PRESETS, bench_spec, image_tokens, llava_config
from mole.choices import DType, Routing, options
from mole.model import DTYPES


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks generate", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(PRESETS), default="mid")
    p.add_argument("--layers", type=int, help="override the preset's LLM layer count")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--routing", choices=options(Routing), default="scaled")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--dtype", choices=options(DType), default="bf16" if cuda else "fp32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="write the result here")
    add_clock_args(p)
    args = p.parse_args(argv)
    args.shape = dict(PRESETS[args.size])
    if args.layers:
        args.shape["layers"] = args.layers
    return args


def build_model(args: argparse.Namespace, num_experts: int, device: torch.device, dtype: torch.dtype):
    """The preset's random LLaVA on ``device`` in ``dtype`` (built there directly), with MoLE surgery."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from mole.surgery import apply_mole

    torch.manual_seed(0)  # the same frozen weights for every variant
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(llava_config(args.shape))
    finally:
        torch.set_default_dtype(default)
    torch.manual_seed(1)
    apply_mole(model, bench_spec(model.config, num_experts, args.routing, args.rank, train_projector=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0 / args.rank)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model.to(device=device, dtype=dtype).eval()


def make_prompt(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    shape, gen = args.shape, torch.Generator().manual_seed(0)
    n_img = image_tokens(shape)
    ids = torch.randint(3, shape["vocab"] - 2, (args.batch, 1 + n_img + args.prompt_tokens), generator=gen)
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = shape["vocab"] - 1
    pixels = torch.randn(args.batch, 3, shape["image_size"], shape["image_size"], generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    apply_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    models = {"lora": build_model(args, 1, device, dtype), "mole": build_model(args, args.experts, device, dtype)}
    prompt = make_prompt(args, device, dtype)
    produced = {}

    def generate(name):
        def go():
            with torch.inference_mode():
                out = models[name].generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                            do_sample=False, use_cache=True)
            produced[name] = out.shape[1] - prompt["input_ids"].shape[1]
        return go

    times = interleaved({name: generate(name) for name in models}, args.repeats, args.warmup, device, args.clock)
    result = summarize(times, baseline="lora")
    new_tokens = args.batch * args.new_tokens
    result["tokens_per_s"] = {name: round(new_tokens / m, 2) for name, m in result["medians_s"].items()}
    result["setup"] = {
        "bench": "generate", "what": "HF generate, greedy, KV cache: prefill (image + prompt) then decode",
        "size": args.size, "shape": args.shape, "batch": args.batch, "prompt_tokens": 1 + image_tokens(args.shape) + args.prompt_tokens,
        "new_tokens": args.new_tokens, "produced_tokens": produced, "experts": args.experts, "routing": args.routing,
        "rank": args.rank, "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup, "clock": args.clock, "machine": machine(device),
    }
    if any(n != args.new_tokens for n in produced.values()):
        raise RuntimeError(f"generate stopped early: {produced} new tokens, wanted {args.new_tokens}")
    print_table(result, "lora")
    print("tokens/s:", result["tokens_per_s"])
    write_json(args.json, result)
    return result
