"""Routing ``domain`` after training: evaluation, inference and lmms-eval name the domain whose expert
answers (required for such an adapter, refused for others), and exports that hold one LoRA refuse it.

The adapters are written by mole's own surgery and save path with random weights (no training): the
routing, not what was learned, is under test.
"""

from __future__ import annotations

import json
import re

import pytest

from mole.evaluate import evaluate, expand_eval_shards
from mole.inference import (
    Prompt,
    generate_answers,
    load_model,
    load_processor,
    question_turns,
)
from tests.helpers import (
    REPO,
    TINY_MODEL,
    launch_module,
    make_adapter,
    one_thread_for_the_module,  # noqa: F401  (autouse fixture)
)

DOMAINS = ("shapes", "charts")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain_adapters")
    make_adapter(root / "domain", "llava", 2, "domain", DOMAINS)
    make_adapter(root / "hard", "llava", 2, "hard")
    return {"domain": root / "domain", "hard": root / "hard"}


@pytest.fixture(scope="module")
def domain_model(adapters):
    return load_model(str(TINY_MODEL), str(adapters["domain"])), load_processor(str(TINY_MODEL))


def shapes_test():
    return [expand_eval_shards("shapes", str(REPO / "data_shards" / "shapes" / "test-000000.tar"))]


def test_evaluation_routes_every_token_of_a_domain_to_the_named_expert(domain_model):
    model, processor = domain_model
    results = {name: evaluate(model, processor, shapes_test(), max_samples=2, max_new_tokens=3, route={"shapes": name})
               for name in DOMAINS}
    for expert, name in enumerate(DOMAINS):
        counts = results[name]["routing"]["counts"]  # [layer][domain][expert]
        for layer in counts:
            assert layer[0][expert] > 0 and layer[0][1 - expert] == 0, f"--domain {name}: tokens per expert {layer[0]}"
    losses = [results[name]["domains"]["shapes"]["loss"] for name in DOMAINS]
    assert losses[0] != losses[1], "the two experts computed the same loss: the route changed nothing"
    with pytest.raises(ValueError, match=r"^this adapter routes by domain \(shapes, charts\)"):
        evaluate(model, processor, shapes_test(), max_samples=1)


def test_generation_answers_with_the_named_domains_expert(domain_model):
    model, processor = domain_model
    prompts = [Prompt(question_turns("How many objects are there?", False), None)] * 2
    one_by_one = [generate_answers(model, processor, prompts[:1], 6, domain=d)[0] for d in (0, 1)]
    assert generate_answers(model, processor, prompts, 6, domain=[0, 1]) == one_by_one, "per-prompt domains in one batch"
    with pytest.raises(ValueError, match="routes by domain"):
        generate_answers(model, processor, prompts, 6)


def test_eval_and_infer_clis_take_the_domain_and_refuse_it_in_one_line(adapters, tmp_path, capsys):
    eval_cli, infer_cli = launch_module("eval"), launch_module("infer")
    shards = ["--shards", f"shapes={REPO / 'data_shards' / 'shapes' / 'test-000000.tar'}", "--max-samples", "1",
              "--max-new-tokens", "2"]
    question = ["--prompt", "How many objects are there?", "--max-new-tokens", "2"]
    refusals = [
        (eval_cli, adapters["domain"], [*shards], r"^error: this adapter routes by domain \(shapes, charts\): --domain NAME"),
        (eval_cli, adapters["domain"], [*shards, "--domain", "docs"],
         r"^error: domain 'docs' is not one of the adapter's domains \(shapes, charts\)$"),
        (infer_cli, adapters["domain"], question, r"^error: this adapter routes by domain"),
        (infer_cli, adapters["hard"], [*question, "--domain", "shapes"],
         r"^error: --domain applies to an adapter trained with mole.routing: domain; this one routes hard$"),
    ]
    capsys.readouterr()
    for cli, adapter, args, message in refusals:
        code = cli.main(["--adapter", str(adapter), *args, *(["--out", str(tmp_path / "refused")] if cli is eval_cli else [])])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, code, lines)
        assert re.match(message, lines[0]), lines[0]
    assert eval_cli.main(["--adapter", str(adapters["domain"]), *shards, "--domain", "charts", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert all(layer[0][0] == 0 and layer[0][1] > 0 for layer in metrics["routing"]["counts"]), "charts' expert answers"
    assert infer_cli.main(["--adapter", str(adapters["domain"]), *question, "--domain", "shapes"]) == 0


@pytest.mark.parametrize("fmt", ["hf", "peft", "merged"])
def test_exports_holding_no_domain_refuse_a_domain_routed_adapter_in_one_line(adapters, tmp_path, capsys, fmt):
    capsys.readouterr()
    code = launch_module("export").main(["--adapter", str(adapters["domain"]), "--format", fmt, "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "routing 'domain'" in lines[0] and "--format mole" in lines[0], (code, lines)
    assert not (tmp_path / "out").exists(), "nothing should be written"
