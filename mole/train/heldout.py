"""Held-out loss per domain during training, on each domain's ``val_shards``, and with
``train.eval_max_new_tokens`` the domain's metrics (``data.domains[].metric``, :mod:`mole.scoring`) on
greedily generated answers.

Every rank reads the same validation samples in the same order and takes its share (usable sample i
goes to rank i mod world size, :mod:`mole.data.examples`). Ranks may hold different numbers of
batches, but under ZeRO-3 every forward is a sequence of collectives, so every rank runs the same
number of forwards: ranks that run out repeat a batch with weight zero. Generation keeps them in step
the same way: as many ``generate`` calls on every rank, each running until every rank's batch is done
(``synced_gpus``), each starting from :meth:`~mole.model.TrainingModel.prefill_inputs`, which runs the
vision tower whether or not the batch has an image (for an M-RoPE family, Qwen-VL, beside the token ids
from which the model numbers its positions). Each rank's answers go to its log (``logs/rank<N>.jsonl``,
``"event": "heldout_answers"``) by sample key and turn, as ``launch/eval.py`` lists its predictions.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mole.config import Config, ConfigError
from mole.data.collate import collate, to_device
from mole.data.conversation import IGNORE_INDEX
from mole.data.examples import shard_examples
from mole.data.sample import SampleProcessor
from mole.data.shards import expand_shards
from mole.distributed import DistInfo
from mole.evaluate import questions
from mole.inference import Prompt, PromptEncoder, decode_answers
from mole.scoring import score

log = logging.getLogger("mole.train")  # its warnings are the trainer's start-up lines


@dataclass
class HeldoutSet:
    """One domain's held-out data on this rank: the loss batches and, when answers are generated, every
    answer turn as a question with its references and its ``(sample key, turn)``, scored by ``metrics``."""

    batches: list[dict]
    prompts: list[Prompt] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    turns: list[tuple[str, int]] = field(default_factory=list)
    metrics: tuple[str, ...] = ()
    domain: int = 0  # the domain's index in data.domains (its expert under routing domain)


def heldout_sets(cfg: Config, process: SampleProcessor, pad_token_id: int, info: DistInfo) -> dict[str, HeldoutSet]:
    """Held-out sets per domain with ``val_shards``, read once (they are small by design).

    Every rank must hold a batch of each domain (the forwards are collectives), and a question when
    answers are generated: checked now, on all ranks alike, rather than at the first evaluation on one
    of them.
    """
    if not cfg.train.eval_every:
        return {}
    generate = cfg.train.eval_max_new_tokens > 0
    if generate:  # the same samples, keeping their images to build the questions' prompts from
        process = copy.copy(process)
        process.keep_image = True
    sets = {}
    for index, domain in enumerate(cfg.data.domains):
        if domain.val_shards is None:
            continue
        urls = expand_shards(domain.name, domain.val_shards)
        sets[domain.name] = heldout_set(urls, process, cfg.train.micro_batch_size, pad_token_id, cfg.train.eval_batches,
                                        info.rank, info.world_size, domain.metrics if generate else (), index)
    if not sets and info.is_main:
        log.warning("train.eval_every is set but no domain has val_shards: nothing to evaluate")
    fewest = torch.tensor([[len(held.batches), len(held.prompts) if generate else 1] for held in sets.values()],
                          dtype=torch.long).reshape(-1, 2)
    if dist.is_initialized() and len(fewest):
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
    for (name, _), (batches, prompts) in zip(sets.items(), fewest.tolist()):
        index = next(i for i, d in enumerate(cfg.data.domains) if d.name == name)
        if batches == 0:
            raise ConfigError(f"data.domains[{index}].val_shards: domain {name!r} has fewer usable held-out samples "
                              f"than the {info.world_size} ranks that share them", f"data.domains[{index}].val_shards")
        if prompts == 0:
            raise ConfigError(f"data.domains[{index}].val_shards: a rank's share of domain {name!r}'s held-out samples "
                              "has no question (an answer after a user turn) to generate an answer to",
                              f"data.domains[{index}].val_shards")
    return sets


def heldout_set(urls: list[str], process: SampleProcessor, batch_size: int, pad_token_id: int, max_batches: int,
                rank: int, world_size: int, metrics: tuple[str, ...] = (), domain: int = 0) -> HeldoutSet:
    """This rank's share of the first ``max_batches * batch_size * world_size`` usable samples of domain
    number ``domain``, batched, with their questions when ``metrics`` are."""
    examples = list(shard_examples(urls, process, Counter(), domain=domain, rank=rank, world_size=world_size,
                                   limit=max_batches * batch_size * world_size, deal="usable"))
    held = HeldoutSet([collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)],
                      metrics=metrics, domain=domain)
    if metrics:
        for example in examples:
            prompts, references = questions(example)
            held.prompts += prompts
            held.references += references
            held.turns += [(example.key, turn) for turn in range(len(prompts))]
    return held


@torch.no_grad()
def heldout_loss(engine, batches: list[dict], device: torch.device) -> float:
    """Token-weighted mean answer loss over all ranks' batches (the same forwards on every rank)."""
    count = torch.tensor([len(batches)], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    total = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, tokens)
    was_training = engine.training
    engine.eval()
    for i in range(int(count)):
        batch = batches[min(i, len(batches) - 1)] if batches else None
        if batch is None:
            raise RuntimeError("a rank has no held-out batch; every domain needs at least world_size samples")
        out = engine(**to_device(batch, device))
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        weight = 1.0 if i < len(batches) else 0.0
        total += torch.tensor([float(out["lm_loss"]) * tokens * weight, tokens * weight], dtype=torch.float64)
    if was_training:
        engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def parameters_held_by_the_model(model):
    """Gather (under ZeRO-3) the parameters the model's top modules hold themselves, LLaVA-NeXT's and
    OneVision's ``image_newline``. The vision path reads it in ``get_image_features``, outside any
    module's own forward; DeepSpeed fetches such a parameter only while the engine runs its forward,
    so embedding held-out prompts outside it would find it still partitioned (empty). Every rank
    enters this together (a collective); without ZeRO-3 it does nothing."""
    import deepspeed

    held = [param for module in (model, getattr(model, "model", None)) if module is not None
            for param in module.parameters(recurse=False)]
    return deepspeed.zero.GatheredParameters(held)


def heldout_scores(engine, held: HeldoutSet, encoder: PromptEncoder, max_new_tokens: int, batch_size: int,
                   device: torch.device) -> tuple[dict[str, float], list[dict]]:
    """Each of the set's metrics, the mean over every rank's questions it applies to (a metric that
    applies to none is left out), from greedy answers of at most ``max_new_tokens`` tokens; and this
    rank's answers, ``{"key", "turn", "prediction"}`` each.

    ``engine`` wraps a :class:`mole.model.TrainingModel`; every rank runs as many ``generate`` calls (a
    rank that runs out repeats its last batch and does not count it), all kept in step.
    """
    model = engine.module
    batches = -(-len(held.prompts) // batch_size)
    count = torch.tensor([batches], dtype=torch.long)
    synced = dist.is_initialized() and dist.get_world_size() > 1
    if synced:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    sums = torch.zeros(len(held.metrics), 2, dtype=torch.float64)  # (sum of scores, questions scored)
    answers = []
    tokenizer = encoder.tokenizer
    was_training = engine.training
    engine.eval()
    if model.by_domain:  # every answer from the domain's own expert
        model.context.route(held.domain)
    for i in range(int(count)):
        start = min(i, batches - 1) * batch_size
        prompts, references = held.prompts[start : start + batch_size], held.references[start : start + batch_size]
        turns = held.turns[start : start + batch_size]
        batch = encoder(prompts)
        pixels, sizes = batch["pixel_values"], batch["image_sizes"]
        input_ids = batch["input_ids"].to(device)
        with parameters_held_by_the_model(model.llava):
            inputs = model.prefill_inputs(input_ids, None if pixels is None else pixels.to(device),
                                          None if sizes is None else sizes.to(device))
        out = model.llava.generate(**inputs, attention_mask=batch["attention_mask"].to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, synced_gpus=synced,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if "input_ids" in inputs:  # generate returns the prompt before the new tokens
            out = out[:, input_ids.shape[1] :]
        if i >= batches:
            continue
        for answer, answer_references, (key, turn) in zip(decode_answers(tokenizer, out), references, turns):
            answers.append({"key": key, "turn": turn, "prediction": answer})
            for m, metric in enumerate(held.metrics):
                value = score(metric, answer, answer_references)
                if value is not None:
                    sums[m] += torch.tensor([value, 1.0], dtype=torch.float64)
    if was_training:
        engine.train()
    if synced:
        dist.all_reduce(sums)
    scores = {metric: (total / scored).item() for metric, (total, scored) in zip(held.metrics, sums) if scored > 0}
    return scores, answers
