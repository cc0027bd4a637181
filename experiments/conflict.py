"""The data-conflict experiment (issues 6 and 20): does MoLE on a mix of conflicting domains beat plain LoRA?

On a suite of domains (:data:`SUITES`: ``bundled``, the three bundled domains ``shapes``, ``charts``,
``tissue``, the same questions answered in three conventions; ``cues``, six domains that share every
image and question and differ only by a cue in the prompt, their answers mapping the same words each
its own way, ``tools/make_cue_data.py``) and a small base pretrained on neutral captions
(:mod:`experiments.base_model`),
adapters are trained with the real trainer (:func:`mole.train.loop.run`, one rank, ZeRO-2) and
evaluated with :func:`mole.evaluate.evaluate`, for several seeds:

=============  ===  ==========  ===================================================================
variant        K    steps       data
=============  ===  ==========  ===================================================================
single         1    N/D         one domain alone (one run per domain): as many samples of that
                                domain as the mix sees of it in N steps (D = number of domains)
mix            1    N           the equal-weight mix
mix2x          1    2N          the mix, twice the samples; with small resampled data that is
                                twice the passes over the same data
mole           D    N           the mix, default routing (``scaled``; also reported as mole_scaled)
mole_hard      D    N           the mix, ``hard`` routing (the authors' released code)
mole_dense     D    N           the mix, ``dense`` routing (softmax-weighted sum of all experts)
oracle         D    N           the mix, ``domain`` routing: each domain its own expert, chosen by the
                                sample's domain in training and evaluation (the ceiling of routing)
mole_prefix    D    N           the mix, ``scaled`` routing of ``mole.router_input: prefix_mean``: each
                                token routed by the mean of its sample's MLP inputs so far
=============  ===  ==========  ===================================================================

K = D, the suite's number of domains, for every routed variant.

Each run is one fresh process (trainer, then evaluation, logs to ``<run>/run.log``), ``workers``
at a time with one CPU thread each; a run whose ``result.json`` records the same spec is reused,
so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

DOMAINS = ("shapes", "charts", "tissue")
"""The bundled suite's domains."""
ROUTED = 0
"""``num_experts`` of a routed variant: one expert per domain of the suite."""
# name -> (num_experts, routing, steps as a multiple of N, trained on the mix)
VARIANTS: dict[str, tuple[int, str, float, bool]] = {
    "single": (1, "scaled", 0.0, False),  # steps: N / len(domains), see run_specs
    "mix": (1, "scaled", 1.0, True),
    "mix2x": (1, "scaled", 2.0, True),
    "mole": (ROUTED, "scaled", 1.0, True),
    "mole_hard": (ROUTED, "hard", 1.0, True),
    "mole_dense": (ROUTED, "dense", 1.0, True),
    "oracle": (ROUTED, "domain", 1.0, True),
    "mole_prefix": (ROUTED, "scaled", 1.0, True),  # and VARIANT_SETTINGS
}
VARIANT_SETTINGS = {"mole_prefix": ["mole.router_input=prefix_mean"]}
"""Trainer overrides a variant adds to its routing: ``mole_prefix`` routes each token by its sample so far."""
ALIASES = {"mole_scaled": "mole"}  # reported rows that are the same runs as another row

# Each bundled domain's answer convention (data_shards/README.md), as a full match of the answer.
_COLOURS = "red|green|blue|yellow|purple|orange"
CONVENTIONS = {
    "shapes": re.compile(rf"({_COLOURS}|one|two|three|four|five|yes|no)"),
    "charts": re.compile(r"([RGBYPOTF]|[1-5])"),
    "tissue": re.compile(rf"stain: ({_COLOURS})|count: [1-5]|result: (positive|negative)"),
}
QUESTION_KINDS = {"What color": "color", "How many": "count", "Is there": "has", "List": "list"}


@dataclass(frozen=True)
class Suite:
    """A set of domains the experiment runs on: where their shards are and which variants it runs by
    default. ``conventions`` (bundled) tells an answer's convention by its form; without it (cues, where
    every domain writes the same forms) an answer is foreign when it is another domain's answer to the
    same sample's question (:func:`foreign_answers`)."""

    name: str
    domains: tuple[str, ...]
    data_root: str
    variants: tuple[str, ...]
    conventions: dict[str, re.Pattern] | None = None
    about: str = ""
    max_new_tokens: int = 12
    """Generated tokens per answer in evaluation (cues: its longest reference, a ``list`` answer, takes 14
    with EOS)."""

    @property
    def report_name(self) -> str:
        """``conflict`` for the bundled suite (its reports predate the others), else ``conflict_<name>``."""
        return "conflict" if self.name == "bundled" else f"conflict_{self.name}"


SUITES = {
    "bundled": Suite("bundled", DOMAINS, "data_shards", ("single", "mix", "mix2x", "mole", "mole_hard", "mole_dense"),
                     CONVENTIONS, "the three bundled domains (data_shards/README.md): the same questions answered in "
                     "three conventions, each domain obvious from its image"),
    "cues": Suite("cues", ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"), "data_shards/cues", tuple(VARIANTS),
                  None, "six domains sharing every image and question, told apart only by a cue in the prompt "
                  "(`[beta] What color is the main object?`); domain k rotates the colour and count words by k places "
                  "and inverts yes/no when k is odd, in shared answer templates (data_shards/cues/README.md, "
                  "tools/make_cue_data.py)", max_new_tokens=16),
}


@dataclass
class RunSpec:
    """One adapter to train and evaluate: everything that determines its result."""

    variant: str
    seed: int
    domains: list[str]  # trained on (and evaluated on, for single; all domains otherwise)
    eval_domains: list[str]
    overrides: list[str]  # trainer key=value overrides on top of the experiment's YAML
    split: str
    max_eval_samples: int | None
    recipe: str  # digest of the trainer YAML's text and the base's recipe (:func:`recipe_digest`)

    @property
    def name(self) -> str:
        suffix = f"_{self.domains[0]}" if self.variant == "single" else ""
        return f"{self.variant}{suffix}_seed{self.seed}"


@dataclass
class ExperimentConfig:
    train_config: str
    """The trainer YAML every run starts from (recipe: LoRA rank, LR, batch, DeepSpeed JSON)."""
    base_model: str
    """Directory of the pretrained base (written by the driver if missing)."""
    work_dir: str
    """Runs go to ``work_dir/<split>/<run name>/``."""
    data_root: str = "data_shards"
    suite: str = "bundled"
    """Which :data:`SUITES` entry (its domains under ``data_root``)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 1200
    """N: optimizer steps of the mix runs."""
    split: str = "test"
    """Evaluation split: ``val`` while choosing the recipe, ``test`` for the reported numbers."""
    max_eval_samples: int | None = None
    """Samples per domain evaluated (default: the whole split)."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    workers: int = 2
    extra_overrides: list[str] = field(default_factory=list)
    """Overrides applied to every run after the experiment's own (e.g. ``lora.r=4`` while tuning on val)."""
    domains: list[str] | None = None
    """The suite's domains trained and evaluated (default: all of them); the boundary map's fewer-domain
    cells take the first few (:mod:`experiments.conflict_boundary`)."""

    @property
    def domain_names(self) -> tuple[str, ...]:
        suite = SUITES[self.suite].domains
        if self.domains is None:
            return suite
        unknown = [d for d in self.domains if d not in suite]
        if unknown or not self.domains:
            raise ValueError(f"domains {self.domains}: not a non-empty subset of suite {self.suite!r}'s {list(suite)}")
        return tuple(self.domains)


def domain_entry(root: str, name: str) -> str:
    """One ``data.domains`` item as a YAML flow mapping (train shards, val shards, weight 1)."""
    return (f"{{name: {name}, shards: '{root}/{name}/train-{{000000..000001}}.tar', "
            f"val_shards: '{root}/{name}/val-000000.tar', weight: 1.0}}")


def recipe_digest(train_config: str, base_model: str) -> str:
    """What every run starts from besides its own spec: the trainer YAML's text and the base's recipe
    and pretraining config (its ``base.json``), and what the LM loss means (``LM_LOSS_VERSION``). Part of
    each spec, so that a cached result is reused only under the recipe it was trained with, not
    relabelled with an edited one."""
    with open(train_config, "rb") as handle:
        text = handle.read()
    with open(os.path.join(base_model, "base.json")) as handle:
        base = json.load(handle)
    from mole.lm_loss import LM_LOSS_VERSION

    made_from = json.dumps({**{k: base.get(k) for k in ("recipe", "pretrain_config")}, "lm_loss": LM_LOSS_VERSION},
                           sort_keys=True).encode()
    return hashlib.sha256(text + b"\0" + made_from).hexdigest()[:16]


def run_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    """Every run of the experiment, seeds outermost so a partial experiment has whole seeds."""
    root = cfg.data_root  # relative paths stay relative: the runs share our working directory
    recipe = recipe_digest(cfg.train_config, cfg.base_model)
    specs = []
    suite = cfg.domain_names
    for seed in cfg.seeds:
        for variant in cfg.variants:
            experts, routing, multiple, mixed = VARIANTS[variant]
            experts = experts or len(suite)
            groups = [list(suite)] if mixed else [[d] for d in suite]
            steps = round(cfg.steps * multiple) if mixed else max(1, round(cfg.steps / len(suite)))
            for domains in groups:
                data = "[" + ", ".join(domain_entry(root, d) for d in domains) + "]"
                overrides = [f"model.name_or_path={cfg.base_model}", f"mole.num_experts={experts}",
                             f"mole.routing={routing}", *VARIANT_SETTINGS.get(variant, ()), f"train.max_steps={steps}",
                             f"train.seed={seed}", f"data.domains={data}", *cfg.extra_overrides]
                specs.append(RunSpec(variant, seed, domains, domains, overrides, cfg.split, cfg.max_eval_samples, recipe))
    return specs


def run_all(cfg: ExperimentConfig) -> list[dict]:
    """Train and evaluate every run (``cfg.workers`` fresh processes at a time); results in spec order."""
    specs = run_specs(cfg)
    out_dir = os.path.join(os.path.abspath(cfg.work_dir), cfg.split)
    results: dict[int, dict] = {}
    pending = []
    for index, spec in enumerate(specs):
        cached = _cached_result(os.path.join(out_dir, spec.name), spec)
        if cached is not None:
            results[index] = cached
        else:
            pending.append(index)
    log.info("%d runs (%d reused from %s), %d worker(s)", len(specs), len(specs) - len(pending), out_dir, cfg.workers)
    started = time.perf_counter()

    def finished(done: int, index: int, result: dict) -> None:
        results[index] = result
        accuracy = " ".join(f"{d} {m['accuracy']:.3f}" for d, m in result["domains"].items())
        log.info("[%d/%d] %s: %s (%.0f s; %.0f s elapsed)", done, len(pending), specs[index].name, accuracy,
                 result["seconds"]["total"], time.perf_counter() - started)

    if cfg.workers == 0:  # in this process, one after another (the smoke test: no process start-up per run)
        for done, index in enumerate(pending, 1):
            finished(done, index, train_and_evaluate(cfg.train_config, specs[index], os.path.join(out_dir, specs[index].name),
                                                     isolated=False))
        return _with_answer_analysis([results[i] for i in range(len(specs))], out_dir, SUITES[cfg.suite], cfg.domain_names)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=cfg.workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(train_and_evaluate, cfg.train_config, specs[i], os.path.join(out_dir, specs[i].name)): i
                   for i in pending}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            finished(done, futures[future], future.result())  # a failed run fails the experiment, naming its log
    return _with_answer_analysis([results[i] for i in range(len(specs))], out_dir, SUITES[cfg.suite], cfg.domain_names)


def _with_answer_analysis(results: list[dict], out_dir: str, suite: Suite, domains: tuple[str, ...]) -> list[dict]:
    """Add what each run's saved evaluation tells beyond its ``result.json`` (so that cached runs gain it
    too): the answer analysis (foreign answers among ``domains``, the experiment's) and the top-expert
    share per layer."""
    for result in results:
        eval_dir = os.path.join(out_dir, result["name"], f"eval_{result['spec']['split']}")
        result["answers"] = answer_analysis(os.path.join(eval_dir, "predictions.jsonl"), suite, domains)
        result["top_expert_share_per_layer"] = top_expert_share_per_layer(os.path.join(eval_dir, "metrics.json"))
    return results


def top_expert_share_per_layer(metrics_path: str) -> list[float] | None:
    """Per layer, the largest expert share of each evaluated domain's tokens, averaged over the domains
    (``None`` for one expert): how concentrated routing is, layer by layer. From the evaluation's saved
    routing shares (``mole.evaluate.save_results``)."""
    with open(metrics_path) as handle:
        routing = json.load(handle)["routing"]
    if routing["num_experts"] <= 1:
        return None
    return [sum(max(domain) for domain in layer) / len(layer) for layer in routing["shares"]]


def foreign_answers(domain: str, key: str, turn: int, domains: tuple[str, ...]) -> set[str]:
    """The ``cues`` suite: the normalised answers the *other* domains give to the question of sample
    ``key``'s ``turn`` (the same image and question in every domain, ``tools.make_cue_data``)."""
    from mole.answers import normalize_answer
    from tools.make_cue_data import make_sample

    _, split, index = key.rsplit("_", 2)
    answers = set()
    for other in domains:
        if other != domain:
            turns = json.loads(make_sample(other, split, int(index))["json"])["conversations"]
            answers.add(normalize_answer(turns[2 * turn + 1]["value"]))
    return answers


def answer_analysis(predictions_path: str, suite: Suite = SUITES["bundled"], domains: tuple[str, ...] | None = None) -> dict:
    """Per domain: which convention the generated answers follow (own / another domain's / neither)
    and the accuracy per question kind. A mixed adapter confusing the domains' conventions shows up
    as ``foreign``; wrong content in the right convention does not. Without ``suite.conventions`` an
    answer is ``own`` when it is right, ``foreign`` when it is another domain's answer to the same
    question (and not right), else ``neither``; the other domains are those of ``domains`` (the
    experiment's; default: the suite's), the answers the adapter could have learned instead."""
    domains = suite.domains if domains is None else domains
    from mole.answers import normalize_answer

    per_domain: dict = {}
    with open(predictions_path) as handle:
        predictions = [json.loads(line) for line in handle]
    for p in predictions:
        row = per_domain.setdefault(p["domain"], {"questions": 0, "own": 0, "foreign": 0, "neither": 0, "kinds": {}})
        answer = p["prediction"].strip()
        if suite.conventions is not None:
            own = suite.conventions[p["domain"]].fullmatch(answer) is not None
            foreign = any(c.fullmatch(answer) for d, c in suite.conventions.items() if d != p["domain"])
        else:
            own = bool(p["match"])
            foreign = normalize_answer(answer) in foreign_answers(p["domain"], p["key"], p["turn"], domains)
        row["questions"] += 1
        row["own" if own else "foreign" if foreign else "neither"] += 1
        question = re.sub(r"^\[\w+\] ", "", p["question"].replace("<image>", "").strip())  # a cue first
        kind = next((k for prefix, k in QUESTION_KINDS.items() if question.startswith(prefix)), "text")
        hits = row["kinds"].setdefault(kind, [0, 0])
        hits[0] += bool(p["match"])
        hits[1] += 1
    return {domain: {"own": r["own"] / r["questions"], "foreign": r["foreign"] / r["questions"],
                     "neither": r["neither"] / r["questions"],
                     "accuracy_by_kind": {k: h[0] / h[1] for k, h in sorted(r["kinds"].items())}}
            for domain, r in per_domain.items()}


def _cached_result(run_dir: str, spec: RunSpec) -> dict | None:
    path = os.path.join(run_dir, "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        result = json.load(handle)
    return result if result.get("spec") == asdict(spec) else None


def train_and_evaluate(train_config: str, spec: RunSpec, run_dir: str, isolated: bool = True) -> dict:
    """Train one adapter with the trainer, evaluate it, write ``run_dir/result.json``; return the result.

    ``isolated`` (a fresh process of its own): become rank 0 of a world of 1 on a free MASTER_PORT,
    use one CPU thread and send all output to ``run_dir/run.log``. Otherwise run in this process,
    starting its single-rank process group on the first call. A failure raises naming the run.
    """
    import shutil

    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)  # a stale or different run: start it fresh, never resume it
    os.makedirs(run_dir)
    log_path = os.path.join(run_dir, "run.log")
    import torch.distributed as dist

    if isolated:
        with open(log_path, "w") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
        import torch

        torch.set_num_threads(1)
    if isolated or not dist.is_initialized():
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    try:
        return _train_and_evaluate(train_config, spec, run_dir)
    except Exception as err:
        where = f"; see {log_path}" if isolated else ""
        raise RuntimeError(f"run {spec.name} failed: {err!r}{where}") from err


def _train_and_evaluate(train_config: str, spec: RunSpec, run_dir: str) -> dict:
    from mole.config import load_config
    from mole.evaluate import evaluate, expand_eval_shards, save_results
    from mole.inference import load_model, load_processor
    from mole.train.loop import run

    started = time.perf_counter()
    cfg = load_config(train_config, [*spec.overrides, f"output_dir={os.path.join(run_dir, 'train')}", "train.resume=never"])
    if run(cfg)["stopped"]:  # a SIGTERM/SIGUSR1 cut it short: never cache a half-trained adapter's result
        raise RuntimeError(f"training stopped early by a signal before train.max_steps={cfg.train.max_steps}")
    trained = time.perf_counter()

    adapter = os.path.join(cfg.output_dir, "adapter")
    model = load_model(cfg.model.name_or_path, adapter, device="cpu", dtype="fp32")
    processor = load_processor(cfg.model.name_or_path, adapter_dir=adapter)
    root = os.path.dirname(os.path.dirname(cfg.data.domains[0].val_shards))
    domains = [expand_eval_shards(d, os.path.join(root, d, f"{spec.split}-*.tar")) for d in spec.eval_domains]
    suite = next(s for s in SUITES.values() if set(spec.domains) <= set(s.domains))
    route = {d: d for d in spec.eval_domains} if cfg.mole.routing == "domain" else None  # oracle: each its own expert
    results = evaluate(model, processor, domains, batch_size=16, max_new_tokens=suite.max_new_tokens,
                       image_aspect=cfg.data.image_aspect, image_backend=cfg.data.image_backend,
                       max_samples=spec.max_eval_samples, max_length=cfg.data.max_length, route=route)
    save_results(results, os.path.join(run_dir, f"eval_{spec.split}"), f"{spec.name} ({spec.split})")
    result = {
        "spec": asdict(spec),
        "name": spec.name,
        "domains": {name: {k: m[k] for k in ("accuracy", "exact_match", "loss", "questions", "top_expert_share")}
                    for name, m in results["domains"].items()},
        "nmi_per_layer": results["routing"]["nmi_per_layer"] if cfg.mole.num_experts > 1 else None,
        "train": _train_summary(cfg.output_dir),
        "seconds": {"train": round(trained - started, 1), "total": round(time.perf_counter() - started, 1)},
    }
    with open(os.path.join(run_dir, "result.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    return result


def _train_summary(output_dir: str, window: int = 20) -> dict:
    """Last-``window``-step means of the training LM and aux loss, and the final per-layer expert load."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    rows = [r for r in rows if "train/lm_loss" in r][-window:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    load = {k: v for k, v in rows[-1].items() if k.startswith("moe/load/")}
    return {"lm_loss": mean("train/lm_loss"), "aux_loss": mean("train/aux_loss"), "steps": rows[-1]["step"],
            "expert_load": load}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def describe_setup(cfg: ExperimentConfig, base: dict, train_config: str, smoke: bool) -> dict:
    """The ``setup`` block of ``conflict.json``: what was run, in data and in words."""
    import yaml

    with open(train_config) as handle:
        recipe = yaml.safe_load(handle)
    suite = SUITES[cfg.suite]
    n, d = cfg.steps, len(cfg.domain_names)
    batch = recipe["train"]["micro_batch_size"]
    steps = {v: (max(1, round(n / d)) if not VARIANTS[v][3] else round(n * VARIANTS[v][2])) for v in cfg.variants}
    lora = recipe["lora"]
    sizes = base["recipe"]
    train_samples = sum(len(read_keys(path)) for path in _train_shards(cfg.data_root, cfg.domain_names[0]))
    description = [
        f"Suite `{suite.name}`: {suite.about}.",
        f"Base: a LLaVA-1.5-shaped model (CLIP ViT hidden {sizes['vision_hidden']} x {sizes['vision_layers']} layers, "
        f"2-layer projector, Llama hidden {sizes['text_hidden']} x {sizes['text_layers']} layers, "
        f"{base['parameters']:,} parameters; models/tiny-llava's tokenizer and processor), every weight pretrained "
        f"from random for {base['pretrain_config']['steps']} steps x {base['pretrain_config']['batch_size']} on "
        f"{base['pretrain_config']['samples_per_domain']} neutral captions per domain drawn by the bundled drawing "
        "functions (colours as words, counts as digit or word at random, no domain's answer convention); "
        "exact-caption accuracy on unseen images: "
        + ", ".join(f"{k} {v:.2f}" for k, v in base["caption_accuracy"].items()) + ". Frozen afterwards.",
        f"Adapters: LoRA r={lora['r']}, alpha={lora['alpha']:g}, dropout {lora['dropout']:g} on q/k/v/o and on "
        f"gate/up/down (K experts there), projector trained; AdamW lr {recipe['train']['lr']:g} "
        f"(projector {recipe['train']['projector_lr']:g}), warmup {recipe['train']['warmup_steps']} + cosine, "
        f"batch {batch}, fp32, one rank, ZeRO-2, the real trainer (`mole.train.loop.run`) with "
        f"`{train_config}`; aux loss {recipe['mole']['aux_loss']} x {recipe['mole']['aux_weight']:g}.",
        f"Steps: N = {n} for `mix` and the MoLE rows ({n * batch} samples, about {n * batch // d} per domain); "
        f"`mix2x` {2 * n} steps: the training shards are small ({train_samples} samples per domain) and resampled, so twice "
        f"the samples means twice the passes over the same data; `single` {steps.get('single', max(1, round(n / d)))} "
        "steps on its domain alone, i.e. as many samples of that domain as the mix sees.",
        f"`mole` uses the default routing (`scaled`); `mole_scaled` is the same runs, listed for the routing "
        f"comparison; every routed row has K = {d} experts. `oracle`: `mole.routing: domain`, each domain its own "
        "expert chosen by the sample's domain in training and evaluation (no router, no aux loss)."
        + (" `mole_prefix`: `scaled` routing whose router reads the mean of the sample's MLP inputs so far "
           "(`mole.router_input: prefix_mean`)." if "mole_prefix" in cfg.variants else ""),
        f"Evaluation: `{cfg.data_root}/<domain>/{cfg.split}-*.tar`"
        + (f", first {cfg.max_eval_samples} samples per domain" if cfg.max_eval_samples else " (every sample)")
        + f"; every answer turn generated greedily (at most {suite.max_new_tokens} new tokens) and matched after "
        "VQAv2 normalisation. "
        "`single` is evaluated on its own domain only. The recipe (rank, LR, N) was chosen on the val split.",
    ]
    if cfg.domain_names != suite.domains:
        description.insert(1, f"Domains: {', '.join(cfg.domain_names)} only ({d} of the suite's {len(suite.domains)}).")
    if cfg.extra_overrides:
        description.append("Every run also sets " + ", ".join(f"`{o}`" for o in cfg.extra_overrides)
                           + " on top of the recipe above.")
    if smoke:
        description.insert(0, "SMOKE SETTING: a pipeline check with a barely trained base and a few steps; "
                              "the numbers mean nothing.")
    return {
        "split": cfg.split, "seeds": cfg.seeds, "seeds_count": len(cfg.seeds), "steps_N": n, "steps": steps,
        "batch_size": batch, "train_config": train_config, "train_recipe": recipe,
        "extra_overrides": cfg.extra_overrides, "base": base, "aliases": ALIASES,
        "metric": "accuracy: VQAv2-normalised exact answer match (mole.answers), per answer turn",
        "eval_max_new_tokens": suite.max_new_tokens, "max_eval_samples": cfg.max_eval_samples, "workers": cfg.workers,
        "smoke": smoke, "description": description, "suite": suite.name, "domains": list(cfg.domain_names),
        "variants": list(cfg.variants),
    }


def _train_shards(root: str, domain: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(root, domain, "train-*.tar")))


def read_keys(path: str) -> list[str]:
    """The sample keys of one tar shard (its ``.json`` members)."""
    import tarfile

    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers() if m.name.endswith(".json")]
