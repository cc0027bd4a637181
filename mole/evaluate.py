"""Per-domain evaluation of a loaded model on held-out shards: answer loss, answer accuracy, routing.

For every domain (one or more tar shards, read in order, nothing resampled):

* **loss** — the LM loss on answer tokens (answers + EOS, the tokens training labels), teacher-forced,
  summed over tokens and divided once per domain (a token-weighted mean);
* **accuracy / exact match** — every answer turn is asked as a question (earlier turns of the
  conversation, reference answers included, as history) and greedily generated; accuracy compares
  the VQAv2-normalised strings (:mod:`mole.answers`), exact match the stripped raw strings, each
  against the best of the turn's references (its ``"answers"``, else its text);
* **the domain's metrics** — the benchmark metrics chosen for the domain (:mod:`mole.scoring`,
  ``normalized_match`` unless chosen), each the mean over the questions it applies to;
* **routing** — the (layers, domains, K) token counts of the teacher-forced forward
  (:mod:`mole.routing_analysis`), non-padding tokens only, image and prompt tokens included. An adapter
  that routes by domain is told which of its domains serves each evaluated one (``route``): its table is
  that fixed assignment.

Distributed evaluation shards the samples over ranks (sample ``i`` goes to rank ``i % world_size``),
each rank holding a full model copy, and sums the counts with ``all_reduce``: ranks may run
different numbers of batches, which is why this is not done under ZeRO-3. Samples that cannot be
used are skipped and counted per domain and reason, as in training.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mole.answers import answers_match, exact_match
from mole.backbones import backbone_for
from mole.data.collate import collate, to_device
from mole.data.conversation import IGNORE_INDEX
from mole.data.examples import shard_examples
from mole.data.sample import Example, SampleProcessor
from mole.data.shards import expand_shards
from mole.inference import (Prompt, PromptEncoder, check_processor, generate_answers, model_image_settings, mole_layers,
                            routes_by_domain, routing_context)
from mole.routing_analysis import domain_expert_counts, domain_expert_shares, layer_nmi
from mole.scoring import DEFAULT_METRICS, check_metrics, score

# per-domain sums, reduced over ranks: one column each
SUMS = ("samples", "answer_tokens", "loss_sum", "questions", "correct", "exact")


@dataclass
class EvalDomain:
    name: str
    urls: list[str]  # tar shard paths, read in this order
    metrics: tuple[str, ...] = DEFAULT_METRICS  # names in mole.scoring.METRICS

    def __post_init__(self) -> None:
        check_metrics(self.metrics, f"domain {self.name!r}")


def expand_eval_shards(name: str, pattern: str, metrics: tuple[str, ...] = DEFAULT_METRICS) -> EvalDomain:
    """A domain from a glob (``test-*.tar``) or webdataset brace pattern (``test-{000000..000003}.tar``);
    a missing shard is an error, not a warning."""
    return EvalDomain(name, expand_shards(name, pattern, strict=True), metrics)


def questions(example: Example) -> tuple[list[Prompt], list[list[str]]]:
    """Every answer turn that follows a user turn as a question (the turns before it as history, its
    image) and its reference answers."""
    turns, prompts, references = example.turns, [], []
    for index, turn in enumerate(turns):
        if turn.role == "assistant" and index > 0 and turns[index - 1].role == "user":
            prompts.append(Prompt(turns[:index], example.image))
            references.append(list(turn.references or (turn.text,)))
    return prompts, references


@torch.no_grad()
def evaluate(
    model,
    processor,
    domains: list[EvalDomain],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    max_samples: int | None = None,
    max_length: int = 2048,
    image_aspect: str | None = None,
    image_backend: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    route: dict[str, str] | None = None,
) -> dict:
    """Evaluate ``model`` (from :func:`mole.inference.load_model`) per domain; every rank gets the
    same reduced results dict (metrics per domain and overall, routing per layer, predictions). Images
    are prepared as the adapter's training prepared them unless ``image_aspect``/``image_backend`` say
    otherwise; ``processor`` must prepare them with the adapter's recorded backend and limits
    (:func:`mole.inference.load_processor` given the adapter), else a ``ValueError`` says so. ``route``:
    for an adapter that routes by domain (required then, refused otherwise), the adapter domain whose
    expert serves each evaluated domain, by name."""
    check_processor(model, processor)
    experts = _route_experts(model, domains, route)
    image_aspect, image_backend = model_image_settings(model, image_aspect, image_backend)
    backbone = backbone_for(model.config)
    sample_processor = SampleProcessor(processor, max_length, image_aspect, image_backend=image_backend, keep_image=True,
                                       backbone=backbone, model_config=model.config)
    encoder = PromptEncoder(processor, image_aspect, image_backend, backbone=backbone)
    num_domains, num_layers = len(domains), len(mole_layers(model))
    num_experts = mole_layers(model)[0].num_experts if num_layers else 1
    sums = torch.zeros(num_domains, len(SUMS), dtype=torch.float64)
    routing = torch.zeros(num_layers, num_domains, num_experts, dtype=torch.float64)
    skipped: Counter = Counter()
    predictions: list[dict] = []

    examples = rank_examples(domains, sample_processor, skipped, max_samples, rank, world_size)
    while chunk := list(itertools.islice(examples, batch_size)):
        _score_batch(model, chunk, processor.tokenizer.pad_token_id, sums, routing, experts)
        predictions += _ask_questions(model, processor, encoder, chunk, domains, max_new_tokens, batch_size, sums,
                                      experts)

    if world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(routing)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (predictions, dict(skipped)))  # our own ranks' lists, in memory
        predictions = [p for rank_predictions, _ in gathered for p in rank_predictions]
        skipped = sum((Counter(s) for _, s in gathered), Counter())
    predictions.sort(key=lambda p: ([d.name for d in domains].index(p["domain"]), p["key"], p["turn"]))
    return _results(domains, sums, routing, skipped, predictions)


def _route_experts(model, domains: list[EvalDomain], route: dict[str, str] | None) -> torch.Tensor | None:
    """(domains,) the expert of each evaluated domain under routing ``domain`` (``None`` for any other
    routing); a one-line ``ValueError`` for a ``route`` that does not fit the adapter."""
    if not routes_by_domain(model):
        if route is not None:
            raise ValueError("a domain applies to a domain-routed adapter only")
        return None
    spec = model.mole_spec
    if route is None:
        raise ValueError(f"this adapter routes by domain ({', '.join(spec.domains)}): say which domain's expert answers")
    unrouted = [d.name for d in domains if d.name not in route]
    if unrouted:
        raise ValueError(f"no adapter domain given for evaluated domain(s) {unrouted}")
    return torch.tensor([spec.domain_index(route[d.name]) for d in domains], dtype=torch.long)


def rank_examples(domains: list[EvalDomain], process: SampleProcessor, skipped: Counter, max_samples: int | None,
                   rank: int, world_size: int) -> Iterator[Example]:
    """This rank's usable samples of every domain, prepared one at a time (sample i of a domain belongs
    to rank i % world_size); bad ones counted in ``skipped`` as ``<domain>/<reason>``."""
    for d, domain in enumerate(domains):
        counts: Counter = Counter()
        yield from shard_examples(domain.urls, process, counts, domain=d, rank=rank, world_size=world_size,
                                  limit=max_samples)
        skipped.update({f"{domain.name}/{reason}": n for reason, n in counts.items()})


def _ask_questions(model, processor, encoder: PromptEncoder, chunk: list[Example], domains: list[EvalDomain],
                   max_new_tokens: int, batch_size: int, sums: torch.Tensor, experts: torch.Tensor | None) -> list[dict]:
    """Generate an answer to every question of a batch of examples; count matches into ``sums`` and
    return the predictions. ``experts``: each evaluated domain's expert (routing ``domain``)."""
    asked = [questions(example) for example in chunk]
    prompts = [prompt for example_prompts, _ in asked for prompt in example_prompts]
    routed = None if experts is None else [int(experts[example.domain]) for example, (example_prompts, _) in zip(chunk, asked)
                                           for _ in example_prompts]
    answers = iter(generate_answers(model, processor, prompts, max_new_tokens, batch_size, encoder=encoder,
                                    domain=routed))
    predictions = []
    for example, (example_prompts, references) in zip(chunk, asked):
        domain = domains[example.domain]
        for turn, turn_references in enumerate(references):
            prediction = next(answers)
            match = bool(score("normalized_match", prediction, turn_references))
            exact = bool(score("exact_match", prediction, turn_references))
            sums[example.domain, SUMS.index("questions")] += 1
            sums[example.domain, SUMS.index("correct")] += match
            sums[example.domain, SUMS.index("exact")] += exact
            predictions.append({
                "domain": domain.name, "key": example.key, "turn": turn,
                "question": example_prompts[turn].turns[-1].text, "references": turn_references, "prediction": prediction, "match": match, "exact_match": exact,
                "scores": {metric: score(metric, prediction, turn_references) for metric in domain.metrics},
            })
    return predictions


def _score_batch(model, chunk: list[Example], pad_token_id: int, sums: torch.Tensor, routing: torch.Tensor,
                 experts: torch.Tensor | None = None) -> None:
    """Teacher-forced forward of one batch: answer-token loss sums and routing counts per domain.
    ``experts``: each evaluated domain's expert (routing ``domain``)."""
    batch = collate(chunk, pad_token_id)
    if experts is not None:
        routing_context(model).route(experts[batch["domain"]])
    inputs = to_device(batch, model.device, pixel_dtype=model.dtype)
    labels = inputs.pop("labels")[:, 1:]  # the loss is taken here, per sample, not by the model
    images = None
    if inputs["pixel_values"] is not None:
        images = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs.get("image_sizes")}
    out = backbone_for(model.config).forward(model, inputs["input_ids"], inputs["attention_mask"], images)
    logits = out.logits[:, :-1].float()  # (batch, seq-1, vocab): position t predicts token t+1
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    per_sample = token_loss.sum(dim=1).double().cpu()
    tokens = (labels != IGNORE_INDEX).sum(dim=1).double().cpu()
    domain = batch["domain"]
    for column, values in (("samples", torch.ones_like(tokens)), ("answer_tokens", tokens), ("loss_sum", per_sample)):
        sums[:, SUMS.index(column)].index_add_(0, domain, values)
    stats = routing_context(model).stats()
    if stats:
        routing += domain_expert_counts(stats, domain, routing.shape[1])
    else:  # K=1: one expert takes every (non-padding) token
        routing[:, :, 0] += torch.zeros(routing.shape[1], dtype=torch.float64).index_add_(
            0, domain, batch["attention_mask"].sum(dim=1).double()
        )


def _results(domains: list[EvalDomain], sums: torch.Tensor, routing: torch.Tensor, skipped: Counter, predictions: list[dict]) -> dict:
    def metrics(row: torch.Tensor) -> dict:
        value = dict(zip(SUMS, row.tolist()))
        return {
            "samples": int(value["samples"]),
            "questions": int(value["questions"]),
            "answer_tokens": int(value["answer_tokens"]),
            "loss": value["loss_sum"] / value["answer_tokens"] if value["answer_tokens"] else None,
            "accuracy": value["correct"] / value["questions"] if value["questions"] else None,
            "exact_match": value["exact"] / value["questions"] if value["questions"] else None,
        }

    shares = domain_expert_shares(routing)  # (layers, domains, K)
    nmi = layer_nmi(routing)
    per_domain = {}
    for d, domain in enumerate(domains):
        per_domain[domain.name] = metrics(sums[d])
        per_domain[domain.name]["skipped"] = {k.split("/", 1)[1]: v for k, v in skipped.items() if k.split("/", 1)[0] == domain.name}
        per_domain[domain.name]["top_expert_share"] = float(shares[:, d].max(dim=-1).values.mean()) if len(shares) else None
        per_domain[domain.name]["shards"] = domain.urls
        per_domain[domain.name]["metrics"] = domain_scores(domain, predictions)
    return {
        "domains": per_domain,
        "overall": metrics(sums.sum(dim=0)),
        "routing": {
            "num_experts": routing.shape[-1],
            "nmi_per_layer": nmi,
            "mean_nmi": sum(nmi) / len(nmi) if nmi else None,
            "shares": shares.tolist(),  # [layer][domain][expert]
            "counts": routing.tolist(),
        },
        "predictions": predictions,
    }


def domain_scores(domain: EvalDomain, predictions: list[dict]) -> dict[str, dict]:
    """Each of the domain's metrics: ``{"score": mean over the questions it applies to (None for none),
    "questions": how many}``."""
    scores = {}
    for metric in domain.metrics:
        values = [p["scores"][metric] for p in predictions if p["domain"] == domain.name and p["scores"][metric] is not None]
        scores[metric] = {"score": sum(values) / len(values) if values else None, "questions": len(values)}
    return scores


def format_metrics(metrics: dict[str, dict], questions: int) -> str:
    """``relaxed_accuracy 0.667``; a metric that applies to only some of the domain's questions says to
    how many (``closed_accuracy 0.500 (4 q) open_recall 0.250 (2 q)``)."""
    parts = []
    for name, value in metrics.items():
        number = "-" if value["score"] is None else f"{value['score']:.3f}"
        parts.append(f"{name} {number}" + (f" ({value['questions']} q)" if value["questions"] != questions else ""))
    return " ".join(parts)


def format_table(results: dict) -> str:
    """The per-domain metrics and the per-layer routing NMI as a plain-text table."""
    header = (f"{'domain':<12} {'samples':>7} {'questions':>9} {'loss':>8} {'accuracy':>8} {'exact':>7} {'top-expert':>10}  "
              "metric score")
    lines = [header, "-" * len(header)]

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    rows = list(results["domains"].items()) + [("all", results["overall"])]
    for name, m in rows:
        lines.append(
            f"{name:<12} {m['samples']:>7} {m['questions']:>9} {fmt(m['loss'], '8.4f')} {fmt(m['accuracy'], '8.3f')} "
            f"{fmt(m['exact_match'], '7.3f')} {fmt(m.get('top_expert_share'), '10.3f')}  "
            + (format_metrics(m["metrics"], m["questions"]) if "metrics" in m else "-")
        )
    routing = results["routing"]
    nmi = " ".join(f"{v:.3f}" for v in routing["nmi_per_layer"])
    lines.append(f"routing: K={routing['num_experts']}, NMI(domain; expert) per layer: {nmi}  mean {fmt(routing['mean_nmi'], '.3f')}")
    skipped = {name: m["skipped"] for name, m in results["domains"].items() if m["skipped"]}
    if skipped:
        lines.append(f"skipped samples: {skipped}")
    return "\n".join(lines)


def save_results(results: dict, out_dir: str, title: str) -> list[str]:
    """Write ``metrics.json`` (everything but the predictions), ``predictions.jsonl`` and, for K>1,
    ``routing.png``; return the paths written."""
    import json

    from mole.routing_plots import routing_heatmap_png

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "predictions.jsonl")]
    with open(paths[0], "w") as handle:
        json.dump({k: v for k, v in results.items() if k != "predictions"}, handle, indent=2)
    with open(paths[1], "w") as handle:
        for prediction in results["predictions"]:
            handle.write(json.dumps(prediction) + "\n")
    routing = results["routing"]
    if routing["num_experts"] > 1:
        paths.append(os.path.join(out_dir, "routing.png"))
        png = routing_heatmap_png(torch.tensor(routing["shares"]), list(results["domains"]), title, routing["nmi_per_layer"])
        with open(paths[-1], "wb") as handle:
            handle.write(png)
    return paths
