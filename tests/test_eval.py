"""Routing analysis (counts, shares, NMI), heatmaps, and the evaluation CLI on trained tiny adapters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mole.evaluate import EvalDomain, domain_scores, expand_eval_shards, format_table
from mole.experts import RoutingStats
from mole.routing_analysis import domain_expert_counts, domain_expert_shares, normalized_mutual_information
from mole.routing_plots import routing_heatmap_array, routing_heatmap_png
from tests.helpers import REPO, cli_env, launch_module, one_torch_thread, python, run_group


def test_nmi_is_one_when_each_domain_has_its_own_expert():
    assert normalized_mutual_information(torch.diag(torch.tensor([5.0, 7.0, 9.0]))) == pytest.approx(1.0)
    permuted = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 3.0], [6.0, 0.0, 0.0]])
    assert normalized_mutual_information(permuted) == pytest.approx(1.0), "expert labels are arbitrary"


def test_nmi_is_zero_when_the_expert_says_nothing_about_the_domain():
    same_mix = torch.tensor([[2.0, 1.0, 1.0], [4.0, 2.0, 2.0], [6.0, 3.0, 3.0]])
    assert normalized_mutual_information(same_mix) == pytest.approx(0.0, abs=1e-12)
    one_expert = torch.tensor([[5.0, 0.0], [3.0, 0.0]])
    assert normalized_mutual_information(one_expert) == 0.0, "all tokens on one expert: no specialisation"
    assert normalized_mutual_information(torch.zeros(3, 3)) == 0.0, "no tokens at all"


def test_nmi_partial_value_checked_by_hand():
    # p = [[.5, 0], [.25, .25]]: I = .5 ln(4/3) + .25 ln(2/3) + .25 ln 2; H(D) = ln 2; H(E) = H(.75, .25)
    mutual = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_expert = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mutual / ((math.log(2) + h_expert) / 2)
    got = normalized_mutual_information(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    assert got == pytest.approx(expected, rel=1e-9), f"NMI {got}, expected {expected} (about 0.3437)"


def test_domain_expert_counts_sum_samples_by_domain_per_layer():
    layer0 = RoutingStats(prob_sum=torch.zeros(3, 2), count=torch.tensor([[3.0, 1.0], [0.0, 2.0], [1.0, 1.0]]), tokens=torch.tensor([4.0, 2.0, 2.0]))
    layer1 = RoutingStats(prob_sum=torch.zeros(3, 2), count=torch.tensor([[4.0, 0.0], [2.0, 0.0], [0.0, 2.0]]), tokens=torch.tensor([4.0, 2.0, 2.0]))
    counts = domain_expert_counts([layer0, layer1], torch.tensor([0, 1, 0]), num_domains=3)
    expected = torch.tensor([[[4.0, 2.0], [0.0, 2.0], [0.0, 0.0]], [[4.0, 2.0], [2.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    assert torch.equal(counts, expected), f"counts {counts.tolist()}"
    shares = domain_expert_shares(counts)
    assert torch.allclose(shares[0, 0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)), shares[0, 0]
    assert torch.equal(shares[:, 2], torch.zeros(2, 2, dtype=torch.float64)), "a domain without tokens has zero shares"


def test_routing_heatmap_is_a_png_and_an_rgb_array():
    shares = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.0, 1.0]]])
    png = routing_heatmap_png(shares, ["a", "b"], "test", nmi=[0.4, 0.3])
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = routing_heatmap_array(shares, ["a", "b"], "test")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, f"{image.dtype} {image.shape}"
    assert image.std() > 0, "a blank image"
    with pytest.raises(ValueError, match="2 domain rows but 3 domain names"):
        routing_heatmap_png(shares, ["a", "b", "c"], "test")


def eval_args(adapter, out) -> list[str]:
    return ["--adapter", str(adapter), "--out", str(out), "--max-samples", "3", "--max-new-tokens", "3",
            "--metric", "charts=relaxed_accuracy", "--metric", "tissue=closed_accuracy,open_recall"]


@pytest.mark.parametrize("run, experts, in_process", [("lora", 1, True), ("scaled", 3, False)])
def test_eval_cli_prints_per_domain_loss_accuracy_and_nmi(mode_runs, tmp_path, capsys, run, experts, in_process):
    """The same command on a plain-LoRA and a MoLE adapter (one run in a real process, one via main())."""
    args = eval_args(mode_runs[run] / "adapter", tmp_path / "eval")
    if in_process:
        with one_torch_thread():
            code = launch_module("eval").main(args)
        stdout, stderr = capsys.readouterr()
    else:
        proc = run_group([python(), str(REPO / "launch" / "eval.py"), *args], 120, env=cli_env())
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    assert code == 0, stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    for domain in ("shapes", "charts", "tissue", "all"):
        assert domain in rows, f"no table row for {domain}:\n{stdout}"
        samples, loss, accuracy = int(rows[domain][1]), float(rows[domain][3]), float(rows[domain][4])
        assert samples == (9 if domain == "all" else 3), f"{domain}: {samples} samples, expected 3 per domain"
        assert 0 < loss < 20 and 0 <= accuracy <= 1, f"{domain}: loss {loss}, accuracy {accuracy}"
    assert f"routing: K={experts}, NMI" in stdout, stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    nmi = metrics["routing"]["nmi_per_layer"]
    assert len(nmi) == 2 and all(0 <= v <= 1 for v in nmi), f"per-layer NMI {nmi}"
    shares = torch.tensor(metrics["routing"]["shares"])
    assert shares.shape == (2, 3, experts), f"shares shape {tuple(shares.shape)}"
    assert torch.allclose(shares.sum(-1), torch.ones(2, 3, dtype=shares.dtype)), "each domain's shares should sum to 1"
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["overall"]["questions"] >= 9, f"{len(predictions)} predictions"
    assert metrics["domains"]["shapes"]["metrics"].keys() == {"normalized_match"}, "the default metric"
    assert metrics["domains"]["charts"]["metrics"].keys() == {"relaxed_accuracy"}
    assert metrics["domains"]["tissue"]["metrics"].keys() == {"closed_accuracy", "open_recall"}
    for domain, chosen in metrics["domains"].items():
        for metric, value in chosen["metrics"].items():
            scores = [p["scores"][metric] for p in predictions if p["domain"] == domain and p["scores"][metric] is not None]
            expected = sum(scores) / len(scores) if scores else None
            assert value == {"score": expected, "questions": len(scores)}, f"{domain} {metric}: {value}, predictions say {expected}"
            shown = "-" if expected is None else f"{expected:.3f}"
            assert f"{metric} {shown}" in " ".join(rows[domain]), f"the table should name {metric} for {domain}:\n{stdout}"
    if experts == 1:
        assert nmi == [0.0, 0.0], "one expert carries no domain information"
        assert not (tmp_path / "eval" / "routing.png").exists(), "no heatmap for plain LoRA"
    else:
        assert (tmp_path / "eval" / "routing.png").read_bytes()[:4] == b"\x89PNG", "routing heatmap missing"


def test_eval_shards_expand_globs_and_braces_and_name_a_missing_pattern(tmp_path):
    for name in ("test-000000.tar", "test-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    by_glob = expand_eval_shards("d", str(tmp_path / "test-*.tar"))
    by_brace = expand_eval_shards("d", str(tmp_path / "test-{000000..000001}.tar"))
    assert by_glob.urls == by_brace.urls == [str(tmp_path / "test-000000.tar"), str(tmp_path / "test-000001.tar")], by_glob.urls
    with pytest.raises(FileNotFoundError, match="domain 'nowhere'.*matches no file"):
        expand_eval_shards("nowhere", str(tmp_path / "val-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"domain 'part'.*1 missing, e.g. .*test-000002.tar"):
        expand_eval_shards("part", str(tmp_path / "test-{000000..000002}.tar"))


def test_eval_counts_a_torn_shard_and_scores_the_samples_before_the_damage(mode_runs, tmp_path, capsys):
    whole = REPO / "data_shards" / "shapes" / "test-000000.tar"
    data = whole.read_bytes()
    torn = tmp_path / "torn" / "test-000000.tar"
    torn.parent.mkdir()
    torn.write_bytes(data[: len(data) // 3])  # cut mid-archive: no end-of-archive marker
    out = tmp_path / "eval"
    args = ["--adapter", str(mode_runs["lora"] / "adapter"), "--out", str(out), "--max-new-tokens", "2",
            "--shards", f"torn={torn}"]
    with one_torch_thread():
        code = launch_module("eval").main(args)
    _, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    torn_metrics = json.loads((out / "metrics.json").read_text())["domains"]["torn"]
    assert torn_metrics["skipped"] == {"corrupt_tar": 1}, torn_metrics["skipped"]
    assert torn_metrics["samples"] >= 1, "the samples before the damage are still scored"


def test_domain_scores_average_each_metric_over_the_questions_it_applies_to():
    domain = EvalDomain("path", [], ("closed_accuracy", "open_recall"))
    predictions = [
        {"domain": "path", "scores": {"closed_accuracy": 1.0, "open_recall": None}},
        {"domain": "path", "scores": {"closed_accuracy": 0.0, "open_recall": None}},
        {"domain": "path", "scores": {"closed_accuracy": None, "open_recall": 0.5}},
        {"domain": "other", "scores": {"closed_accuracy": 1.0, "open_recall": 1.0}},
    ]
    scores = domain_scores(domain, predictions)
    assert scores == {"closed_accuracy": {"score": 0.5, "questions": 2}, "open_recall": {"score": 0.5, "questions": 1}}, scores
    row = {"samples": 3, "questions": 3, "loss": 1.0, "accuracy": 0.0, "exact_match": 0.0, "top_expert_share": None,
           "skipped": {}, "metrics": scores}
    overall = {k: v for k, v in row.items() if k not in ("metrics", "skipped")}
    table = format_table({"domains": {"path": row}, "overall": overall,
                          "routing": {"num_experts": 1, "nmi_per_layer": [], "mean_nmi": None}})
    assert "closed_accuracy 0.500 (2 q) open_recall 0.500 (1 q)" in table, table
    with pytest.raises(ValueError, match="domain 'd': unknown metric 'f1'; the metrics are exact_match"):
        EvalDomain("d", [], ("f1",))


@pytest.mark.parametrize("metric, message", [
    ("docs=anls", "no domain 'docs'; the domains are shapes, charts, tissue"),
    ("charts=relaxed", "unknown metric 'relaxed'; the metrics are exact_match, normalized_match, relaxed_accuracy"),
])
def test_eval_names_a_wrong_metric_choice_before_loading_anything(tmp_path, capsys, metric, message):
    code = launch_module("eval").main(["--adapter", str(tmp_path / "none"), "--data-root", str(REPO / "data_shards"),
                                       "--metric", metric])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--batch-size", "--max-samples", "--max-new-tokens", "--max-length"])
def test_eval_refuses_a_count_below_one_before_any_work(tmp_path, capsys, option):
    """``--batch-size 0`` evaluated nothing and overwrote metrics.json; ``--max-samples -1`` crashed."""
    with pytest.raises(SystemExit):
        launch_module("eval").main(["--adapter", str(tmp_path), option, "0"])
    assert f"{option} must be >= 1, got 0" in capsys.readouterr().err
