"""Can a token-level router tell the domains apart? A diagnosis of learned routing (issue 20).

A MoLE router is one linear map of each token's MLP input. If learned routing closes little of the
oracle's gap, either the router could not see the domain in those inputs, or it could and did not
learn to. This tells which: on an adapter's own forward (teacher-forced, the evaluation's samples),
it collects every routed layer's MLP inputs and fits a linear probe (multinomial logistic regression,
the router's own form) to predict the sample's domain, on half of each domain's samples, scoring it on
the other half. Scored separately on

* ``answer`` positions: those whose output predicts an answer token, where routing decides the answer;
* ``all`` real tokens, image and prompt included (what the routing NMI of the report counts);
* ``answer_prefix_mean``: at the answer positions, the mean of the sample's MLP inputs up to there, what
  a causal router of the whole sample so far (rather than of the token alone) would read.

Next to the probe's held-out accuracy (chance: 1 / number of domains) it reports, for a routed
adapter, the NMI between domain and the expert its router chose on the same positions. High probe
accuracy with NMI near 0 means the information is there and the router did not learn to use it
(learning dynamics: aux loss, learning rate, initialisation); probe accuracy near chance means no
linear router on these inputs can route by domain, whatever its training.

    python -m experiments.router_probe --base runs/conflict/base \\
        --adapter runs/conflict/cues/test/mole_seed0/train/adapter --data data_shards/cues --split val
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter

import torch

log = logging.getLogger(__name__)


def collect(model, processor, domains: list, max_samples: int | None, max_length: int, batch_size: int = 16) -> dict:
    """Per routed layer, the MLP inputs at every real token with the sample's domain, whether the
    position predicts an answer token, the sample's index within its domain and (routed adapters) the
    expert the router chose."""
    import itertools

    from mole.backbones import backbone_for
    from mole.data.collate import collate, to_device
    from mole.data.conversation import IGNORE_INDEX
    from mole.data.sample import SampleProcessor
    from mole.evaluate import rank_examples
    from mole.inference import mole_layers, model_image_settings, routes_by_domain, routing_context

    layers = mole_layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layers)
    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(layers)]
    image_aspect, image_backend = model_image_settings(model, None, None)
    backbone = backbone_for(model.config)
    process = SampleProcessor(processor, max_length, image_aspect, image_backend=image_backend, backbone=backbone,
                              model_config=model.config)
    out = {"features": [[] for _ in layers], "prefix_mean": [[] for _ in layers], "choice": [[] for _ in layers],
           "domain": [], "answer": [], "sample": []}
    seen: Counter = Counter()
    examples = rank_examples(domains, process, Counter(), max_samples, 0, 1)
    try:
        with torch.no_grad():
            while chunk := list(itertools.islice(examples, batch_size)):
                batch = collate(chunk, processor.tokenizer.pad_token_id)
                if routes_by_domain(model):  # the oracle: ``domains`` are the adapter's, in its order
                    routing_context(model).route(batch["domain"])
                inputs = to_device(batch, model.device, pixel_dtype=model.dtype)
                labels = inputs.pop("labels")
                images = None
                if inputs["pixel_values"] is not None:
                    images = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs.get("image_sizes")}
                backbone.forward(model, inputs["input_ids"], inputs["attention_mask"], images)
                real = inputs["attention_mask"].bool()
                predicts_answer = torch.zeros_like(real)
                predicts_answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
                index = []
                for example in chunk:
                    index.append(seen[example.domain])
                    seen[example.domain] += 1
                positions = real.nonzero(as_tuple=True)
                out["domain"].append(batch["domain"][positions[0]])
                out["sample"].append(torch.tensor(index)[positions[0]])
                out["answer"].append(predicts_answer[positions])
                weight = real.unsqueeze(-1).float()
                seen_tokens = weight.cumsum(dim=1).clamp(min=1)
                for i, layer in enumerate(layers):
                    out["features"][i].append(captured[i][positions].float())
                    prefix_mean = (captured[i].float() * weight).cumsum(dim=1) / seen_tokens  # the sample's tokens so far
                    out["prefix_mean"][i].append(prefix_mean[positions])
                    if layer.router is not None:  # the expert the layer chose (by what its router reads)
                        out["choice"][i].append(layer._routing[1].view(*real.shape)[positions])
    finally:
        for hook in hooks:
            hook.remove()
    return {"features": [torch.cat(f) for f in out["features"]], "prefix_mean": [torch.cat(f) for f in out["prefix_mean"]],
            "choice": [torch.cat(c) if c else None for c in out["choice"]],
            "domain": torch.cat(out["domain"]), "answer": torch.cat(out["answer"]), "sample": torch.cat(out["sample"])}


def fit_probe(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, classes: int, steps: int = 300,
              seed: int = 0) -> torch.Tensor:
    """A multinomial logistic regression on standardised ``features[train]``; returns the predicted class
    of every row. Plain torch (full-batch L-BFGS, a little L2): the probe has the router's form, a
    linear map of the token's MLP input."""
    torch.manual_seed(seed)
    mean, std = features[train].mean(0), features[train].std(0).clamp(min=1e-6)
    x = (features - mean) / std
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x[train]), labels[train]) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return probe(x).argmax(dim=-1)


def diagnose(collected: dict, num_domains: int) -> dict:
    """Per layer and position set: the probe's held-out accuracy (samples with an odd index per domain
    held out) and the router's NMI(domain; expert)."""
    from mole.routing_analysis import normalized_mutual_information

    held_out = collected["sample"] % 2 == 1
    rows = []
    for layer, features in enumerate(collected["features"]):
        row = {"layer": layer}
        for name, where in (("answer", collected["answer"]), ("all", torch.ones_like(collected["answer"]))):
            subset = where.nonzero(as_tuple=True)[0]
            labels = collected["domain"][subset]
            predicted = fit_probe(features[subset], labels, ~held_out[subset], num_domains)
            test = held_out[subset]
            row[f"probe_accuracy_{name}"] = float((predicted[test] == labels[test]).float().mean())
            choice = collected["choice"][layer]
            if choice is not None:
                counts = torch.zeros(num_domains, int(choice.max()) + 1, dtype=torch.float64)
                counts.index_put_((labels, choice[subset]), torch.ones(len(subset), dtype=torch.float64), accumulate=True)
                row[f"router_nmi_{name}"] = normalized_mutual_information(counts)
            row[f"tokens_{name}"] = int(len(subset))
        if "prefix_mean" in collected:  # what a router of the sample's tokens so far (causal) could read
            subset = collected["answer"].nonzero(as_tuple=True)[0]
            labels = collected["domain"][subset]
            predicted = fit_probe(collected["prefix_mean"][layer][subset], labels, ~held_out[subset], num_domains)
            test = held_out[subset]
            row["probe_accuracy_answer_prefix_mean"] = float((predicted[test] == labels[test]).float().mean())
        rows.append(row)
    return {"chance": 1 / num_domains, "layers": rows}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.router_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--adapter", required=True, help="trained adapter directory (a MoLE or LoRA adapter)")
    parser.add_argument("--data", default="data_shards/cues", help="root of the suite's <domain>/<split>-*.tar")
    parser.add_argument("--split", default="val")
    parser.add_argument("--domains", nargs="+", help="domains probed (default: the adapter's, for a domain-routed one, "
                                                     "else every directory under --data)")
    parser.add_argument("--max-samples", type=int, default=64, help="samples per domain")
    parser.add_argument("--out", help="JSON file for the result (default: print only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from mole.evaluate import expand_eval_shards
    from mole.inference import load_model, load_processor
    from mole.adapter import read_adapter_spec

    torch.set_num_threads(1)
    spec = read_adapter_spec(args.adapter)
    if spec.domains:  # a domain-routed adapter: its experts are its domains, in its order
        if args.domains and list(args.domains) != list(spec.domains):
            parser.error(f"{args.adapter} routes by its domains {list(spec.domains)}; --domains must be those")
        names = list(spec.domains)
    else:
        names = args.domains or sorted(d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d)))
    domains = [expand_eval_shards(d, os.path.join(args.data, d, f"{args.split}-*.tar")) for d in names]
    model = load_model(args.base, args.adapter, device="cpu", dtype="fp32")
    processor = load_processor(args.base, adapter_dir=args.adapter)
    result = diagnose(collect(model, processor, domains, args.max_samples, 128), len(domains))
    result.update({"adapter": args.adapter, "split": args.split, "domains": names, "max_samples": args.max_samples})
    for row in result["layers"]:
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
