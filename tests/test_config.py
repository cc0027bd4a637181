"""Config schema, YAML + overrides, validation and DeepSpeed JSON filling: fast, no model, no launch."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from mole.config import (
    Config,
    ConfigError,
    DomainConfig,
    config_to_dict,
    load_config,
    parse_cli,
    save_config,
    validate,
)
from mole.ds_config import build_ds_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory where the defaults resolve: a stub model dir and the bundled DeepSpeed JSONs."""
    (tmp_path / "models" / "tiny-llava").mkdir(parents=True)
    (tmp_path / "models" / "tiny-llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    shutil.copytree(REPO / "ds_configs", tmp_path / "ds_configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_of(overrides: list[str], path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def write_ds(workdir: Path, ds: dict) -> str:
    path = workdir / "ds_configs" / "custom.json"
    path.write_text(json.dumps(ds))
    return str(path)


# ------------------------------------------------------------------------------- loading


def test_defaults_load_with_schema_values(workdir: Path) -> None:
    cfg = load_config(None, [])
    assert cfg.mole.num_experts == 3 and cfg.mole.routing == "scaled", f"mole defaults wrong: {cfg.mole}"
    assert cfg.lora.attn_targets == ["q_proj", "k_proj", "v_proj", "o_proj"], cfg.lora.attn_targets
    assert [d.name for d in cfg.data.domains] == ["shapes", "charts", "tissue"], cfg.data.domains
    assert cfg.train.max_steps == 50 and cfg.train.precision == "auto", f"train defaults wrong: {cfg.train}"
    assert cfg.model.name_or_path == str(workdir / "models" / "tiny-llava"), cfg.model.name_or_path


def test_default_domain_lists_are_not_shared_between_configs() -> None:
    a, b = Config(), Config()
    a.data.domains.append(DomainConfig("extra", "x.tar"))
    a.lora.attn_targets.append("extra")
    assert len(b.data.domains) == 3, "default_factory must give each Config its own domain list"
    assert "extra" not in b.lora.attn_targets, "default_factory must give each Config its own target list"


def test_overrides_parse_int_float_bool_and_list(workdir: Path) -> None:
    cfg = load_config(
        None,
        [
            "train.max_steps=8",
            "train.lr=1e-4",
            "mole.aux_weight=0",
            "train.train_projector=false",
            "lora.attn_targets=[q_proj,v_proj]",
        ],
    )
    assert cfg.train.max_steps == 8, cfg.train.max_steps
    assert cfg.train.lr == pytest.approx(1e-4), f"'1e-4' (a YAML string) should parse as float: {cfg.train.lr!r}"
    assert isinstance(cfg.mole.aux_weight, float) and cfg.mole.aux_weight == 0.0, repr(cfg.mole.aux_weight)
    assert cfg.train.train_projector is False, cfg.train.train_projector
    assert cfg.lora.attn_targets == ["q_proj", "v_proj"], cfg.lora.attn_targets


def test_override_wins_over_yaml_and_keeps_other_yaml_keys(workdir: Path) -> None:
    path = workdir / "exp.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 10, "grad_accum": 2}, "lora": {"r": 8}}))
    cfg = load_config(str(path), ["train.max_steps=3", "lora={alpha: 4}"])
    assert cfg.train.max_steps == 3, "the override must win over the YAML value"
    assert cfg.train.grad_accum == 2, "YAML keys not overridden must survive"
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 4.0), f"a mapping override merges into its section: {cfg.lora}"


def test_domains_override_resolves_local_shards_and_keeps_urls(workdir: Path) -> None:
    cfg = load_config(
        None,
        ["data.domains=[{name: a, shards: 'd/train-{000000..000003}.tar'},"
         " {name: b, shards: ['pipe:cat y.tar', 's3://bucket/z.tar'], weight: 2}]"],
    )
    a, b = cfg.data.domains
    assert a.shards == str(workdir / "d" / "train-{000000..000003}.tar"), f"brace pattern made absolute: {a.shards}"
    assert b.shards == ["pipe:cat y.tar", "s3://bucket/z.tar"], f"URLs must stay untouched: {b.shards}"
    assert (a.weight, b.weight) == (1.0, 2.0), (a.weight, b.weight)


def test_relative_paths_become_absolute_against_cwd(workdir: Path) -> None:
    cfg = load_config(None, ["output_dir=runs/x", "train.ds_config=ds_configs/zero2.json"])
    assert cfg.output_dir == str(workdir / "runs" / "x"), cfg.output_dir
    assert cfg.train.ds_config == str(workdir / "ds_configs" / "zero2.json"), cfg.train.ds_config
    assert all(os.path.isabs(d.shards) for d in cfg.data.domains), cfg.data.domains


def test_saved_config_loads_back_equal_and_loading_is_deterministic(workdir: Path) -> None:
    overrides = ["train.max_steps=7", "mole.routing=dense", "data.domains=[{name: a, shards: [x.tar, y.tar]}]"]
    cfg = load_config(None, overrides)
    assert load_config(None, overrides) == cfg, "same inputs must give the same Config"
    save_config(cfg, str(workdir / "runs" / "resolved.yaml"))
    again = load_config(str(workdir / "runs" / "resolved.yaml"), [])
    assert again == cfg, f"round trip changed the config:\n{config_to_dict(again)}\n!=\n{config_to_dict(cfg)}"


# ------------------------------------------------------------------------------ parse_cli


def test_parse_cli_ignores_local_rank_in_both_spellings(workdir: Path) -> None:
    path = workdir / "exp.yaml"
    path.write_text("train:\n  max_steps: 9\n")
    cfg = parse_cli(["--config", str(path), "--local_rank=1", "train.grad_accum=2", "--local_rank", "0"])
    assert (cfg.train.max_steps, cfg.train.grad_accum) == (9, 2), cfg.train
    cfg = parse_cli([f"--config={path}", "--local_rank=3"])
    assert cfg.train.max_steps == 9, "--config=PATH form must be read"


@pytest.mark.parametrize("argv", [["--lr", "3"], ["train.max_steps"], ["--config"]])
def test_parse_cli_rejects_other_arguments_with_usage(workdir: Path, argv: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cli(argv)
    assert "usage: deepspeed launch/train.py [--config PATH]" in str(info.value), f"usage text missing for {argv}: {info.value}"


def test_an_override_without_equals_says_overrides_are_key_value(workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"override 'train.max_steps' has no '=': overrides are key=value"):
        parse_cli(["train.max_steps", "20"])


# ---------------------------------------------------------------------------------- errors


def test_unknown_section_names_full_key_and_suggests_section(workdir: Path) -> None:
    msg = error_of(["trian.max_steps=3"])
    assert "trian.max_steps" in msg and "did you mean 'train'?" in msg, msg


def test_unknown_field_suggests_closest_full_key(workdir: Path) -> None:
    msg = error_of(["train.max_step=3"])
    assert "train.max_step" in msg and "did you mean 'train.max_steps'?" in msg, msg


def test_unknown_key_in_yaml_names_key_and_file(workdir: Path) -> None:
    path = workdir / "exp.yaml"
    path.write_text("lora:\n  dropuot: 0.1\n  rank: 8\n")
    msg = error_of([], str(path))
    assert "lora.dropuot" in msg and "did you mean 'lora.dropout'?" in msg and str(path) in msg, msg


def test_unknown_key_without_close_match_lists_valid_keys(workdir: Path) -> None:
    msg = error_of(["lora.rank=8"])
    assert "lora.rank" in msg and "valid keys in lora: r, alpha" in msg, msg


def test_wrong_type_names_key_expected_type_and_value(workdir: Path) -> None:
    msg = error_of(["train.max_steps=abc"])
    assert "train.max_steps: expected int, got 'abc'" in msg, msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=true", "train.max_steps: expected int, got True"),
        ("train.max_steps=2.5", "train.max_steps: expected int, got 2.5"),
        ("lora.attn_targets=q_proj", "lora.attn_targets: expected list[str], got 'q_proj'"),
        ("data.domains=[{name: a, shards: 3}]", "data.domains[0].shards: expected str or list[str], got 3"),
        ("data.domains=[{name: a}]", "data.domains[0].shards: required key missing"),
    ],
)
def test_wrong_types_are_rejected_by_key(workdir: Path, override: str, expected: str) -> None:
    msg = error_of([override])
    assert expected in msg, f"{override}: {msg}"


def test_wrong_type_in_yaml_names_file(workdir: Path) -> None:
    path = workdir / "exp.yaml"
    path.write_text("train:\n  lr: fast\n")
    msg = error_of([], str(path))
    assert "train.lr: expected float, got 'fast'" in msg and str(path) in msg, msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("mole.num_experts=0", "mole.num_experts"),
        ("mole.routing=soft", "mole.routing"),
        ("mole.aux_loss=z", "mole.aux_loss"),
        ("mole.router_input=sample", "mole.router_input"),
        ("mole.aux_weight=-1", "mole.aux_weight"),
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1", "lora.dropout"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.lr=0", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.weight_decay=.nan", "train.weight_decay"),
        ("train.resume=Auto", "train.resume"),
        ("output_dir=''", "output_dir"),
        ("train.optimizer=adam", "train.optimizer"),
        ("train.precision=fp8", "train.precision"),
        ("data.image_aspect=stretch", "data.image_aspect"),
        ("data.domains=[]", "data.domains"),
        ("data.domains=[{name: a, shards: x.tar}, {name: a, shards: y.tar}]", "data.domains[1].name"),
        ("data.domains=[{name: a, shards: x.tar, weight: 0}]", "data.domains[0].weight"),
        ("data.domains=[{name: a, shards: x.tar, val_shards: []}]", "data.domains[0].val_shards"),
        ("data.max_length=8", "data.max_length"),
        ("data.domains=[{name: a, shards: x.tar, metric: [anls, anls]}]", "data.domains[0].metric"),
        ("data.domains=[{name: a, shards: x.tar, metric: []}]", "data.domains[0].metric"),
        ("data.num_workers=-1", "data.num_workers"),
    ],
)
def test_bad_value_names_key_and_override(workdir: Path, override: str, key: str) -> None:
    msg = error_of([override])
    assert msg.startswith(f"{key}: "), f"{override}: message should start with the key: {msg}"
    assert f"from override '{override}'" in msg, f"{override}: message should say where it came from: {msg}"


def test_missing_model_dir_names_key_and_path(workdir: Path) -> None:
    msg = error_of(["model.name_or_path=/nonexistent"])
    assert "model.name_or_path" in msg and "/nonexistent" in msg, msg


def test_model_dir_without_config_json_is_rejected(workdir: Path) -> None:
    (workdir / "empty_model").mkdir()
    msg = error_of(["model.name_or_path=empty_model"])
    assert "model.name_or_path" in msg and "config.json" in msg, msg


def test_default_model_path_error_says_it_is_the_default(workdir: Path) -> None:
    shutil.rmtree(workdir / "models")
    msg = error_of([])
    assert "model.name_or_path" in msg and "default value" in msg, msg


def test_ds_config_without_zero_stage_is_rejected(workdir: Path) -> None:
    path = write_ds(workdir, {"train_batch_size": "auto"})
    msg = error_of([f"train.ds_config={path}"])
    assert "train.ds_config" in msg and "zero_optimization.stage" in msg, msg
    msg = error_of(["train.ds_config=missing.json"])
    assert "train.ds_config" in msg and "missing.json" in msg, msg


def test_validate_rejects_bad_config_in_well_under_a_second(workdir: Path) -> None:
    cfg = load_config(None, [])
    cfg.train.grad_accum = 0
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="train.grad_accum"):
        validate(cfg)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"validate took {elapsed:.3f}s"


def test_validate_rejects_wrong_types_set_in_code(workdir: Path) -> None:
    cfg = load_config(None, [])
    cfg.train.max_steps = "10"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        validate(cfg)


# ----------------------------------------------------------------------- DeepSpeed filling


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_ds_auto_values_filled_from_config(workdir: Path, name: str, stage: int) -> None:
    cfg = load_config(
        None,
        [f"train.ds_config=ds_configs/{name}", "train.micro_batch_size=2", "train.grad_accum=3",
         "train.grad_clip=0.5", "train.precision=bf16"],
    )
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3, ds
    assert ds["train_batch_size"] == 2 * 3 * 4, f"train_batch_size must be micro*accum*world: {ds}"
    assert ds["gradient_clipping"] == 0.5, ds
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}, ds
    assert ds["steps_per_print"] >= 10**6 and ds["zero_allow_untested_optimizer"] is True, ds
    assert ds["zero_optimization"]["stage"] == stage, ds
    assert "auto" not in json.dumps(ds), f"an 'auto' survived: {ds}"
    assert json.loads((workdir / "ds_configs" / name).read_text())["train_batch_size"] == "auto"


def test_ds_absent_keys_are_set_from_config(workdir: Path) -> None:
    path = write_ds(workdir, {"zero_optimization": {"stage": 2}})
    ds = build_ds_config(load_config(None, [f"train.ds_config={path}", "train.precision=fp16"]), world_size=1)
    assert ds["train_batch_size"] == 4 and ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False, ds


def test_ds_explicit_agreeing_value_is_kept(workdir: Path) -> None:
    path = write_ds(workdir, {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2})
    ds = build_ds_config(load_config(None, [f"train.ds_config={path}", "train.grad_accum=2"]), world_size=2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16, ds


def test_ds_contradiction_names_both_sides(workdir: Path) -> None:
    path = write_ds(workdir, {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4})
    cfg = load_config(None, [f"train.ds_config={path}", "train.grad_accum=2"])
    with pytest.raises(ConfigError) as info:
        build_ds_config(cfg, world_size=1)
    msg = str(info.value)
    assert "gradient_accumulation_steps=4" in msg and "train.grad_accum=2" in msg and path in msg, msg


def test_ds_precision_contradiction_is_rejected(workdir: Path) -> None:
    path = write_ds(workdir, {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"bf16.enabled=true but train.precision='fp32'"):
        build_ds_config(load_config(None, [f"train.ds_config={path}", "train.precision=fp32"]), world_size=1)


def test_auto_precision_is_fp32_without_a_gpu(workdir: Path) -> None:
    import torch

    ds = build_ds_config(load_config(None, []), world_size=1)
    want_bf16 = torch.cuda.is_available()
    assert ds["bf16"]["enabled"] is want_bf16 and ds["fp16"]["enabled"] is False, (ds["bf16"], ds["fp16"])


def test_ds_leftover_auto_names_json_path(workdir: Path) -> None:
    path = write_ds(workdir, {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    with pytest.raises(ConfigError) as info:
        build_ds_config(load_config(None, [f"train.ds_config={path}"]), world_size=1)
    assert "zero_optimization.reduce_bucket_size" in str(info.value), str(info.value)


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_ds_optimizer_or_scheduler_section_is_rejected(workdir: Path, section: str) -> None:
    path = write_ds(workdir, {"zero_optimization": {"stage": 2}, section: {"type": "AdamW"}})
    with pytest.raises(ConfigError, match=section):
        build_ds_config(load_config(None, [f"train.ds_config={path}"]), world_size=1)


def test_ds_build_returns_fresh_dicts(workdir: Path) -> None:
    cfg = load_config(None, [])
    first = build_ds_config(cfg, world_size=2)
    first["zero_optimization"]["stage"] = 0
    assert build_ds_config(cfg, world_size=2)["zero_optimization"]["stage"] == 3, "results must not share state"


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_filled_bundled_ds_configs_are_accepted_by_deepspeed(workdir: Path, name: str, stage: int) -> None:
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    cfg = load_config(None, [f"train.ds_config=ds_configs/{name}", "train.grad_accum=2", "train.precision=bf16"])
    parsed = ds_config.DeepSpeedConfig(build_ds_config(cfg, world_size=1))  # no process group: world size 1
    assert parsed.zero_optimization_stage == stage, parsed.zero_optimization_stage
    assert parsed.train_batch_size == 8 and parsed.gradient_accumulation_steps == 2, parsed.train_batch_size
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled, "precision not carried over"


def test_bundled_zero3_configs_name_the_mole_mlp_as_a_leaf_module() -> None:
    """DeepSpeed skips a leaf class it cannot find with only a logged warning, so a renamed MoleMLP
    would quietly bring back ZeRO-3's per-submodule hooks: every class the bundled JSONs name must
    resolve."""
    import importlib

    from mole.experts import MoleMLP

    for path in sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json")):
        zero = json.loads(path.read_text())["zero_optimization"]
        if zero["stage"] != 3:
            continue
        classes = zero["leaf_module"]["classes"]
        assert classes, f"{path.name}: no leaf module classes"
        for qualified in classes:
            module, _, name = qualified.rpartition(".")
            assert getattr(importlib.import_module(module), name) is MoleMLP, f"{path.name}: {qualified}"


def test_a_model_dir_that_is_not_llava_is_refused_before_it_loads(workdir: Path) -> None:
    (workdir / "llama").mkdir()
    (workdir / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    msg = error_of(["model.name_or_path=llama"])
    assert msg.startswith("model.name_or_path: ") and "holds a 'llama' model; expected a LLaVA" in msg, msg
    (workdir / "torn").mkdir()
    (workdir / "torn" / "config.json").write_text('{"model_type": "lla')
    msg = error_of(["model.name_or_path=torn"])
    assert msg.startswith("model.name_or_path: ") and "config.json' cannot be read as JSON" in msg, msg
    (workdir / "untyped").mkdir()
    (workdir / "untyped" / "config.json").write_text("[]")
    assert "declares no model_type" in error_of(["model.name_or_path=untyped"])


def test_an_output_dir_that_is_a_file_and_experts_without_targets_are_refused(workdir: Path) -> None:
    (workdir / "taken").write_text("")
    assert error_of(["output_dir=taken"]).startswith("output_dir: "), "a file as output_dir"
    msg = error_of(["lora.mlp_targets=[]"])
    assert msg.startswith("lora.mlp_targets: ") and "3 experts" in msg, msg
    load_config(None, ["lora.mlp_targets=[]", "mole.num_experts=1"])  # plain LoRA on attention alone is fine


def test_domain_routing_needs_one_expert_per_domain(workdir: Path) -> None:
    msg = error_of(["mole.routing=domain", "mole.num_experts=2"])
    assert msg.startswith("mole.num_experts: routing domain gives each of the 3 data.domains its own expert, so it "
                          "must be 3, got 2"), msg
    load_config(None, ["mole.routing=domain", "mole.num_experts=3"])


def test_router_lr_needs_a_learned_router(workdir: Path) -> None:
    assert error_of(["train.router_lr=0.01", "mole.num_experts=1"]).startswith("train.router_lr: is the learning rate of")
    assert load_config(None, ["train.router_lr=0.01"]).train.router_lr == 0.01


def test_a_router_input_needs_a_learned_router(workdir: Path) -> None:
    for routerless in (["mole.num_experts=1"], ["mole.routing=domain", "mole.num_experts=3"]):
        msg = error_of(["mole.router_input=prefix_mean", *routerless])
        assert msg.startswith("mole.router_input: 'prefix_mean' is what a learned router reads"), msg
    assert load_config(None, ["mole.router_input=prefix_mean"]).mole.router_input == "prefix_mean"


def test_a_domain_names_its_metrics_and_an_unknown_one_lists_them(workdir: Path) -> None:
    cfg = load_config(None, ["data.domains=[{name: c, shards: x.tar, metric: relaxed_accuracy},"
                             " {name: p, shards: y.tar, metric: [closed_accuracy, open_recall]}, {name: s, shards: z.tar}]"])
    assert [d.metrics for d in cfg.data.domains] == [("relaxed_accuracy",), ("closed_accuracy", "open_recall"),
                                                      ("normalized_match",)]
    msg = error_of(["data.domains=[{name: c, shards: x.tar, metric: [anls, relaxd_accuracy]}]"])
    assert msg.startswith("data.domains[0].metric: must be one of exact_match, normalized_match, relaxed_accuracy, anls, "
                          "vqa_accuracy, closed_accuracy, open_recall; got 'relaxd_accuracy' (did you mean 'relaxed_accuracy'?)"), msg
    assert "metric: anl" in error_of(["data.domains=[{name: c, shards: x.tar, metric: anl}]"]).replace("'", ""), "names the value"
