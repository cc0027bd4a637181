"""The boundary map of the data-conflict experiment (issue 20): where does the conflict appear, and
where does MoLE recover it?

A grid of LoRA rank x number of domains, one seed, for ``mix``, ``oracle`` and one MoLE routing (the
best MoLE row of the suite's test report unless named): each cell is the experiment of
:mod:`experiments.conflict` on the suite's first D domains with ``lora.r`` = r. The rank is one
override; ``lora.alpha`` moves with it so that alpha / r, the scale LoRA's update is multiplied by,
stays the recipe's (otherwise a larger rank would also be a larger step size, and the map would
mix two causes). A conflict shows as ``oracle - mix`` > 0; MoLE recovers it where its gap closed,
(MoLE - mix) / (oracle - mix), nears 1.

The cell at the recipe's own rank and all the suite's domains is the main experiment's runs,
reused from its work directory (same specs, so the same cached results); every other cell has a
work directory of its own, so reruns continue where they stopped.
"""

from __future__ import annotations

import dataclasses
import os

from experiments.conflict import SUITES, VARIANTS, ExperimentConfig, run_all
from experiments.conflict_report import MOLE_ROWS, domain_average, stats, write_json

RANKS = (1, 4, 16)
DOMAIN_COUNTS = (3, 6)


def best_mole_row(report_path: str) -> tuple[str, str]:
    """(MoLE variant, why): the MoLE row with the highest mean over domains in the suite's test report
    (``conflict_<suite>.json``), ``mole`` (the default routing) when there is none yet."""
    import json

    if not os.path.isfile(report_path):
        return "mole", f"the default routing: no report at {report_path} to choose from"
    with open(report_path) as handle:
        variants = json.load(handle)["variants"]
    means = {v: sum(s["mean"] for s in variants[v].values()) / len(variants[v]) for v in MOLE_ROWS if v in variants}
    if not means:
        return "mole", f"the default routing: {report_path} has no MoLE row"
    best = max(means, key=means.get)
    return best, (f"the best MoLE row of {report_path} on the mean of domains ("
                  + ", ".join(f"{v} {m:.3f}" for v, m in means.items()) + ")")


def cell_config(main: ExperimentConfig, recipe_lora: dict, rank: int, count: int, mole: str) -> ExperimentConfig:
    """The experiment of one cell: the suite's first ``count`` domains, LoRA rank ``rank`` at the recipe's
    alpha / r, variants ``mix``, ``oracle`` and ``mole``. The recipe's own cell is ``main``'s work
    directory and overrides, so its runs are the main experiment's."""
    suite = SUITES[main.suite].domains
    if not 2 <= count <= len(suite):
        raise ValueError(f"boundary map: {count} domains, but a conflict needs at least 2 and suite {main.suite!r} "
                         f"has {len(suite)}")
    if rank < 1:
        raise ValueError(f"boundary map: LoRA rank {rank} must be at least 1")
    overrides = list(main.extra_overrides)
    work_dir = main.work_dir
    if rank != recipe_lora["r"] or count != len(suite):
        scale = recipe_lora["alpha"] / recipe_lora["r"]
        if rank != recipe_lora["r"]:
            overrides += [f"lora.r={rank}", f"lora.alpha={rank * scale:g}"]
        work_dir = os.path.join(main.work_dir, "boundary", f"r{rank}_d{count}")
    variants = [v for v in ("mix", "oracle", mole) if v in VARIANTS]
    return dataclasses.replace(main, work_dir=work_dir, extra_overrides=overrides, variants=variants,
                               domains=list(suite[:count]))


def run_boundary(main: ExperimentConfig, recipe_lora: dict, ranks: list[int], counts: list[int], mole: str,
                 why: str) -> dict:
    """Train and evaluate every cell (cached runs reused); the ``conflict_<suite>.boundary.json`` document."""
    cells = []
    for count in counts:
        for rank in ranks:
            cfg = cell_config(main, recipe_lora, rank, count, mole)
            runs = run_all(cfg)
            domains = cfg.domain_names
            means = {v: domain_average(runs, v, domains) for v in cfg.variants}
            gap = means["oracle"]["mean"] - means["mix"]["mean"]
            cells.append({
                "rank": rank, "domains": list(domains), "work_dir": cfg.work_dir, "overrides": cfg.extra_overrides,
                "mean_of_domains": means,
                "per_domain": {v: {d: stats([r["domains"][d]["accuracy"] for r in runs if r["spec"]["variant"] == v])
                                   for d in domains} for v in cfg.variants},
                "oracle_minus_mix": gap,
                "gap_closed": (means[mole]["mean"] - means["mix"]["mean"]) / gap if gap else None,
                "nmi_mean": _mean([sum(r["nmi_per_layer"]) / len(r["nmi_per_layer"])
                                   for r in runs if r["spec"]["variant"] == mole and r["nmi_per_layer"]]),
            })
    return {"suite": main.suite, "split": main.split, "seeds": main.seeds, "steps_N": main.steps, "mole": mole,
            "mole_chosen_as": why, "ranks": ranks, "domain_counts": counts, "recipe_lora": recipe_lora,
            "cells": cells}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def markdown(document: dict, command: str) -> str:
    """The map as tables: per number of domains, a row per rank with mix, oracle, MoLE, the gap and the
    gap closed."""
    mole = document["mole"]
    lines = [
        f"# Boundary map of the data conflict, suite `{document['suite']}`",
        "",
        f"Generated by `{command}`. The `{document['split']}` split, seed(s) "
        f"{', '.join(map(str, document['seeds']))}, N = {document['steps_N']} steps, every other setting the "
        f"recipe's (conflict_{document['suite']}.md); `lora.alpha` moves with the rank so that alpha / r stays "
        f"{document['recipe_lora']['alpha'] / document['recipe_lora']['r']:g}. MoLE row: `{mole}`, "
        f"{document['mole_chosen_as']}.",
        "",
        "Mean over the domains of answer accuracy. A conflict is `oracle − mix` > 0 (one shared adapter does "
        "worse than an expert per domain); gap closed = (MoLE − mix) / (oracle − mix), meaningful only where "
        "the gap is clearly above the noise of one seed.",
        "",
    ]
    for count in document["domain_counts"]:
        rows = [c for c in document["cells"] if len(c["domains"]) == count]
        if not rows:
            continue
        lines += [f"## {count} domains ({', '.join(rows[0]['domains'])})", "",
                  f"| LoRA rank | mix | oracle | `{mole}` | oracle − mix | gap closed | routing NMI, mean of layers |",
                  "|---|---|---|---|---|---|---|"]
        for c in rows:
            m = c["mean_of_domains"]
            gap = "–" if c["gap_closed"] is None else f"{c['gap_closed']:+.2f}"
            nmi = "–" if c["nmi_mean"] is None else f"{c['nmi_mean']:.2f}"
            lines.append(f"| {c['rank']} | {m['mix']['mean']:.3f} | {m['oracle']['mean']:.3f} | {m[mole]['mean']:.3f} "
                         f"| {c['oracle_minus_mix']:+.3f} | {gap} | {nmi} |")
        lines.append("")
    return "\n".join(lines)


def write(document: dict, out_dir: str, report_name: str, command: str) -> list[str]:
    paths = [os.path.join(out_dir, f"{report_name}.boundary.json"), os.path.join(out_dir, f"{report_name}.boundary.md")]
    write_json(paths[0], document)
    with open(paths[1], "w") as handle:
        handle.write(markdown(document, command))
    return paths
