"""Held-out answers generated during a 2-rank ZeRO-3 run of the tiny LLaVA-NeXT and scored by each domain's
metric, as ``launch/eval.py`` scores the final adapter on the same samples."""

from __future__ import annotations

import json

import pytest

from tests.helpers import (REPO, launch_module, launch_training, one_thread_for_the_module,  # noqa: F401
                           read_shard_samples, text_sample, write_shard)

STEPS = 2


@pytest.mark.distributed
def test_held_out_metrics_are_generated_on_every_rank_and_match_eval_py(tmp_path):
    """The charts held-out set alternates text-only and image samples, so one rank's questions are all
    text and the other's all images: the vision tower must still run on both (ZeRO-3, every tensor
    partitioned) or the run would hang. LLaVA-NeXT's vision path reads ``image_newline``, a parameter of
    the top model itself, which no module's forward gathers when generation embeds the prompts: the
    run fails unless held-out generation gathers it (``parameters_held_by_the_model``)."""
    charts = read_shard_samples(REPO / "data_shards" / "charts" / "val-000000.tar", 4)
    mixed = [s for i, image in enumerate(charts) for s in (text_sample(f"text_{i}", f"How many sides has shape {i}?", "4"), image)]
    val = write_shard(tmp_path / "mixed" / "val-000000.tar", mixed)
    shapes_val = REPO / "data_shards" / "shapes" / "val-000000.tar"
    domains = (f"data.domains=[{{name: charts, shards: '{REPO}/data_shards/charts/train-000000.tar', val_shards: '{val}', "
               f"metric: relaxed_accuracy}}, {{name: shapes, shards: '{REPO}/data_shards/shapes/train-000000.tar', "
               f"val_shards: '{shapes_val}', metric: [closed_accuracy, open_recall]}}]")
    out = tmp_path / "run"
    launch_training(out, f"model.name_or_path={REPO / 'models' / 'tiny-llava-next'}", domains, f"train.max_steps={STEPS}", f"train.eval_every={STEPS}", "train.eval_batches=1",
                    "train.eval_max_new_tokens=3", "train.log_routing_every=0")

    logged = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        logged.update({k: v for k, v in json.loads(line).items() if k.startswith("eval/")})
    for tag in ("eval/loss/charts", "eval/relaxed_accuracy/charts", "eval/loss/shapes", "eval/closed_accuracy/shapes",
                "eval/open_recall/shapes"):
        assert tag in logged, f"{tag} not logged: {sorted(logged)}"
    for tag, value in logged.items():
        assert tag.startswith("eval/loss/") or 0 <= value <= 1, f"{tag} = {value}"

    samples = 1 * 4 * 2  # eval_batches x micro_batch_size x ranks: the held-out samples
    for name, shard, metrics in (("charts", val, "relaxed_accuracy"), ("shapes", shapes_val, "closed_accuracy,open_recall")):
        report = tmp_path / f"eval_{name}"
        code = launch_module("eval").main(["--adapter", str(out / "adapter"), "--out", str(report), "--shards",
                                           f"{name}={shard}", "--max-samples", str(samples), "--max-new-tokens", "3",
                                           "--metric", f"{name}={metrics}"])
        assert code == 0
        scores = json.loads((report / "metrics.json").read_text())["domains"][name]["metrics"]
        for metric, value in scores.items():
            if value["score"] is not None:
                assert logged[f"eval/{metric}/{name}"] == pytest.approx(value["score"]), \
                    f"{name} {metric}: held-out {logged[f'eval/{metric}/{name}']}, eval.py {value}"
