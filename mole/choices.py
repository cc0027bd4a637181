"""Every closed set of choices a user can name, declared once as a ``Literal`` type.

The config schema types its fields with these, the command-line entry points build ``choices=`` from
them (:func:`options`), the adapter spec stores them, and the code that branches on them reads the
same names. Adding a routing mode is one edit here plus the code that implements it.

Nothing here imports torch: the config (and its exit-2-in-a-second errors) depends on this module.
"""

from __future__ import annotations

import typing
from typing import Literal

Routing = Literal["hard", "scaled", "dense", "domain"]
"""hard: top-1 expert, weight 1; scaled: top-1 times its router probability; dense: softmax-weighted
sum of every expert; domain: no router, every token of a sample goes to its domain's expert (one expert
per ``data.domains`` entry, weight 1): per-domain LoRA in one model, the oracle a learned router aims at."""

RouterInput = Literal["token", "prefix_mean"]
"""What a learned router reads: each token's own MLP input (token, the paper's), or the mean of its sample's
MLP inputs up to and including it (prefix_mean: causal, so a token is routed by everything its sample said
so far; a domain told once, by the image or a cue in the prompt, then reaches every later token's routing)."""

AuxLoss = Literal["switch", "per_sample"]
"""Load-balancing loss form: Switch Transformer (batch-level fractions) or the released code's per-sample form."""

ImageAspect = Literal["pad", "crop"]
"""How a non-square image reaches the vision tower: padded to a square, or centre-cropped."""

ImageBackend = Literal["fast", "processor"]
"""Who turns an image into pixels: mole's tensor path (checked against the processor) or the processor."""

ProcessorBackend = Literal["pil", "torchvision"]
"""Which backend of transformers' image processor runs: its PIL/NumPy class (``...ImageProcessorPil``) or its
torchvision-backed one (transformers' default when torchvision is importable)."""

Packing = Literal["none", "grouped", "packed"]
"""How samples become micro-batches: one per row padded to the longest (none), batched by similar length
(grouped), or several per row up to data.max_length tokens (packed); see mole/data/packing.py."""

AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
"""The backbone's attention (transformers' ``attn_implementation``); auto is flash_attention_2 where flash-attn
and a CUDA device are present, else sdpa."""

Family = Literal["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl"]
"""Backbone family an adapter is built on, named as its base config's ``model_type``: which modules
surgery finds and replaces."""

DYNAMIC_RESOLUTION: tuple[Family, ...] = ("qwen2_5_vl", "qwen3_vl")
"""Families whose image processor takes ``min_pixels`` / ``max_pixels`` (an image's pixel area bounds)."""
ANYRES: tuple[Family, ...] = ("llava_next", "llava_onevision")
"""Families that tile an image on the best of their ``image_grid_pinpoints`` resolutions (AnyRes)."""
ANYRES_MAX: tuple[Family, ...] = ("llava_onevision",)
"""Families whose features are downscaled beyond ``vision_aspect_ratio`` ``anyres_max_N`` tiles' worth."""

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""Training compute precision; auto is bf16 on a GPU and fp32 on a CPU."""

DType = Literal["fp32", "bf16", "fp16"]
"""A concrete floating-point type, by name (inference, export, benchmarks)."""

Optimizer = Literal["adamw", "sgd"]

NonFinitePolicy = Literal["stop", "skip"]
"""What a NaN/inf loss does: stop the run naming the step, or skip that micro-batch on every rank."""

ExportFormat = Literal["peft", "merged", "mole", "hf"]
"""peft: a peft LoRA directory (K=1); merged: LoRA merged into the base weights (K=1); mole: an adapter;
hf: base + adapter + a modelling file, a model directory plain transformers loads (any K)."""

Metric = Literal["exact_match", "normalized_match", "relaxed_accuracy", "anls", "vqa_accuracy", "closed_accuracy",
                 "open_recall"]
"""How a generated answer is scored against its references (:mod:`mole.scoring`): as written, VQAv2-normalised,
ChartQA relaxed accuracy, DocVQA ANLS, VQAv2 accuracy over several references, PathVQA yes/no accuracy and
open-answer recall."""

ResumeAcceptable = Literal["lora.alpha", "mole.routing", "mole.router_input", "model.name_or_path", "data.image_aspect", "data.image_backend",
                           "data.image_processor_backend", "data.min_pixels", "data.max_pixels",
                           "data.image_grid_pinpoints", "data.vision_aspect_ratio", "data.domains"]
"""The run settings that change what an adapter's saved weights compute (:data:`mole.spec.Impact`
``computation``): a resumed run keeps the checkpoint's unless ``train.resume_accept`` names them."""


def options(choice: typing.Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` type, in declaration order (for argparse ``choices=``)."""
    return typing.get_args(choice)
