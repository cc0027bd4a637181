"""What the routers of trained conflict-experiment runs did over training (issue 20's diagnosis).

For each named run directory (``<work-dir>/<suite>/<split>/<run>``, written by
:mod:`experiments.run_conflict`, trained with ``train.log_routing_every`` > 0 for the NMI curve): the
mean accuracy over its domains, and from its ``train/metrics.jsonl`` per layer the router entropy (nats;
log K: undecided), the largest expert's share of the tokens (1/K: balanced, 1: collapsed) and the NMI
between domain and expert, at a few steps; the balance loss at the end. Written as JSON and as a
Markdown table, next to the linear probe's answer (:mod:`experiments.router_probe`).

    python -m experiments.routing_diagnosis --out docs/results/conflict_cues_diagnosis/routing \\
        mole=runs/diag_base/cues/val/mole_seed0 aux0=runs/diag_aux0/cues/val/mole_seed0 ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def summarize(run_dir: str, steps: tuple[int, ...] = (100, 300, 600, 1200), window: int = 50) -> dict:
    """One run's routing over training: per chosen step and layer, entropy and top expert share (means
    over the ``window`` steps up to it) and the NMI of the routing image nearest to it; its accuracy and
    final balance loss."""
    with open(os.path.join(run_dir, "result.json")) as handle:
        result = json.load(handle)
    with open(os.path.join(run_dir, "train", "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    trained = [r for r in rows if "train/loss" in r]
    nmi_rows = [r for r in rows if any(k.startswith("moe/nmi/") for k in r)]
    load_keys = [k.split("/") for r in trained[:1] for k in r if k.startswith("moe/load/layer_")]
    layers = sorted({int(k[2].split("_")[1]) for k in load_keys})
    experts = sorted({int(k[3].split("_")[1]) for k in load_keys})

    def window_mean(key: str, step: int) -> float | None:
        """Over the ``window`` logged steps up to ``step``: one step's batch is a noisy sample."""
        values = [r[key] for r in trained if step - window < r["step"] <= step and key in r]
        return sum(values) / len(values) if values else None

    curve = []
    last = max(r["step"] for r in trained)
    for step in sorted({min(step, last) for step in steps}):  # a shorter run: its last step
        nmi = min(nmi_rows, key=lambda r: abs(r["step"] - step)) if nmi_rows else None
        curve.append({
            "step": step,
            "router_entropy": [window_mean(f"moe/router_entropy/layer_{layer}", step) for layer in layers],
            "top_expert_share": [max(window_mean(f"moe/load/layer_{layer}/expert_{e}", step) or 0.0 for e in experts)
                                 for layer in layers],
            "nmi_step": None if nmi is None else nmi["step"],
            "nmi": None if nmi is None else [nmi.get(f"moe/nmi/layer_{layer}") for layer in layers],
        })
    accuracy = [m["accuracy"] for m in result["domains"].values()]
    return {"run": run_dir, "variant": result["spec"]["variant"], "seed": result["spec"]["seed"],
            "overrides": [o for o in result["spec"]["overrides"] if not o.startswith(("data.domains=", "model.name_or_path="))],
            "mean_accuracy": sum(accuracy) / len(accuracy), "eval_nmi": result["nmi_per_layer"],
            "aux_loss_last20": result["train"]["aux_loss"], "log_k": math.log(len(experts)) if experts else None,
            "curve": curve}


def markdown(rows: dict[str, dict]) -> str:
    """A table per run: layer-mean entropy, top share and NMI at each reported step."""
    def mean(values):
        values = [v for v in values or [] if v is not None]
        return sum(values) / len(values) if values else None

    def cell(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| run | mean accuracy | step | router entropy (log K = {:.2f}) | top expert share | NMI |".format(
        next((r["log_k"] for r in rows.values() if r["log_k"]), 0.0)), "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        for i, point in enumerate(row["curve"]):
            lines.append(f"| {name if i == 0 else ''} | {cell(row['mean_accuracy'], 3) if i == 0 else ''} | {point['step']} | "
                         f"{cell(mean(point['router_entropy']))} | {cell(mean(point['top_expert_share']))} | "
                         f"{cell(mean(point['nmi']), 3)} |")
    return "\n".join(lines) + "\n\nLayer means; per-layer values in the JSON.\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.routing_diagnosis", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    parser.add_argument("--out", required=True, help="path prefix: writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    rows = {}
    for item in args.runs:
        name, _, run_dir = item.partition("=")
        if not run_dir:
            parser.error(f"{item!r}: expected NAME=RUN_DIR")
        rows[name] = summarize(run_dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as handle:
        json.dump(rows, handle, indent=1)
        handle.write("\n")
    with open(args.out + ".md", "w") as handle:
        handle.write(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
