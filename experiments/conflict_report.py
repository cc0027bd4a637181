"""Summaries of the data-conflict experiment: ``conflict.json``, the runs file, the plot and the Markdown.

``conflict.json`` has exactly the shape issue 6 asks for: ``{"variants": {variant: {domain: {"mean",
"std", "n"}}}, "setup": {...}}``, accuracy (VQAv2-normalised match) over seeds; ``std`` is the
sample standard deviation (n - 1), 0 for one seed. Everything else measured (answer loss, exact
match, routing NMI per layer, training loss, per-run values and timings) goes to ``conflict.runs.json``.

The claims are checked with one rule, stated in the report: a difference of means counts when it
exceeds twice its standard error ``sqrt(s1^2/n1 + s2^2/n2)``; otherwise it is "within noise". With
fewer than two seeds on a side there is no standard error to judge by (it would be 0 and every
difference would count), so the claims are "not judged" (``held`` is None).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from experiments.conflict import ALIASES

ROW_ORDER = ("single", "mix", "mix2x", "mole", "mole_hard", "mole_scaled", "mole_dense", "mole_prefix", "oracle")
MOLE_ROWS = ("mole", "mole_hard", "mole_dense", "mole_prefix")
SELECTION_POINTS = 0.05
"""A design is chosen when the oracle beats the mix by at least this much on the mean of domains (and by
more than 2 SE over seeds)."""
NOT_JUDGED = "**not judged** (fewer than two seeds: no standard error)"


def stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def _per_variant(runs: list[dict], metric: str) -> dict[str, dict[str, list[float]]]:
    """variant -> domain -> values over seeds (``metric`` of each run's domain results)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for domain, m in run["domains"].items():
            values[run["spec"]["variant"]][domain].append(m[metric])
    for alias, source in ALIASES.items():
        if source in values:
            values[alias] = values[source]
    return values


def _ordered(table: dict, domains: tuple[str, ...]) -> dict:
    return {v: {d: table[v][d] for d in domains if d in table[v]} for v in ROW_ORDER if v in table}


def summarize(runs: list[dict], setup: dict) -> dict:
    """The ``conflict.json`` document: accuracy mean/std/n per variant and domain, plus the setup (whose
    ``domains`` name the suite's domains in order)."""
    accuracy = _per_variant(runs, "accuracy")
    return {"variants": _ordered({v: {d: stats(x) for d, x in ds.items()} for v, ds in accuracy.items()},
                                 setup["domains"]),
            "setup": setup}


def details(runs: list[dict], domains: tuple[str, ...]) -> dict:
    """The ``conflict.runs.json`` document: loss and exact-match summaries, routing NMI, every run."""
    loss = _per_variant(runs, "loss")
    exact = _per_variant(runs, "exact_match")
    nmi: dict[str, list[list[float]]] = defaultdict(list)
    top_share: dict[str, list[list[float]]] = defaultdict(list)
    train_loss: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        variant = run["spec"]["variant"]
        if run["nmi_per_layer"] is not None:
            nmi[variant].append(run["nmi_per_layer"])
        if run.get("top_expert_share_per_layer") is not None:
            top_share[variant].append(run["top_expert_share_per_layer"])
        if variant != "single":
            train_loss[variant].append(run["train"]["lm_loss"])
    for alias, source in ALIASES.items():
        for table in (nmi, top_share, train_loss):
            if source in table:
                table[alias] = table[source]
    foreign: dict = defaultdict(lambda: defaultdict(list))
    by_kind: dict = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for domain, a in run.get("answers", {}).items():
            foreign[run["spec"]["variant"]][domain].append(a["foreign"])
            for kind, accuracy in a["accuracy_by_kind"].items():
                by_kind[run["spec"]["variant"]][f"{domain}/{kind}"].append(accuracy)
    for alias, source in ALIASES.items():
        for table in (foreign, by_kind):
            if source in table:
                table[alias] = table[source]
    return {
        "foreign_convention_share": _ordered({v: {d: stats(x) for d, x in ds.items()} for v, ds in foreign.items()},
                                             domains),
        "accuracy_by_question_kind": {v: {k: stats(x) for k, x in sorted(ks.items())} for v, ks in by_kind.items()
                                      if v in ROW_ORDER},
        "loss": _ordered({v: {d: stats(x) for d, x in ds.items()} for v, ds in loss.items()}, domains),
        "exact_match": _ordered({v: {d: stats(x) for d, x in ds.items()} for v, ds in exact.items()}, domains),
        "routing_nmi_per_layer": {v: [stats(list(layer)) for layer in zip(*rows)] for v, rows in nmi.items()},
        "top_expert_share_per_layer": {v: [stats(list(layer)) for layer in zip(*rows)] for v, rows in top_share.items()},
        "train_lm_loss_last20": {v: stats(x) for v, x in train_loss.items()},
        "runs": runs,
    }


def compare(a: dict, b: dict) -> tuple[float, float, bool | None]:
    """(difference of means a - b, its standard error, |difference| > 2 SE) for two {mean, std, n};
    the last is None when a side has fewer than two values (no spread to judge by)."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return diff, se, abs(diff) > 2 * se if min(a["n"], b["n"]) >= 2 else None


def domain_average(runs: list[dict], variant: str, domains: tuple[str, ...]) -> dict | None:
    """Per seed, the mean accuracy over the domains; then {mean, std, n} over seeds."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    source = ALIASES.get(variant, variant)
    for run in runs:
        if run["spec"]["variant"] == source:
            by_seed[run["spec"]["seed"]] += [m["accuracy"] for m in run["domains"].values()]
    values = [sum(v) / len(v) for v in by_seed.values() if len(v) == len(domains)]
    return stats(values) if values else None


def claims(summary: dict, runs: list[dict]) -> dict:
    """Verdicts on (a), (b), (c) with the numbers they rest on (see the module docstring's rule); with an
    ``oracle`` row also whether it opens a gap over ``mix`` large enough to select the design
    (:data:`SELECTION_POINTS` and 2 SE on the mean of domains) and each MoLE row's **gap closed**,
    (MoLE - mix) / (oracle - mix) on the mean of domains."""
    variants, domains = summary["variants"], summary["setup"]["domains"]
    out: dict = {}
    if "single" in variants and "mix" in variants:
        rows = {d: compare(variants["mix"][d], variants["single"][d]) for d in domains}
        worse = [d for d, (diff, _, clear) in rows.items() if diff < 0 and clear]
        judged = all(clear is not None for _, _, clear in rows.values())
        out["a"] = {"held": bool(worse) if judged else None, "domains_worse": worse,
                    "mix_minus_single": {d: {"diff": r[0], "se": r[1]} for d, r in rows.items()}}
    for key, baseline in (("b", "mix"), ("c", "mix2x")):
        if baseline not in variants:
            continue
        verdicts = {}
        for mole in MOLE_ROWS:
            if mole not in variants:
                continue
            per_domain = {d: compare(variants[mole][d], variants[baseline][d]) for d in domains}
            avg = compare(domain_average(runs, mole, domains), domain_average(runs, baseline, domains))
            held = None if avg[2] is None else bool(avg[0] > 0 and avg[2])
            verdicts[mole] = {"held": held, "average": {"diff": avg[0], "se": avg[1]},
                              "per_domain": {d: {"diff": r[0], "se": r[1]} for d, r in per_domain.items()}}
        out[key] = verdicts
    if "oracle" in variants and "mix" in variants:
        oracle, mix = domain_average(runs, "oracle", domains), domain_average(runs, "mix", domains)
        diff, se, clear = compare(oracle, mix)
        gap = {mole: (domain_average(runs, mole, domains)["mean"] - mix["mean"]) / diff if diff else None
               for mole in MOLE_ROWS if mole in variants}
        out["oracle"] = {"average": {"diff": diff, "se": se}, "selected": bool(diff >= SELECTION_POINTS and clear),
                         "judged": clear is not None, "gap_closed": gap,
                         "per_domain": {d: dict(zip(("diff", "se"), compare(variants["oracle"][d], variants["mix"][d])[:2]))
                                        for d in domains}}
    return out


MAX_DESIGNS = 4
"""Designs of a suite tried on val before one is taken (issue 20): the first that the oracle separates from
the mix (:func:`claims`' ``oracle.selected``), else test once on the best and report the negative."""


def record_design(path: str, command: str, summary: dict, runs: list[dict], verdicts: dict) -> dict:
    """Add (or, for the same command, replace) one val run's design in the designs file ``path``: its
    command, recipe, steps and seeds, the mean of domains per variant and the oracle-vs-mix verdict.
    A fifth distinct design is refused: the selection tries at most :data:`MAX_DESIGNS`."""
    setup, domains = summary["setup"], summary["setup"]["domains"]
    designs = []
    if os.path.isfile(path):
        with open(path) as handle:
            designs = json.load(handle)["designs"]
    designs = [d for d in designs if d["command"] != command]
    if len(designs) >= MAX_DESIGNS:
        raise ValueError(f"{path} already records {MAX_DESIGNS} designs; the selection tries no more")
    oracle = verdicts.get("oracle")
    record = {
        "design": len(designs) + 1, "command": command, "suite": setup["suite"], "split": setup["split"],
        "steps_N": setup["steps_N"], "seeds": setup["seeds"], "variants": setup["variants"],
        "extra_overrides": setup["extra_overrides"], "train_recipe": setup["train_recipe"],
        "mean_of_domains": {v: domain_average(runs, v, domains) for v in summary["variants"] if v != "single"},
        "oracle_minus_mix": None if oracle is None else oracle["average"],
        "gap_closed": None if oracle is None else oracle["gap_closed"],
        "selected": bool(oracle and oracle["selected"]),
        "rule": f"selected when oracle - mix >= {SELECTION_POINTS} on the mean of domains and > 2 SE over seeds",
    }
    write_json(path, {"designs": [*designs, record]})
    return record


def write_json(path: str, document: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")


def plot_png(summary: dict, run_details: dict, path: str) -> None:
    """Left: accuracy per domain and variant (mean, error bar = std over seeds). Right: routing NMI
    per layer of the MoLE variants."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = [v for v in ROW_ORDER if v in summary["variants"] and v not in ALIASES]
    domains = summary["setup"]["domains"]
    figure = Figure(figsize=(11 + len(domains) - 3, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(variants)
    x = np.arange(len(domains))
    for i, variant in enumerate(variants):
        rows = summary["variants"][variant]
        means = [rows[d]["mean"] if d in rows else np.nan for d in domains]
        stds = [rows[d]["std"] if d in rows else 0.0 for d in domains]
        left.bar(x + (i - (len(variants) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=variant)
    left.set_xticks(x, domains)
    left.set_ylim(0, 1.05)
    left.set_ylabel("answer accuracy (VQAv2-normalised)")
    left.set_title(f"{summary['setup'].get('split', 'test')} accuracy, mean ± std over seeds")
    left.legend(fontsize=7, ncol=2, loc="lower right")
    for variant, layers in run_details["routing_nmi_per_layer"].items():
        if variant in ALIASES:
            continue
        means = [layer["mean"] for layer in layers]
        stds = [layer["std"] for layer in layers]
        right.errorbar(range(len(layers)), means, yerr=stds, marker="o", capsize=3,
                       label="mole (scaled)" if variant == "mole" else variant)
        right.set_xticks(range(len(layers)))
    right.set_xlabel("layer")
    right.set_ylabel("NMI(domain; expert)")
    right.set_ylim(0, 1.05)
    right.set_title("routing NMI per layer")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _cell(stats: dict | None, digits: int = 3) -> str:
    if stats is None:
        return "–"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _table(block: dict, runs: list[dict] | None, domains: tuple[str, ...], digits: int = 3) -> list[str]:
    header = "| variant | " + " | ".join(domains) + (" | mean of domains |" if runs is not None else " |")
    lines = [header, "|" + "---|" * (len(domains) + 1 + (runs is not None))]
    for variant, rows in block.items():
        cells = [_cell(rows.get(d), digits) for d in domains]
        if runs is not None:
            cells.append(_cell(domain_average(runs, variant, domains), digits) if variant != "single" else "–")
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return lines


def _kind_table(block: dict, domains: tuple[str, ...]) -> list[str]:
    columns = sorted({k for kinds in block.values() for k in kinds if not k.endswith("/text")},
                     key=lambda k: (domains.index(k.split("/")[0]), k))
    lines = ["| variant | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for variant in ROW_ORDER:
        if variant in block:
            lines.append(f"| `{variant}` | " + " | ".join(_cell(block[variant].get(c), 2) for c in columns) + " |")
    return lines


def _verdict_lines(verdicts: dict) -> list[str]:
    lines = []
    if "a" in verdicts:
        a = verdicts["a"]
        diffs = ", ".join(f"{d} {v['diff']:+.3f} (SE {v['se']:.3f})" for d, v in a["mix_minus_single"].items())
        state = (NOT_JUDGED if a["held"] is None else
                 f"**held** ({', '.join(a['domains_worse'])} worse after mixing)" if a["held"] else "**did not hold**")
        lines.append(f"- (a) mixing lowers some domain vs single-domain LoRA: {state}. mix − single: {diffs}.")
    for key, text in (("b", "MoLE on the mix beats plain LoRA on the mix (`mix`)"),
                      ("c", "MoLE on the mix beats plain LoRA with twice the samples (`mix2x`)")):
        for mole, v in verdicts.get(key, {}).items():
            state = NOT_JUDGED if v["held"] is None else "**held**" if v["held"] else "**did not hold**"
            per = ", ".join(f"{d} {x['diff']:+.3f}" for d, x in v["per_domain"].items())
            lines.append(f"- ({key}) {text}, `{mole}`: {state}; mean of domains {v['average']['diff']:+.3f} "
                         f"(SE {v['average']['se']:.3f}); per domain {per}.")
    if "oracle" in verdicts:
        o = verdicts["oracle"]
        state = (NOT_JUDGED if not o["judged"] else
                 "**yes**" if o["selected"] else f"**no** (it needs >= {SELECTION_POINTS:+.2f} and more than 2 SE)")
        gaps = ", ".join(f"`{m}` {g:+.2f}" if g is not None else f"`{m}` –" for m, g in o["gap_closed"].items())
        lines.append(f"- The oracle (an expert per domain, routed by the domain) beats `mix` by enough to show a conflict "
                     f"routing could resolve: {state}; mean of domains {o['average']['diff']:+.3f} (SE "
                     f"{o['average']['se']:.3f}). Gap closed, (MoLE − mix) / (oracle − mix): {gaps or '–'}.")
    return lines


def markdown(summary: dict, run_details: dict, verdicts: dict, command: str, png_name: str, notes: str | None) -> str:
    """The report: setup, commands, the tables, the plot, routing NMI per layer, the claim verdicts."""
    setup, runs = summary["setup"], run_details["runs"]
    domains = setup["domains"]
    nmi_rows = []
    for variant, layers in run_details["routing_nmi_per_layer"].items():
        nmi_rows.append(f"| `{variant}` | " + " | ".join(_cell(layer) for layer in layers) + " |")
    layers = len(next(iter(run_details["routing_nmi_per_layer"].values()), []))
    top_share = _ordered({v: {d: stats(x) for d, x in ds.items()}
                          for v, ds in _per_variant([r for r in runs if r["nmi_per_layer"] is not None],
                                                    "top_expert_share").items()}, domains)
    train = run_details["train_lm_loss_last20"]
    seconds = sum(r["seconds"]["total"] for r in runs)
    parts = [
        "# Does MoLE resolve data conflicts? The miniature experiment"
        + ("" if setup.get("suite", "bundled") == "bundled" else f", suite `{setup['suite']}`"),
        "",
        f"Generated by `{command}` (from the repository root). Numbers: the `{setup['split']}` split, "
        f"{setup['seeds_count']} seed(s) ({', '.join(map(str, setup['seeds']))}); mean ± sample std over seeds.",
        "",
        "## Setup",
        "",
        *[f"- {line}" for line in setup["description"]],
        "",
        "## Accuracy (VQAv2-normalised answer match)",
        "",
        *_table(summary["variants"], runs, domains),
        "",
        f"![accuracy and routing NMI]({png_name})",
        "",
        "## Answer loss (teacher-forced, answer tokens + EOS)",
        "",
        *_table(run_details["loss"], None, domains, 4),
        "",
        "Training LM loss, mean of the last 20 steps (how well each adapter fits the mix it trains on): "
        + ", ".join(f"`{v}` {_cell(s, 4)}" for v, s in train.items()) + ".",
        "",
        "## Answer conventions and question kinds",
        "",
        ("Share of generated answers written in *another* domain's convention (e.g. `T` or `stain: red` "
         "for a shapes question): the data conflict made visible. Wrong content in the right convention "
         "does not count here." if setup.get("suite", "bundled") == "bundled" else
         "Share of generated answers that are wrong and equal to another domain's answer to the same image and "
         "question (the cue ignored or misread): the data conflict made visible."),
        "",
        *_table(run_details["foreign_convention_share"], None, domains),
        "",
        "Accuracy per question kind (`color`: main object's colour, `count`: objects, `has`: is there a "
        "<colour> object; `list`: every object's colour; `text`: the text-only shapes questions):",
        "",
        *_kind_table(run_details["accuracy_by_question_kind"], domains),
        "",
        "## Routing",
        "",
        "NMI between domain and chosen expert per layer, on the evaluated split (all non-padding tokens: "
        "image, prompt and answer): 0 = the expert choice says nothing about the domain, 1 = each domain "
        "has its own expert.",
        "",
        "| variant | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
        "|" + "---|" * (layers + 1),
        *nmi_rows,
        "",
        "Largest expert share of each domain's tokens, averaged over layers (1/K = spread evenly, 1 = one expert; "
        "the oracle's is 1 by construction):",
        "",
        *_table(top_share, None, domains),
        "",
        "The same per layer, averaged over the domains:",
        "",
        "| variant | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
        "|" + "---|" * (layers + 1),
        *[f"| `{v}` | " + " | ".join(_cell(layer) for layer in per_layer) + " |"
          for v, per_layer in run_details.get("top_expert_share_per_layer", {}).items()],
        "",
        "## Claims",
        "",
        "Rule: a difference of means counts when it exceeds twice its standard error "
        "`sqrt(s1²/n1 + s2²/n2)` over seeds; (b) and (c) are judged on the mean over the domains.",
        "",
        *_verdict_lines(verdicts),
        "",
    ]
    if notes:
        parts += ["## Discussion", "", notes.strip(), ""]
    parts += [f"Total run time of the {len(runs)} adapter runs: {seconds / 60:.1f} min of process time "
              f"({setup.get('workers', 1)} at a time); base pretraining: {setup['base']['pretrain']['seconds']:.0f} s.", ""]
    return "\n".join(parts)
