"""The data-conflict experiment (issues 6, 20): single-domain LoRA vs LoRA on the mix vs MoLE vs the oracle.

    python -m experiments.run_conflict                # the reported experiment -> docs/results/conflict.*
    python -m experiments.run_conflict --split val    # what the recipe was chosen on -> runs/conflict/report_val/
    python -m experiments.run_conflict --smoke        # seconds: one seed, a few steps (the test suite)
    python -m experiments.run_conflict --suite cues   # the cue suite -> docs/results/conflict_cues.*
    python -m experiments.run_conflict --suite cues --boundary   # its boundary map -> conflict_cues.boundary.*

``--suite`` picks the domains (experiments.conflict.SUITES: ``bundled``, the default, or ``cues``); a
suite other than ``bundled`` writes ``conflict_<suite>.{md,json,runs.json,png}``.

Run from the repository root. Pretrains a small LLaVA base on neutral captions (cached in
``<work-dir>/base``), trains every adapter with the real trainer (one rank, one fresh process per
run, ``--workers`` at a time) and evaluates it per domain. See experiments/conflict.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The base: tiny-llava's tokenizer and processor (56 px, 16 image tokens), larger towers.
BASE_RECIPE = {"vision_hidden": 64, "vision_layers": 2, "text_hidden": 128, "text_layers": 4, "text_heads": 4}
SMOKE = {"steps": 6, "seeds": [0], "max_eval_samples": 4, "pretrain_steps": 4, "pretrain_samples": 16, "workers": 0}
SMOKE_VARIANTS = {"cues": ["mix", "mole", "mole_prefix", "oracle"]}
"""Variants of a suite's smoke setting where all of them would take too long for the test suite."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    from experiments.conflict_boundary import DOMAIN_COUNTS, RANKS

    parser = argparse.ArgumentParser(prog="python -m experiments.run_conflict", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/conflict.yaml", help="trainer recipe of every run")
    parser.add_argument("--suite", default="bundled", choices=["bundled", "cues"],
                        help="the domains (experiments.conflict.SUITES); default: bundled")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (the boundary map: 0)")
    parser.add_argument("--steps", type=int, default=1200, help="N: steps of the mix runs")
    parser.add_argument("--variants", nargs="+", help="subset of: single mix mix2x mole mole_hard mole_dense mole_prefix oracle "
                                                      "(default: the suite's)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, each a fresh process with one CPU thread; 0: one after another in this process")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--pretrain-samples", type=int, default=2000, help="caption samples per domain")
    parser.add_argument("--max-eval-samples", type=int, help="samples per domain evaluated (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra trainer override for every run (tuning on val)")
    parser.add_argument("--work-dir", default="runs/conflict", help="base model and runs")
    parser.add_argument("--out", help="report directory (default: docs/results for test, <work-dir>/report_val for val)")
    parser.add_argument("--notes", default="experiments/conflict_notes.md",
                        help="hand-written discussion included in the report when it exists (test split only; "
                             "another suite's: experiments/conflict_<suite>_notes.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny everything, one seed: checks the pipeline only")
    parser.add_argument("--designs", help="where a val run of a suite other than bundled records its design (default: "
                                          "docs/results/conflict_<suite>.designs.json)")
    parser.add_argument("--boundary", action="store_true",
                        help="the boundary map instead (experiments.conflict_boundary): LoRA rank x number of domains "
                             "for mix, oracle and one MoLE row -> conflict_<suite>.boundary.{md,json}")
    parser.add_argument("--boundary-ranks", type=int, nargs="+", default=list(RANKS), metavar="R")
    parser.add_argument("--boundary-domains", type=int, nargs="+", default=list(DOMAIN_COUNTS), metavar="D",
                        help="numbers of domains: the suite's first D")
    parser.add_argument("--boundary-mole", choices=["mole", "mole_hard", "mole_dense", "mole_prefix"],
                        help="MoLE row of the map (default: the best MoLE row of the suite's test report)")
    args = parser.parse_args(argv)
    if args.boundary and (args.variants or args.split != "test"):
        parser.error("--boundary runs mix, oracle and one MoLE row on the test split: it takes neither --variants "
                     "nor --split")
    if args.seeds is None:
        args.seeds = [0] if args.boundary else [0, 1, 2]
    if args.smoke:
        args.steps, args.seeds, args.max_eval_samples = SMOKE["steps"], SMOKE["seeds"], SMOKE["max_eval_samples"]
        args.pretrain_steps, args.pretrain_samples = SMOKE["pretrain_steps"], SMOKE["pretrain_samples"]
        args.workers = SMOKE["workers"]  # all runs in this process: no process start-up per run
        args.variants = args.variants or SMOKE_VARIANTS.get(args.suite)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the run processes
    import torch
    from transformers import AutoProcessor

    from experiments import conflict, conflict_report
    from experiments.base_model import PretrainConfig, write_base
    from tools.make_synthetic_data import DRAWERS  # the bundled data's drawing functions
    from tools.make_tiny_llava import build_model  # and its tiny model's builder

    torch.set_num_threads(1)
    command = "python -m experiments.run_conflict " + shlex.join(argv)
    base_dir = os.path.join(args.work_dir, "base" + ("_smoke" if args.smoke else ""))
    processor = AutoProcessor.from_pretrained(os.path.join(REPO, "models", "tiny-llava"))
    pretrain_cfg = PretrainConfig(samples_per_domain=args.pretrain_samples, steps=args.pretrain_steps)
    base = write_base(base_dir, build_model(processor.tokenizer, **BASE_RECIPE, seed=pretrain_cfg.seed), processor,
                      DRAWERS, pretrain_cfg, BASE_RECIPE)

    suite = conflict.SUITES[args.suite]
    work = args.work_dir if args.suite == "bundled" else os.path.join(args.work_dir, args.suite)
    cfg = conflict.ExperimentConfig(
        train_config=args.config, base_model=base_dir, work_dir=os.path.join(work, "smoke" if args.smoke else ""),
        data_root=suite.data_root, suite=suite.name, seeds=args.seeds, steps=args.steps, split=args.split,
        max_eval_samples=args.max_eval_samples, variants=args.variants or list(suite.variants), workers=args.workers,
        extra_overrides=args.overrides,
    )
    out = args.out or ("docs/results" if args.split == "test" else os.path.join(work, "report_val"))
    if args.boundary:
        return boundary(args, cfg, out, command)
    runs = conflict.run_all(cfg)

    setup = conflict.describe_setup(cfg, base, args.config, args.smoke)
    summary = conflict_report.summarize(runs, setup)
    details = conflict_report.details(runs, suite.domains)
    verdicts = conflict_report.claims(summary, runs)
    notes = None
    notes_path = args.notes if args.suite == "bundled" else args.notes.replace("conflict_notes", f"conflict_{args.suite}_notes")
    if args.split == "test" and not args.smoke and os.path.isfile(notes_path):
        with open(notes_path) as handle:
            notes = handle.read()
    name = suite.report_name
    conflict_report.write_json(os.path.join(out, f"{name}.json"), summary)
    conflict_report.write_json(os.path.join(out, f"{name}.runs.json"), {**details, "claims": verdicts})
    conflict_report.plot_png(summary, details, os.path.join(out, f"{name}.png"))
    with open(os.path.join(out, f"{name}.md"), "w") as handle:
        handle.write(conflict_report.markdown(summary, details, verdicts, command.strip(), f"{name}.png", notes))
    print(f"wrote {out}/{name}.json, {name}.runs.json, {name}.png, {name}.md")
    if args.split == "val" and not args.smoke and args.suite != "bundled":
        designs = args.designs or os.path.join("docs", "results", f"{name}.designs.json")
        record = conflict_report.record_design(designs, command.strip(), summary, runs, verdicts)
        print(f"design {record['design']} recorded in {designs}: selected {record['selected']}")
    return 0


def boundary(args: argparse.Namespace, cfg, out: str, command: str) -> int:
    """The boundary map (experiments.conflict_boundary) of ``cfg``'s suite."""
    import yaml

    from experiments import conflict_boundary
    from experiments.conflict import SUITES

    name = SUITES[args.suite].report_name
    if args.boundary_mole:
        mole, why = args.boundary_mole, "named by --boundary-mole"
    else:
        mole, why = conflict_boundary.best_mole_row(os.path.join(out, f"{name}.json"))
    with open(args.config) as handle:
        lora = yaml.safe_load(handle)["lora"]
    for override in args.overrides:  # a --set of the rank or alpha moves the recipe's own cell
        key, _, value = override.partition("=")
        if key in ("lora.r", "lora.alpha"):
            lora[key.split(".")[1]] = yaml.safe_load(value)
    document = conflict_boundary.run_boundary(cfg, {"r": lora["r"], "alpha": lora["alpha"]}, args.boundary_ranks,
                                              args.boundary_domains, mole, why)
    for path in conflict_boundary.write(document, out, name, command.strip()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from mole.process_exit import exit_with  # the runs start a process group in this process

    exit_with(lambda: main(sys.argv[1:]))
