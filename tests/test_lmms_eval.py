"""``lmms-eval --model mole``: lmms-eval's own CLI, offline, on a task and a dataset the test writes,
scored against ``launch/eval.py`` on the same items.

It needs the ``eval`` extra (``pip install -e '.[eval]'``, as ``.ci/run`` installs it): without
lmms-eval it is skipped, except under CI, where it must run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.helpers import (REPO, TINY_MODEL, cli_env, launch_module, one_thread_for_the_module,  # noqa: F401
                           python, read_shard_samples, run_group, write_shard)

INSTALLED = importlib.util.find_spec("lmms_eval") is not None
pytestmark = pytest.mark.skipif(
    not INSTALLED and os.environ.get("CI") != "true",
    reason="lmms-eval is not installed (pip install -e '.[eval]', see README's Evaluation; CI installs it)",
)

SHARD = REPO / "data_shards" / "charts" / "test-000000.tar"
ITEMS = 6
MAX_NEW_TOKENS = 3
BATCH = 4  # both sides batch the same questions together, so padding cannot tell them apart

TASK_YAML = """\
task: mole_charts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: []
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: relaxed_accuracy
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
from PIL import Image

from lmms_eval.tasks.chartqa.utils import relaxed_correctness  # lmms-eval's own ChartQA metric


def doc_to_visual(doc):
    return [Image.open(doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"relaxed_accuracy": float(relaxed_correctness(results[0], doc["answer"]))}
'''


def write_task(folder: Path, samples: list[dict]) -> None:
    """The samples as a JSON-lines dataset (question, answer, the image file as the shard holds it) and
    an lmms-eval task over it, in dataset order."""
    (folder / "images").mkdir(parents=True)
    with open(folder / "items.jsonl", "w") as items:
        for sample in samples:
            question, answer = (turn["value"] for turn in sample["json"]["conversations"])
            image = folder / "images" / f"{sample['__key__']}.jpg"
            image.write_bytes(sample["jpg"])
            items.write(json.dumps({"question": question.replace("<image>", "").strip(), "answer": answer,
                                    "image": str(image)}) + "\n")
    (folder / "mole_charts.yaml").write_text(TASK_YAML.format(items=folder / "items.jsonl", max_new_tokens=MAX_NEW_TOKENS))
    (folder / "utils.py").write_text(TASK_UTILS)


def with_answer(sample: dict, answer: str) -> dict:
    question = sample["json"]["conversations"][0]
    return {**sample, "json": {"conversations": [question, {"from": "gpt", "value": answer}]}}


def random_adapter(trained: Path, out: Path, scale: float = 0.5) -> Path:
    """A copy of a trained adapter with every tensor drawn at random (seeded): the tiny runs' adapters
    answer every question with nothing, this one with different text per question."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(trained, out)
    generator = torch.Generator().manual_seed(0)
    state = load_file(trained / "adapter.safetensors")
    save_file({name: torch.randn(t.shape, generator=generator).mul(scale).to(t.dtype) for name, t in state.items()},
              out / "adapter.safetensors")
    return out


def eval_py(adapter: Path, shard: Path, out: Path) -> tuple[dict[str, str], dict]:
    """``launch/eval.py`` on the first ITEMS samples of ``shard`` as domain charts scored by relaxed
    accuracy: its predictions by key and that metric's entry in metrics.json."""
    code = launch_module("eval").main(["--adapter", str(adapter), "--out", str(out), "--shards", f"charts={shard}",
                                       "--max-samples", str(ITEMS), "--max-new-tokens", str(MAX_NEW_TOKENS),
                                       "--batch-size", str(BATCH), "--metric", "charts=relaxed_accuracy"])
    assert code == 0, f"eval.py exited {code}"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())["domains"]["charts"]["metrics"]["relaxed_accuracy"]
    return {p["key"]: p["prediction"] for p in predictions}, metrics


def lmms_eval_command(adapter: Path, task_dir: Path, out: Path, task: str = "mole_charts") -> list[str]:
    return [python(), "-m", "lmms_eval", "--model", "mole", "--model_args", f"base={TINY_MODEL},adapter={adapter}",
            "--tasks", task, "--include_path", str(task_dir), "--batch_size", str(BATCH),
            "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG"]


def offline_env(home: Path) -> dict:
    return {**cli_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home)}


def test_the_mole_model_is_registered_through_lmms_evals_entry_points():
    names = [ep.name for ep in entry_points(group="lmms_eval.models")]
    assert "mole" in names, f"no 'mole' in lmms_eval.models entry points {names}: reinstall with pip install -e '.[eval]'"
    probe = "import mole.lmms_eval_model\nfrom lmms_eval.models import get_model\nprint(get_model('mole').__name__)"
    proc = run_group([python(), "-c", probe], 120, env=cli_env())  # our module first: it must not break the registry
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["MoleLMM"], proc.stdout[-2000:] + proc.stderr[-2000:]


def test_until_strings_cut_the_answer_and_bad_model_args_are_refused_before_loading(tmp_path):
    from mole.lmms_eval_model import MoleLMM, cut_at

    assert cut_at("4 sides\n\nQuestion: next", ["\n\n"]) == "4 sides"
    assert cut_at("a. b, c", [",", "."]) == "a", "the first stop string in the answer wins"
    assert cut_at(" red ", ["", "zzz"]) == "red", "empty and absent stop strings cut nothing"
    with pytest.raises(ValueError, match="--batch_size and max_new_tokens must be whole numbers >= 1 \\(no 'auto'\\)"):
        MoleLMM(adapter=str(tmp_path), batch_size="auto")
    with pytest.raises(ValueError, match="unknown model_args adaptor"):
        MoleLMM(adapter=str(tmp_path), adaptor="x")


@pytest.mark.slow
def test_lmms_eval_cli_scores_a_mole_adapter_as_eval_py_does(mode_runs, tmp_path):
    """Every other item's reference is the answer eval.py generates for it, so the score is not 0 by
    default; lmms-eval scores with its own ChartQA relaxed_correctness, eval.py with mole.scoring."""
    adapter = random_adapter(mode_runs["scaled"] / "adapter", tmp_path / "adapter")
    samples = read_shard_samples(SHARD, ITEMS)
    keys = [sample["__key__"] for sample in samples]
    generated, _ = eval_py(adapter, SHARD, tmp_path / "eval_first")
    assert len(set(generated.values())) > 1 and all(answer.strip() for answer in generated.values()), \
        f"the answers should differ and say something: {generated}"
    samples = [with_answer(s, generated[s["__key__"]]) if i % 2 == 0 else s for i, s in enumerate(samples)]
    shard = write_shard(tmp_path / "charts" / "test-000000.tar", samples)
    write_task(tmp_path / "task", samples)

    ours, our_score = eval_py(adapter, shard, tmp_path / "eval")
    assert ours == generated, "the references must not change the answers"
    proc = run_group(lmms_eval_command(adapter, tmp_path / "task", tmp_path / "lmms"), 300, env=offline_env(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "lmms").rglob("*_results.json")]
    assert len(results) == 1, f"expected one results file under {tmp_path / 'lmms'}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lmms_score = results[0]["results"]["mole_charts"]["relaxed_accuracy,none"]
    logged = [json.loads(line) for p in (tmp_path / "lmms").rglob("*_samples_mole_charts.jsonl")
              for line in p.read_text().splitlines()]
    lmms_answers = {keys[s["doc_id"]]: s["filtered_resps"] for s in logged}  # doc_id: the dataset's order
    assert lmms_answers == ours, f"lmms-eval answered {lmms_answers}, eval.py {ours}"
    assert our_score["questions"] == ITEMS and our_score["score"] >= 0.5, f"eval.py relaxed_accuracy {our_score}"
    assert our_score["score"] == pytest.approx(lmms_score), f"eval.py relaxed_accuracy {our_score['score']}, lmms-eval {lmms_score}"


def test_a_task_the_model_does_not_serve_fails_naming_it(mode_runs, tmp_path):
    adapter = mode_runs["lora"] / "adapter"
    write_task(tmp_path / "task", read_shard_samples(SHARD, 2))
    choice = (tmp_path / "task" / "mole_charts.yaml").read_text().replace("task: mole_charts", "task: mole_choice")
    choice = choice.replace("output_type: generate_until", "output_type: multiple_choice\ndoc_to_choice: [\"1\", \"2\"]")
    (tmp_path / "task" / "mole_choice.yaml").write_text(choice.split("generation_kwargs:")[0] + "metric_list:\n  - metric: acc\n")
    proc = run_group(lmms_eval_command(adapter, tmp_path / "task", tmp_path / "lmms", "mole_choice"), 300,
                     env=offline_env(tmp_path / "hf"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "task 'mole_choice' asks for loglikelihood" in output, output[-4000:]
