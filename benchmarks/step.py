"""``step`` bench: one full ZeRO-3 training step of a LLaVA-shaped model, MoLE (K experts) vs plain LoRA (K=1).

``--backbone`` picks the family (:mod:`mole.backbones`) built at the preset's sizes: ``llava``
(default), ``llava_next`` or ``llava_onevision`` (one tile-size image per sample, AnyRes: two tiles),
``qwen2_5_vl`` or ``qwen3_vl`` (one image of the tile's size, one token per 2x2 patches).

The model is built locally with random weights at a preset size (``tiny`` for smoke tests, ``mid``
for 2 CPU ranks, ``7b`` for LLaVA-1.5-7B's shapes on a GPU), *partitioned while it is built*
(``deepspeed.zero.Init``), then given MoLE by :func:`mole.surgery.apply_mole` exactly as training does,
wrapped in :class:`mole.model.TrainingModel` and a DeepSpeed engine with torch AdamW. Both variants
live in each rank's process and run interleaved on the same batch: forward, backward, optimizer step.

With ``--ranks 2`` (default on CPU) the bench re-launches itself through the DeepSpeed launcher;
with ``--ranks 1`` (default on a GPU) it runs in this process. Rank 0 reports.

Model FLOPs of a step (for MFU), per micro-batch, not counting what each implementation skips:
frozen LLM weights 4 x params x tokens (forward + input gradient), trainable weights 6 x params x tokens
with only the chosen expert counted (top-1), attention 12 x layers x hidden x seq^2 per sequence
(QK^T and AV, forward and both input gradients, causal mask not discounted), and the frozen vision
tower 2 x params x image tokens plus its attention forward (nothing below it trains, so no gradient
flows into it). MFU = model FLOPs / (step time x the device's peak dense bf16 FLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks import interleaved, machine, print_table, summarize, synchronize, write_json, write_profile
from benchmarks.ragged import FULL_BUDGET, FULL_IMAGE_TOKENS
from mole.choices import DType, Family, Packing, Routing, options
from mole.config import DYNAMIC_RESOLUTION

PRESETS = {
    "tiny": dict(hidden=64, intermediate=172, layers=2, heads=4, vocab=512, vision_hidden=32,
                 vision_intermediate=64, vision_layers=1, vision_heads=2, image_size=28, patch=14, seq=32, batch=1),
    "mid": dict(hidden=1024, intermediate=2752, layers=8, heads=16, vocab=8192, vision_hidden=256,
                vision_intermediate=1024, vision_layers=2, vision_heads=4, image_size=112, patch=14, seq=256, batch=2),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32064, vision_hidden=1024,
               vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336, patch=14, seq=2048, batch=1),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), matched on the device name."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks step", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(PRESETS), default="mid")
    p.add_argument("--backbone", choices=options(Family), default="llava",
                   help="the family whose model is built at the preset's sizes (AnyRes families: one tile-size image)")
    for key in ("layers", "seq", "batch", "hidden", "intermediate", "heads", "vision_layers", "image_size"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the preset's {key}")
    p.add_argument("--experts", type=int, default=3, help="K of the MoLE variant (the baseline has K=1)")
    p.add_argument("--routing", choices=options(Routing), default="scaled")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank r (alpha = 2r) of experts and attention LoRA")
    p.add_argument("--ranks", type=int, default=1 if cuda else 2, help="data-parallel processes")
    p.add_argument("--dtype", choices=options(DType), default="bf16" if cuda else "fp32")
    p.add_argument("--ds-config", default=os.path.join(_repo_root(), "ds_configs", "zero3.json"))
    p.add_argument("--bucket-size", type=int, help="override the JSON's reduce and prefetch bucket sizes "
                   "(elements); each engine allocates such buffers, so a small machine needs smaller ones")
    p.add_argument("--packing", nargs="+", choices=options(Packing),
                   help="time these data.packing modes instead (MoLE in each, LoRA packed) on ragged samples shaped "
                        "like llava_v1_5_mix665k: --batch rows of --max-length tokens per micro-batch in every mode; "
                        "unless given, the image size makes an image LLaVA-1.5's share of --max-length (576 of 2,048)")
    p.add_argument("--max-length", type=int, help="data.max_length with --packing (default: 1,024 for mid, with "
                   "4 rows and 2 layers unless --batch and --layers say otherwise; else the preset's seq)")
    p.add_argument("--packing-buffer", type=int, default=64, help="data.packing_buffer with --packing")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: from the GPU's name)")
    p.add_argument("--profile", help="after timing, profile one more step per variant and write the tables here")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = dict(PRESETS[args.size])
    if args.packing:
        shape |= PACKING_SHAPES.get(args.size, {})
    for key in shape:
        if getattr(args, key, None) is not None:
            shape[key] = getattr(args, key)
    if args.packing:
        args.max_length = args.max_length or shape.get("max_length", shape["seq"])
        if args.image_size is None:
            shape["image_size"] = image_size_for(round(FULL_IMAGE_TOKENS * args.max_length / FULL_BUDGET), shape,
                                                 args.backbone)
    args.shape = shape
    return args


PACKING_SHAPES = {"mid": dict(max_length=1024, layers=2, batch=4)}
"""``--packing``'s defaults over the preset: 4 rows of 1,024 tokens, long enough for the mix's tail of
long conversations (a sample of the mix runs to 2,048 tokens with 576 image tokens; here to 1,024 with
289), with the layers 2 CPU cores run in minutes."""


def image_size_for(tokens: int, shape: dict, family: str) -> int:
    """The square image size (whole patches; an even number of them for Qwen-VL's 2x2 merge) whose
    image tokens in ``family`` come closest to ``tokens``."""
    step = 2 if family in DYNAMIC_RESOLUTION else 1
    sides = range(step, 256, step)
    side = min(sides, key=lambda n: abs(image_tokens({**shape, "image_size": n * shape["patch"]}, family) - tokens))
    return side * shape["patch"]


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.worker or args.ranks == 1:
        return run(args)
    return launch(argv, args)


def launch(argv: list[str], args: argparse.Namespace) -> dict:
    """Re-run this bench as ``args.ranks`` DeepSpeed ranks and return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
               "--master_port", str(_free_port()), "--module", "benchmarks.step",
               *_without_json(argv), "--worker", "--json", out]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"step bench ranks failed ({proc.returncode}): {' '.join(cmd)}")
        with open(out) as f:
            result = json.load(f)
    write_json(args.json, result)
    return result


def _without_json(argv: list[str]) -> list[str]:
    """``argv`` less ``--json OUT`` / ``--json=OUT``: the ranks write to the launcher's temporary file."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            kept.append(arg)
    return kept


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llava_config(shape: dict, family: str = "llava"):
    """The family's config at ``shape``: LLaVA-1.5 and LLaVA-NeXT a CLIP tower and a Llama LLM,
    OneVision a SigLIP tower and a Qwen2 LLM; the AnyRes grids start at one tile (a tile-size image
    takes that grid plus the whole-image tile)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig,
                              Qwen2Config, SiglipVisionConfig)

    vision_sizes = dict(hidden_size=shape["vision_hidden"], intermediate_size=shape["vision_intermediate"],
                        num_hidden_layers=shape["vision_layers"], num_attention_heads=shape["vision_heads"],
                        image_size=shape["image_size"], patch_size=shape["patch"])
    side = shape["image_size"]
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    if family == "llava_onevision":
        text = Qwen2Config(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
            max_position_embeddings=max(4096, shape["seq"]), tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=None,
        )
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision_sizes), text_config=text, image_token_id=shape["vocab"] - 1,
            video_token_id=shape["vocab"] - 2, image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
            vision_feature_select_strategy="full", projector_hidden_act="gelu",
        )
    vision = CLIPVisionConfig(**vision_sizes, projection_dim=shape["vision_hidden"], hidden_act="quick_gelu")
    text = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=max(4096, shape["seq"]), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,  # no padding_idx row to zero in a partitioned embedding
    )
    common = dict(vision_config=vision, text_config=text, image_token_id=shape["vocab"] - 1, projector_hidden_act="gelu",
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if family == "llava_next":
        return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    return LlavaConfig(**common, image_seq_length=image_tokens(shape))


def qwen_vl_config(shape: dict, family: str):
    """Qwen2.5-VL (window attention, the last of every 8 ViT blocks global) or Qwen3-VL (DeepStack from
    three ViT blocks) at ``shape``: the ViT at the preset's patch size with 2x2 merging, a Qwen2/Qwen3
    LLM with the real models' M-RoPE split of each head (16/24/24 of 64, 24/20/20 interleaved)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    vocab, layers, half = shape["vocab"], shape["vision_layers"], shape["hidden"] // shape["heads"] // 2
    ids = dict(image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
               vision_end_token_id=vocab - 4, tie_word_embeddings=False)
    text = dict(vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                max_position_embeddings=max(4096, shape["seq"]), tie_word_embeddings=False, bos_token_id=1,
                eos_token_id=2, pad_token_id=None)
    vision = dict(depth=layers, hidden_size=shape["vision_hidden"], intermediate_size=shape["vision_intermediate"],
                  num_heads=shape["vision_heads"], in_channels=3, patch_size=shape["patch"], spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=shape["hidden"])
    if family == "qwen2_5_vl":
        side = half * 3 // 8
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [half - 2 * side, side, side]}
        vision.update(hidden_act="silu", window_size=8 * shape["patch"], tokens_per_second=2,
                      fullatt_block_indexes=[i for i in range(layers) if i % 8 == 7] or [layers - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    side = half * 5 // 16
    text.update(head_dim=2 * half, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                                    "mrope_section": [half - 2 * side, side, side]})
    vision.update(hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                  deepstack_visual_indexes=sorted({min(layers - 1, i * layers // 3) for i in (1, 2, 3)}))
    return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)


def build_config(shape: dict, family: str):
    """The config the bench builds ``family`` from at ``shape``."""
    return qwen_vl_config(shape, family) if family in DYNAMIC_RESOLUTION else llava_config(shape, family)


def image_tokens(shape: dict, family: str = "llava") -> int:
    """Image tokens of one tile-size image: one tile's patches, or for an AnyRes family two tiles'
    (the grid's one and the whole image's) plus a newline per row, or for Qwen-VL one per 2x2 patches."""
    side = shape["image_size"] // shape["patch"]
    if family in DYNAMIC_RESOLUTION:
        return (side // 2) ** 2
    return side**2 if family == "llava" else 2 * side**2 + side


def make_batch(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0, family: str = "llava") -> dict:
    """One tile-size image per sample at the start of the sequence, random text after it, loss on the text."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq, n_img = shape["batch"], shape["seq"], image_tokens(shape, family)
    if seq <= n_img + 2:
        raise ValueError(f"seq {seq} leaves no room for text after {n_img} image tokens")
    ids = torch.randint(3, shape["vocab"] - 2, (batch, seq), generator=gen)
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = shape["vocab"] - 1
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    side = shape["image_size"] // shape["patch"]
    if family in DYNAMIC_RESOLUTION:  # every image's patches, flattened, and its grid
        pixels = torch.randn(batch * side * side, 3 * 2 * shape["patch"] ** 2, generator=gen)
    else:
        tiles = 1 if family == "llava" else 2
        pixels = torch.randn(batch * tiles, 3, shape["image_size"], shape["image_size"], generator=gen)
    out = {
        "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device), "pixel_values": pixels.to(device=device, dtype=dtype),
    }
    if family in DYNAMIC_RESOLUTION:
        out["image_sizes"] = torch.tensor([[1, side, side]] * batch, device=device)
    elif family != "llava":
        out["image_sizes"] = torch.tensor([[shape["image_size"]] * 2] * batch, device=device)
    return out


def sample_image(shape: dict, family: str):
    """A function making one tile-size image's inputs for one sample as the family's data path does
    (``Example.pixel_values``, ``image_size``): one (3, H, W) tile for LLaVA-1.5; the AnyRes grid's tile
    and the whole image's, with the image size, for LLaVA-NeXT and OneVision; Qwen-VL's flattened
    patches and their (1, h, w) grid. The same inputs as :func:`make_batch`'s, one sample at a time."""
    size, side = shape["image_size"], shape["image_size"] // shape["patch"]

    def make(gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        if family in DYNAMIC_RESOLUTION:
            return torch.randn(side * side, 3 * 2 * shape["patch"] ** 2, generator=gen), (1, side, side)
        if family == "llava":
            return torch.randn(3, size, size, generator=gen), None
        return torch.randn(2, 3, size, size, generator=gen), (size, size)
    return make


def bench_spec(base_config, num_experts: int, routing: str, rank: int, train_projector: bool):
    """The adapter both benches time: every attention and MLP projection adapted, alpha = 2r, as LLaVA-MoLE."""
    from mole.spec import AdapterSpec

    return AdapterSpec.from_base(base_config, num_experts=num_experts, routing=routing, aux_loss="switch", r=rank,
                                 alpha=2.0 * rank, dropout=0.05, attn_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                 mlp_targets=("gate_proj", "up_proj", "down_proj"), train_projector=train_projector)


def build_engine(args: argparse.Namespace, num_experts: int, ds_config: dict, dtype: torch.dtype):
    """A partitioned random LLaVA with MoLE surgery in a DeepSpeed engine, as the trainer builds one."""
    import deepspeed

    from mole.backbones import FAMILIES
    from mole.model import TrainingModel
    from mole.surgery import apply_mole
    from mole.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)  # the same frozen weights for every variant
    # No dtype argument: zero.Init takes it from the config's bf16/fp16 sections (its explicit dtype
    # argument turns fp32 into bf16 on a CPU accelerator in deepspeed 0.19).
    model_class, config = FAMILIES[args.backbone].model_class, build_config(args.shape, args.backbone)  # imported
    # outside zero.Init: it patches tensor constructors, which torch._dynamo's import-time checks refuse
    if args.backbone == "llava_onevision":  # SigLIP's weight init needs the whole tensors zero.Init has
        llava = model_class(config)        # already partitioned; deepspeed.initialize partitions it instead
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            llava = model_class(config)
    llava.config.use_cache = False
    torch.manual_seed(1)
    surgery = apply_mole(llava, bench_spec(llava.config, num_experts, args.routing, args.rank, train_projector=True))
    for module in llava.modules():  # new modules are created in fp32; match the backbone
        for param in module.parameters(recurse=False):
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
    model = TrainingModel(llava, surgery, "switch", 0.01)
    optimizer = build_optimizer(param_groups(model, 1e-4, 2e-5, FAMILIES[args.backbone]), "adamw", 1e-4,
                                weight_decay=0.01)  # as training builds it
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def filled_ds_config(args: argparse.Namespace, world_size: int) -> dict:
    from mole.config import Config
    from mole.ds_config import build_ds_config

    cfg = Config()
    cfg.train.ds_config = args.ds_config
    cfg.train.micro_batch_size = args.shape["batch"]
    cfg.train.precision = args.dtype
    ds = build_ds_config(cfg, world_size)
    if args.bucket_size:
        zero = ds["zero_optimization"]
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "allgather_bucket_size"):
            if key in zero:
                zero[key] = args.bucket_size
    return ds


@dataclass
class Counts:
    """Parameter counts that enter the FLOP formula (full sizes, whatever ZeRO-3 holds locally)."""

    llm_frozen: int  # LLM linear weights incl. lm_head (embeddings do no matmul)
    vision_frozen: int  # vision tower weights
    projector: int  # trainable projector
    adapter_active: int  # LoRA parameters one token uses: attention LoRA + one expert per projection
    router: int


def count_for_flops(model: torch.nn.Module, num_experts: int) -> Counts:
    llm_frozen = vision = projector = active = router = 0
    for name, param in model.named_parameters():
        numel = getattr(param, "ds_numel", param.numel())
        if "vision_tower" in name:
            vision += numel
        elif "multi_modal_projector" in name:
            projector += numel
        elif ".router." in name:
            router += numel
        elif ".experts." in name:
            active += numel // num_experts
        elif "lora_" in name:
            active += numel
        elif len(getattr(param, "ds_shape", param.shape)) == 2 and "embed_tokens" not in name:
            llm_frozen += numel
    return Counts(llm_frozen, vision, projector, active, router)


def step_flops(shape: dict, counts: Counts, family: str = "llava") -> float:
    """Model FLOPs of one micro-batch step, by the formula in the module docstring."""
    batch, seq, n_img = shape["batch"], shape["seq"], image_tokens(shape, family)
    tile_tokens = image_tokens(shape) + (family != "llava_onevision")  # CLIP adds a CLS token, SigLIP none
    tiles = 1 if family == "llava" else 2
    if family in DYNAMIC_RESOLUTION:  # one ViT token per patch, attention counted as global (Qwen2.5-VL's windows less)
        tile_tokens, tiles = (shape["image_size"] // shape["patch"]) ** 2, 1
    tokens, img_tokens = batch * seq, batch * tiles * tile_tokens
    vision_attention = 4 * shape["vision_layers"] * shape["vision_hidden"] * tile_tokens**2 * batch * tiles
    llm = 4 * counts.llm_frozen * tokens + 12 * shape["layers"] * shape["hidden"] * seq**2 * batch
    adapters = 6 * (counts.adapter_active + counts.router) * tokens + 6 * counts.projector * batch * n_img
    vision = 2 * counts.vision_frozen * img_tokens + vision_attention
    return float(llm + adapters + vision)


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_FLOPS.items():
            if key in name:
                return value
    return None


class _PhaseClock:
    """Laps of one step's phases; the device is synchronised at each lap (ZeRO-3 syncs there anyway)."""

    def __init__(self, device: torch.device):
        self.device, self.last = device, 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.last = time.perf_counter()

    def lap(self, into: list[float]) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        into.append(now - self.last)
        self.last = now


def run(args: argparse.Namespace) -> dict:
    """This rank's part of the bench; on a CPU its DeepSpeed shared-memory buffer is removed after it,
    as training does (69 MB of RAM per rank would otherwise stay in /dev/shm after every run)."""
    import torch.distributed as dist

    from mole.distributed import init_distributed, releasing_shared_memory

    info = init_distributed()
    dist.barrier()  # every rank past DeepSpeed's start-up (its peers' buffers open) before any may fail
    with releasing_shared_memory(info):
        return _measure(args, info)


def _measure(args: argparse.Namespace, info) -> dict:
    from mole.model import DTYPES

    if info.device.type == "cpu":  # ranks share the cores; oversubscribed threads spin against each other
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    dtype = DTYPES[args.dtype]
    ds_config = filled_ds_config(args, info.world_size)
    variants = {"lora": 1, "mole": args.experts}
    engines = {name: build_engine(args, k, ds_config, dtype) for name, k in variants.items()}
    if args.packing:
        return _measure_packing(args, info, engines, dtype)
    batch = make_batch(args.shape, info.device, dtype, seed=info.rank, family=args.backbone)

    phases = {name: {"forward": [], "backward": [], "optimizer": []} for name in engines}

    def step(name):
        engine, clock = engines[name], _PhaseClock(info.device)

        def go():
            clock.start()
            out = engine(**batch)
            clock.lap(phases[name]["forward"])
            engine.backward(out["loss"])
            clock.lap(phases[name]["backward"])
            engine.step()
            clock.lap(phases[name]["optimizer"])
        return go

    fns = {name: step(name) for name in engines}
    times = interleaved(fns, args.repeats, args.warmup, info.device)
    synchronize(info.device)
    result = summarize(times, baseline="lora")
    skip = args.warmup  # phase laps of the warm-up rounds are dropped like their step times
    result["phase_medians_s"] = {name: {k: round(statistics.median(v[skip:]), 6) for k, v in p.items()}
                                 for name, p in phases.items()}
    if args.profile:  # every rank takes the profiled steps (they hold collectives); rank 0 writes
        write_profile(args.profile if info.is_main else os.devnull, fns, info.device, result["medians_s"])
    peak = peak_flops(args, info.device)
    mfu = {}
    for name, engine in engines.items():
        counts = count_for_flops(engine.module, variants[name])
        flops = step_flops(args.shape, counts, args.backbone)
        achieved = flops / result["medians_s"][name]
        mfu[name] = {"model_flops_per_rank": flops, "achieved_tflops_per_rank": round(achieved / 1e12, 3),
                     "mfu": round(achieved / peak, 4) if peak else None, "param_counts": vars(counts)}
    result["mfu"] = mfu
    result["setup"] = {
        "bench": "step", "what": "forward + backward + AdamW step of a partitioned LLaVA under ZeRO-3, per rank",
        "size": args.size, "backbone": args.backbone, "shape": args.shape,
        "image_tokens": image_tokens(args.shape, args.backbone),
        "experts": args.experts, "routing": args.routing, "rank": args.rank, "alpha": 2 * args.rank,
        "ranks": info.world_size, "dtype": args.dtype, "ds_config": os.path.basename(args.ds_config),
        "bucket_size": args.bucket_size,
        "peak_flops": peak, "repeats": args.repeats, "warmup": args.warmup, "machine": machine(info.device),
        "memory_gib": round(torch.cuda.max_memory_allocated(info.device) / 2**30, 2) if info.device.type == "cuda" else None,
        "flop_formula": "frozen LLM 4*P*T; trainable (active expert only) 6*P*T; attention 12*L*h*s^2 per sequence; "
                        "frozen vision tower forward only 2*P*T_img + 4*L*h*s_img^2",
    }
    if info.is_main:
        print_table(result, "lora")
        for name, m in mfu.items():
            print(f"{name}: {m['achieved_tflops_per_rank']} TFLOP/s per rank, MFU {m['mfu']}")
        write_json(args.json, result)
    return result


def _measure_packing(args: argparse.Namespace, info, engines: dict, dtype: torch.dtype) -> dict:
    """``--packing``: MoLE in each mode and LoRA packed, interleaved, each call on its mode's next
    micro-batch of ragged samples (``benchmarks/ragged.py``); real tokens per second (all ranks) and
    the padding fraction of each, and the MoLE/LoRA step-time ratio with packing."""
    import torch.distributed as dist

    from benchmarks.ragged import mode_batches, ragged_examples
    from mole.data.collate import to_device

    shape, rounds, family = args.shape, args.warmup + args.repeats, args.backbone
    max_length = args.max_length
    examples = ragged_examples(rounds * shape["batch"] * 8 + args.packing_buffer, info.rank, max_length,
                               image_tokens(shape, family), sample_image(shape, family), shape["vocab"],
                               shape["vocab"] - 1)
    lora_mode = "packed" if "packed" in args.packing else args.packing[-1]
    runs = {f"mole/{mode}": ("mole", mode) for mode in args.packing} | {f"lora/{lora_mode}": ("lora", lora_mode)}
    batches = {mode: mode_batches(examples, mode, shape["batch"], max_length, args.packing_buffer, 0, rounds, info.rank)
               for mode in args.packing}
    counts = {name: [] for name in runs}  # (real tokens, slots) of each call

    def step(name):
        engine, mode = engines[runs[name][0]], runs[name][1]

        def go():
            batch = batches[mode][len(counts[name])]
            counts[name].append((batch["tokens"], batch["input_ids"].numel()))
            out = engine(**to_device(batch, info.device, pixel_dtype=dtype))
            engine.backward(out["loss"])
            engine.step()
        return go

    times = interleaved({name: step(name) for name in runs}, args.repeats, args.warmup, info.device)
    result = summarize(times, baseline=f"lora/{lora_mode}")
    totals = torch.tensor([[sum(c[0] for c in counts[n][args.warmup:]), sum(c[1] for c in counts[n][args.warmup:])]
                           for n in runs], dtype=torch.float64)  # (variants, 2): this rank's timed calls
    dist.all_reduce(totals)
    per_s = {n: totals[i, 0].item() / sum(times[n]) for i, n in enumerate(runs)}
    result["packing"] = {
        n: {"real_tokens_per_s": round(per_s[n], 1), "padding_fraction": round(1 - totals[i, 0].item() / totals[i, 1].item(), 4),
            "real_tokens_per_step": round(totals[i, 0].item() / args.repeats, 1),
            "vs_mole_none": round(per_s[n] / per_s["mole/none"], 3) if "mole/none" in per_s else None}
        for i, n in enumerate(runs)
    }
    result["setup"] = {
        "bench": "step --packing", "what": "forward + backward + AdamW step under ZeRO-3 per data.packing mode, "
        "ragged samples shaped like llava_v1_5_mix665k (benchmarks/ragged.py)", "size": args.size, "backbone": family,
        "shape": shape, "image_tokens": image_tokens(shape, family), "max_length": max_length, "rows": shape["batch"],
        "packing_buffer": args.packing_buffer, "experts": args.experts, "routing": args.routing, "rank": args.rank,
        "ranks": info.world_size, "dtype": args.dtype, "ds_config": os.path.basename(args.ds_config),
        "repeats": args.repeats, "warmup": args.warmup, "machine": machine(info.device),
    }
    if info.is_main:
        print(f"{'variant':14s} {'step s':>8s} {'real tok/s':>11s} {'padding':>8s} {'vs none':>8s}")
        for n, p in result["packing"].items():
            print(f"{n:14s} {result['medians_s'][n]:8.3f} {p['real_tokens_per_s']:11.1f} {p['padding_fraction']:8.3f} "
                  f"{p['vs_mole_none'] if p['vs_mole_none'] is not None else '':>8}")
        print(f"MoLE/LoRA step time, {lora_mode}: {result['ratios'].get(f'mole/{lora_mode}')}")
        write_json(args.json, result)
    return result


if __name__ == "__main__":  # the ranks run this module under the DeepSpeed launcher
    from mole.process_exit import exit_with

    def _run_and_report() -> None:
        main(sys.argv[1:])

    exit_with(_run_and_report)
