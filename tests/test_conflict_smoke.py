"""The data-conflict experiment's smoke setting end to end: base pretraining, every variant trained by
the real trainer (one rank, in one process), evaluated, and the reports written in the promised shape;
for the bundled suite and for the ``cues`` suite (its mix, MoLE and oracle rows)."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.helpers import REPO, python, run_group

DOMAINS = ("shapes", "charts", "tissue")
VARIANTS = ("single", "mix", "mix2x", "mole", "mole_hard", "mole_scaled", "mole_dense")
CUE_DOMAINS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")


def run_smoke(tmp_path_factory, *args: str, work=None):
    work, out = work or tmp_path_factory.mktemp("conflict_work"), tmp_path_factory.mktemp("conflict_out")
    cmd = [python(), "-m", "experiments.run_conflict", "--smoke", *args, "--work-dir", str(work), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = run_group(cmd, timeout=300, env=env)
    assert proc.returncode == 0, f"smoke experiment failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    return run_smoke(tmp_path_factory)


@pytest.fixture(scope="module")
def cues_work(tmp_path_factory):
    return tmp_path_factory.mktemp("cues_work")


@pytest.fixture(scope="module")
def cues_report(tmp_path_factory, cues_work):
    return run_smoke(tmp_path_factory, "--suite", "cues", work=cues_work)


@pytest.fixture(scope="module")
def cues_boundary(tmp_path_factory, cues_work, cues_report):
    """The cue suite's boundary map in the smoke setting, in the work directory of ``cues_report``: rank 1
    (the recipe's) and 2, two and all six domains."""
    return run_smoke(tmp_path_factory, "--suite", "cues", "--boundary", "--boundary-ranks", "1", "2",
                     "--boundary-domains", "2", "6", work=cues_work)


@pytest.mark.slow
def test_conflict_json_has_every_variant_and_domain_with_finite_accuracy(smoke_report):
    document = json.loads((smoke_report / "conflict.json").read_text())
    assert set(document) == {"variants", "setup"}, f"top-level keys {sorted(document)}"
    assert tuple(document["variants"]) == VARIANTS, f"variants {list(document['variants'])}"
    for variant, domains in document["variants"].items():
        assert tuple(domains) == DOMAINS, f"{variant}: domains {list(domains)}"
        for domain, stats in domains.items():
            assert set(stats) == {"mean", "std", "n"}, f"{variant}/{domain}: keys {sorted(stats)}"
            assert stats["n"] == 1, f"{variant}/{domain}: smoke runs one seed, n={stats['n']}"
            assert 0.0 <= stats["mean"] <= 1.0 and math.isfinite(stats["mean"]), f"{variant}/{domain}: mean {stats['mean']}"
            assert stats["std"] == 0.0, f"{variant}/{domain}: std over one seed must be 0, got {stats['std']}"
    assert document["variants"]["mole_scaled"] == document["variants"]["mole"], "mole_scaled is the mole runs"
    setup = document["setup"]
    assert setup["smoke"] is True and setup["split"] == "test" and setup["seeds"] == [0]
    assert setup["steps"]["mix2x"] == 2 * setup["steps"]["mix"] == 2 * setup["steps_N"]


@pytest.mark.slow
def test_runs_file_has_finite_losses_and_nmi_in_range(smoke_report):
    details = json.loads((smoke_report / "conflict.runs.json").read_text())
    assert len(details["runs"]) == 8, f"3 single + mix, mix2x, 3 MoLE runs expected, got {len(details['runs'])}"
    for run in details["runs"]:
        for domain, metrics in run["domains"].items():
            assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0, f"{run['name']}/{domain}: loss {metrics['loss']}"
            assert metrics["questions"] >= 4, f"{run['name']}/{domain}: {metrics['questions']} questions"
        if run["spec"]["variant"].startswith("mole"):
            assert len(run["nmi_per_layer"]) == 4, f"{run['name']}: one NMI per layer of the base"
            assert all(0.0 <= v <= 1.0 for v in run["nmi_per_layer"]), f"{run['name']}: NMI {run['nmi_per_layer']}"
        else:
            assert run["nmi_per_layer"] is None, f"{run['name']}: K=1 has no routing"
        max_steps = next(int(o.split("=")[1]) for o in run["spec"]["overrides"] if o.startswith("train.max_steps="))
        assert run["train"]["steps"] == max_steps, f"{run['name']}: trained {run['train']['steps']} of {max_steps} steps"
    assert set(details["claims"]) == {"a", "b", "c"}
    held = [details["claims"]["a"]["held"]] + [v["held"] for key in "bc" for v in details["claims"][key].values()]
    assert held == [None] * 7, f"one seed has no standard error: no claim can be judged, got {held}"


@pytest.mark.slow
def test_markdown_report_names_its_command_and_plot(smoke_report):
    text = (smoke_report / "conflict.md").read_text()
    assert "python -m experiments.run_conflict --smoke" in text
    assert "![accuracy and routing NMI](conflict.png)" in text
    assert (smoke_report / "conflict.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for claim in ("(a)", "(b)", "(c)"):
        assert claim in text, f"claim {claim} missing from the report"
    assert "**not judged** (fewer than two seeds" in text and "**held**" not in text and "did not hold" not in text


def test_a_cached_run_is_reused_only_under_the_recipe_it_was_trained_with(tmp_path):
    """A run's spec (its result cache key) changes with the trainer YAML's text and with the base's
    recipe or pretraining config, not with what the base's pretraining measured."""
    from dataclasses import asdict

    from experiments.conflict import ExperimentConfig, run_specs

    base, recipe = tmp_path / "base", tmp_path / "recipe.yaml"
    base.mkdir()
    record = {"recipe": {"hidden": 64}, "pretrain_config": {"steps": 10}, "pretrain": {"loss": 1.0}}
    (base / "base.json").write_text(json.dumps(record))
    recipe.write_text("lora: {r: 8}\n")
    cfg = ExperimentConfig(train_config=str(recipe), base_model=str(base), work_dir=str(tmp_path), seeds=[0])
    keys = lambda: [asdict(spec) for spec in run_specs(cfg)]  # noqa: E731
    first = keys()
    (base / "base.json").write_text(json.dumps({**record, "pretrain": {"loss": 0.5}}))
    assert keys() == first, "what pretraining measured does not change what the runs start from"
    recipe.write_text("lora: {r: 4}\n")
    assert all(a != b for a, b in zip(keys(), first)), "an edited trainer YAML must not reuse the old results"
    recipe.write_text("lora: {r: 8}\n")
    (base / "base.json").write_text(json.dumps({**record, "pretrain_config": {"steps": 20}}))
    assert all(a != b for a, b in zip(keys(), first)), "a base pretrained otherwise must not reuse the old results"


def test_runs_trained_under_another_lm_loss_definition_are_stale(tmp_path, monkeypatch):
    """The LM loss became the global batch's mean (mole.lm_loss): results cached before are retrained."""
    from experiments.conflict import recipe_digest

    (tmp_path / "base.json").write_text(json.dumps({"recipe": {}, "pretrain_config": {}}))
    (tmp_path / "recipe.yaml").write_text("lora: {r: 8}\n")
    now = recipe_digest(str(tmp_path / "recipe.yaml"), str(tmp_path))
    monkeypatch.setattr("mole.lm_loss.LM_LOSS_VERSION", 1)
    assert recipe_digest(str(tmp_path / "recipe.yaml"), str(tmp_path)) != now, "a cached run would be reused"


@pytest.mark.slow
def test_cue_suite_report_has_the_oracle_row_routed_by_domain_and_the_gap_closed(cues_report, cues_work):
    document = json.loads((cues_report / "conflict_cues.json").read_text())
    assert set(document) == {"variants", "setup"}, f"top-level keys {sorted(document)}"
    assert tuple(document["variants"]) == ("mix", "mole", "mole_scaled", "mole_prefix", "oracle"), list(document["variants"])
    for variant, domains in document["variants"].items():
        assert tuple(domains) == CUE_DOMAINS, f"{variant}: domains {list(domains)}"
        assert all(set(stats) == {"mean", "std", "n"} and 0.0 <= stats["mean"] <= 1.0 for stats in domains.values())
    assert document["setup"]["suite"] == "cues" and document["setup"]["domains"] == list(CUE_DOMAINS)
    details = json.loads((cues_report / "conflict_cues.runs.json").read_text())
    oracle = next(run for run in details["runs"] if run["spec"]["variant"] == "oracle")
    assert "mole.routing=domain" in oracle["spec"]["overrides"] and "mole.num_experts=6" in oracle["spec"]["overrides"]
    assert oracle["nmi_per_layer"] == pytest.approx([1.0] * 4), "each domain evaluated on its own expert: NMI 1"
    assert all(m["top_expert_share"] == pytest.approx(1.0) for m in oracle["domains"].values())
    assert oracle["train"]["aux_loss"] == 0.0, "no router, no balance loss"
    assert oracle["top_expert_share_per_layer"] == pytest.approx([1.0] * 4)
    shares = details["top_expert_share_per_layer"]
    assert set(shares) == {"mole", "mole_scaled", "mole_prefix", "oracle"}, "per layer, for the routed rows only"
    assert len(shares["mole"]) == 4 and all(1 / 6 <= layer["mean"] <= 1.0 for layer in shares["mole"]), shares["mole"]
    assert set(details["foreign_convention_share"]["mix"]) == set(CUE_DOMAINS)
    assert set(details["claims"]["oracle"]["gap_closed"]) == {"mole", "mole_prefix"}
    assert details["claims"]["oracle"]["judged"] is False
    prefix = next(run for run in details["runs"] if run["spec"]["variant"] == "mole_prefix")
    assert "mole.router_input=prefix_mean" in prefix["spec"]["overrides"]
    adapter = json.loads((cues_work / "cues" / "smoke" / "test" / "mole_prefix_seed0" / "train" / "adapter" /
                          "mole_config.json").read_text())
    assert adapter["router_input"] == "prefix_mean" and adapter["routing"] == "scaled"
    text = (cues_report / "conflict_cues.md").read_text()
    assert "python -m experiments.run_conflict --smoke --suite cues" in text and "(conflict_cues.png)" in text
    assert (cues_report / "conflict_cues.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_val_designs_are_recorded_once_per_command_and_at_most_four(tmp_path):
    from experiments.conflict_report import claims, record_design, summarize

    domains = ["a", "b"]
    runs = [{"spec": {"variant": variant, "seed": seed}, "domains": {d: {"accuracy": accuracy + 0.01 * seed} for d in domains}}
            for seed in (0, 1) for variant, accuracy in (("mix", 0.4), ("mole", 0.45), ("oracle", 0.6))]
    setup = {"suite": "cues", "split": "val", "steps_N": 10, "seeds": [0, 1], "variants": ["mix", "mole", "oracle"],
             "extra_overrides": [], "train_recipe": {}, "domains": domains}
    summary = summarize(runs, setup)
    verdicts = claims(summary, runs)
    assert verdicts["oracle"]["selected"] is True, "0.2 over the mix, far beyond 2 SE (0.01 apart over seeds)"
    noisy = [{**run, "domains": {d: {"accuracy": 0.4 + 0.3 * run["spec"]["seed"]} for d in domains}}
             if run["spec"]["variant"] == "oracle" else run for run in runs]
    assert claims(summarize(noisy, setup), noisy)["oracle"]["selected"] is False, "+0.15 within 2 SE: not selected"
    path = tmp_path / "designs.json"
    for command in ("one", "two", "one", "three", "four"):
        record = record_design(str(path), command, summary, runs, verdicts)
    designs = json.loads(path.read_text())["designs"]
    assert [d["command"] for d in designs] == ["two", "one", "three", "four"], "the same command is replaced, not added"
    assert record["gap_closed"]["mole"] == pytest.approx(0.25) and record["oracle_minus_mix"]["diff"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="already records 4 designs"):
        record_design(str(path), "five", summary, runs, verdicts)


@pytest.mark.slow
def test_boundary_map_trains_each_cell_at_its_rank_and_domains_and_reuses_the_main_runs(cues_work, cues_report, cues_boundary):
    document = json.loads((cues_boundary / "conflict_cues.boundary.json").read_text())
    cells = {(c["rank"], len(c["domains"])): c for c in document["cells"]}
    assert sorted(cells) == [(1, 2), (1, 6), (2, 2), (2, 6)], sorted(cells)
    assert document["mole"] == "mole", "no test report in its --out to choose from: the default routing"
    main = json.loads((cues_report / "conflict_cues.runs.json").read_text())["runs"]
    recipe_cell = cells[(1, 6)]
    for variant in ("mix", "oracle", "mole"):
        seed0 = [r for r in main if r["spec"]["variant"] == variant]
        mean = sum(m["accuracy"] for m in seed0[0]["domains"].values()) / 6
        assert recipe_cell["mean_of_domains"][variant]["mean"] == pytest.approx(mean), f"{variant}: not the main runs"
    boundary_dirs = sorted(p.name for p in (cues_work / "cues" / "smoke" / "boundary").iterdir())
    assert boundary_dirs == ["r1_d2", "r2_d2", "r2_d6"], f"the recipe's cell must reuse the main runs: {boundary_dirs}"
    for (rank, count), cell in cells.items():
        assert cell["domains"] == list(CUE_DOMAINS[:count])
        for variant in ("mix", "oracle", "mole"):
            run_dir = os.path.join(cell["work_dir"], "test", f"{variant}_seed0")
            adapter = json.loads(open(os.path.join(run_dir, "train", "adapter", "mole_config.json")).read())
            assert (adapter["r"], adapter["alpha"]) == (rank, 2.0 * rank), f"{run_dir}: alpha / r must stay the recipe's 2"
            experts = 1 if variant == "mix" else count
            assert adapter["num_experts"] == experts, f"{run_dir}: K={adapter['num_experts']}, expected {experts}"
            predictions = open(os.path.join(run_dir, "eval_test", "predictions.jsonl")).read().splitlines()
            assert {json.loads(line)["domain"] for line in predictions} == set(CUE_DOMAINS[:count])
        assert set(cell["per_domain"]["oracle"]) == set(CUE_DOMAINS[:count])
    text = (cues_boundary / "conflict_cues.boundary.md").read_text()
    assert "## 2 domains (alpha, beta)" in text and "--boundary-ranks 1 2" in text


def test_boundary_map_refuses_a_cell_the_suite_cannot_hold(tmp_path):
    from experiments.conflict import ExperimentConfig
    from experiments.conflict_boundary import cell_config

    main = ExperimentConfig(train_config="experiments/conflict.yaml", base_model="b", work_dir=str(tmp_path), suite="cues")
    with pytest.raises(ValueError, match="7 domains, but a conflict needs at least 2 and suite 'cues' has 6"):
        cell_config(main, {"r": 1, "alpha": 2}, 1, 7, "mole")
    with pytest.raises(ValueError, match="1 domains, but a conflict needs at least 2"):
        cell_config(main, {"r": 1, "alpha": 2}, 1, 1, "mole")
    with pytest.raises(ValueError, match="LoRA rank 0 must be at least 1"):
        cell_config(main, {"r": 1, "alpha": 2}, 0, 3, "mole")
    cell = cell_config(main, {"r": 1, "alpha": 2}, 8, 3, "mole_hard")
    assert cell.variants == ["mix", "oracle", "mole_hard"] and cell.domain_names == ("alpha", "beta", "gamma")
    assert cell.extra_overrides == ["lora.r=8", "lora.alpha=16"]


@pytest.mark.slow
def test_router_probe_runs_on_the_smoke_adapters_learned_and_domain_routed(cues_work, cues_report, tmp_path):
    from experiments.router_probe import main as probe

    runs = cues_work / "cues" / "smoke" / "test"
    for variant, routed in (("mole", True), ("mole_prefix", True), ("oracle", False)):
        out = tmp_path / f"{variant}.json"
        assert probe(["--base", str(cues_work / "base_smoke"), "--adapter", str(runs / f"{variant}_seed0" / "train" / "adapter"),
                      "--split", "test", "--max-samples", "4", "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert sorted(result["domains"]) == sorted(CUE_DOMAINS) and result["chance"] == pytest.approx(1 / 6)
        assert [row["layer"] for row in result["layers"]] == [0, 1, 2, 3]
        for row in result["layers"]:
            assert 0.0 <= row["probe_accuracy_answer"] <= 1.0 and row["tokens_answer"] > 0, row
            assert ("router_nmi_answer" in row) is routed, f"{variant}: a router NMI only for a learned router: {row}"


@pytest.mark.slow
def test_routing_diagnosis_summarises_the_smoke_runs_routers(cues_work, cues_report, tmp_path):
    from experiments.routing_diagnosis import main as diagnose

    runs = cues_work / "cues" / "smoke" / "test"
    assert diagnose([f"mole={runs / 'mole_seed0'}", f"prefix={runs / 'mole_prefix_seed0'}", "--out", str(tmp_path / "d")]) == 0
    rows = json.loads((tmp_path / "d.json").read_text())
    for name in ("mole", "prefix"):
        point = rows[name]["curve"][0]
        assert point["step"] == 6 and len(rows[name]["curve"]) == 1, "6 steps: one point, the last step"
        assert len(point["router_entropy"]) == 4, point
        assert all(0.0 <= h <= math.log(6) + 1e-6 for h in point["router_entropy"]), point
        assert all(1 / 6 - 1e-6 <= s <= 1.0 for s in point["top_expert_share"]), point
        assert point["nmi"] is None, "the smoke recipe logs no routing images"
    assert "| mole |" in (tmp_path / "d.md").read_text()
