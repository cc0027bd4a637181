"""The adapter spec: reading today's and version-1 files, round trips, what a change changes, validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoConfig

from mole.adapter import AdapterError, read_spec_file
from mole.config import load_config
from mole.spec import FORMAT_VERSION, AdapterSpec, ImageSpec, SpecError
from tests.helpers import REPO, TINY_CONFIG, TINY_MODEL

V1_FIXTURE = REPO / "tests" / "data" / "mole_config_v1.json"


@pytest.fixture(scope="module")
def spec() -> AdapterSpec:
    """What training builds for tiny.yaml with hard routing and cropped images (the v1 fixture's run)."""
    cfg = load_config(str(TINY_CONFIG), ["mole.routing=hard", "data.image_aspect=crop"])
    built = AdapterSpec.from_config(cfg, AutoConfig.from_pretrained(TINY_MODEL))
    return dataclasses.replace(built, base_model="models/tiny-llava")  # the path the fixture records


def test_a_version_1_file_reads_as_the_spec_training_builds(spec):
    read = read_spec_file(str(V1_FIXTURE))
    assert read == spec, f"v1 fixture read as {read}, training builds {spec}"
    assert read.family == "llava", "version 1 adapters are all LLaVA adapters"


def test_version_3_differs_from_version_1_only_by_the_version_and_new_fields(spec):
    old = json.loads(V1_FIXTURE.read_text())
    new = spec.to_dict()
    assert new["format_version"] == FORMAT_VERSION == 3
    assert set(old) <= set(new), f"keys dropped from version 1: {set(old) - set(new)}"
    changed = {key for key in old if key != "format_version" and old[key] != new[key]}
    assert not changed, f"version 1 keys written with other values: {changed}"
    assert list(new)[: 2] == ["format_version", "base_model"], "the file still opens with its version and base"


def test_to_json_and_from_json_round_trip(spec):
    assert AdapterSpec.from_json(spec.to_json()) == spec
    plain = dataclasses.replace(spec, num_experts=1, attn_targets=(), mlp_targets=("up_proj",), base_model=None,
                                image=ImageSpec("pad", "processor"), train_projector=False)
    assert AdapterSpec.from_json(plain.to_json()) == plain


IMAGE_RECORDS = {
    "qwen2_5_vl": ImageSpec("crop", "processor", "pil", min_pixels=3136, max_pixels=1003520),
    "llava_next": ImageSpec("crop", "processor", "torchvision", image_grid_pinpoints=((336, 672), (672, 336))),
    "llava_onevision": ImageSpec("pad", "processor", "pil", image_grid_pinpoints=[[384, 768]],
                                 vision_aspect_ratio="anyres_max_4"),
}


@pytest.mark.parametrize("family", sorted(IMAGE_RECORDS))
def test_the_image_processor_backend_and_limits_round_trip(spec, family):
    recorded = dataclasses.replace(spec, family=family, image=IMAGE_RECORDS[family])
    raw = json.loads(recorded.to_json())
    assert raw["format_version"] == 3
    assert {key: raw[key] for key in ("image_processor_backend", "min_pixels", "max_pixels", "image_grid_pinpoints",
                                      "vision_aspect_ratio")} == {
        "image_processor_backend": recorded.image.processor_backend, "min_pixels": recorded.image.min_pixels,
        "max_pixels": recorded.image.max_pixels, "vision_aspect_ratio": recorded.image.vision_aspect_ratio,
        "image_grid_pinpoints": None if recorded.image.image_grid_pinpoints is None
        else [list(point) for point in recorded.image.image_grid_pinpoints]}, raw
    assert AdapterSpec.from_json(recorded.to_json()) == recorded


def test_a_version_2_file_reads_with_its_image_limits_unrecorded(spec):
    """Version 2 adapters took the model directory's limits and transformers' backend: null, as before."""
    raw = {key: value for key, value in dataclasses.replace(spec, family="qwen3_vl").to_dict().items()
           if key not in ("image_processor_backend", "min_pixels", "max_pixels", "image_grid_pinpoints",
                          "vision_aspect_ratio")}
    read = AdapterSpec.from_dict({**raw, "format_version": 2})
    assert read.image == ImageSpec(spec.image.aspect, spec.image.backend), read.image
    with pytest.raises(SpecError, match=r"missing keys \['image_processor_backend'"):
        AdapterSpec.from_dict(raw)


@pytest.mark.parametrize("values, message", [
    ({"min_pixels": 0}, "min_pixels: must be an integer >= 1 or null, got 0"),
    ({"max_pixels": "1e6"}, "max_pixels: must be an integer >= 1 or null, got '1e6'"),
    ({"max_pixels": True}, "max_pixels: must be an integer >= 1 or null, got True"),
    ({"min_pixels": 10, "max_pixels": 5}, "min_pixels: 10 exceeds max_pixels 5"),
    ({"image_grid_pinpoints": []}, "image_grid_pinpoints: must be a non-empty list of [height, width] integer pairs"),
    ({"image_grid_pinpoints": [[336]]}, "image_grid_pinpoints: must be a non-empty list of [height, width]"),
    ({"image_grid_pinpoints": [[336, "672"]]}, "image_grid_pinpoints: must be a non-empty list of [height, width]"),
    ({"vision_aspect_ratio": "anyres_9"}, "vision_aspect_ratio: must be anyres_max_N (N >= 1 tiles) or null, got 'anyres_9'"),
    ({"vision_aspect_ratio": "anyres_max_0"}, "vision_aspect_ratio: must be anyres_max_N"),
    ({"processor_backend": "cv2"}, "image_processor_backend: must be one of pil, torchvision; got 'cv2'"),
])
def test_a_bad_image_limit_is_one_line_naming_it(values, message):
    with pytest.raises(SpecError) as error:
        ImageSpec("crop", "processor", **values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("family, values, message", [
    ("llava", {"min_pixels": 3136}, "min_pixels: applies to the qwen2_5_vl, qwen3_vl families, not 'llava'"),
    ("llava_next", {"max_pixels": 3136}, "max_pixels: applies to the qwen2_5_vl, qwen3_vl families, not 'llava_next'"),
    ("qwen3_vl", {"image_grid_pinpoints": [[32, 64]]},
     "image_grid_pinpoints: applies to the llava_next, llava_onevision families, not 'qwen3_vl'"),
    ("llava_next", {"vision_aspect_ratio": "anyres_max_9"},
     "vision_aspect_ratio: applies to the llava_onevision families, not 'llava_next'"),
])
def test_an_image_limit_of_another_family_is_refused(spec, family, values, message):
    with pytest.raises(SpecError, match=message):
        dataclasses.replace(spec, family=family, image=ImageSpec("crop", "processor", **values))


def test_an_unknown_version_and_missing_keys_are_named(spec):
    raw = spec.to_dict()
    with pytest.raises(SpecError, match="format_version 99 is not a version this mole reads"):
        AdapterSpec.from_dict({**raw, "format_version": 99})
    with pytest.raises(SpecError, match=r"missing keys \['family'\]"):
        AdapterSpec.from_dict({k: v for k, v in raw.items() if k != "family"})
    with pytest.raises(SpecError, match=r"unknown keys \['num_expert'\]"):
        AdapterSpec.from_dict({**raw, "num_expert": 3})


@pytest.mark.parametrize("field, value, impact", [
    ("num_experts", 2, "shape"),
    ("r", 8, "shape"),
    ("attn_targets", ("q_proj", "v_proj"), "shape"),
    ("mlp_targets", ("up_proj",), "shape"),
    ("train_projector", False, "shape"),
    ("hidden_size", 128, "shape"),
    ("num_hidden_layers", 32, "shape"),
    ("routing", "dense", "computation"),
    ("router_input", "prefix_mean", "computation"),
    ("alpha", 16.0, "computation"),
    ("image", ImageSpec("pad", "fast"), "computation"),
    ("base_model", "/elsewhere", "computation"),
    ("aux_loss", "per_sample", "training"),
    ("dropout", 0.0, "training"),
])
def test_diff_names_each_changed_field_with_what_it_changes(spec, field, value, impact):
    changed = dataclasses.replace(spec, **{field: value})
    changes = changed.diff(spec)
    assert [(c.field, c.impact) for c in changes] == [(field, impact)], changes
    assert (changes[0].before, changes[0].after) == (getattr(spec, field), value), "before is the other spec's value"


def test_routing_by_domain_against_a_learned_router_is_a_change_of_shape(spec):
    """Routing ``domain`` has no router: switching it with a learned routing adds or drops a router per
    layer, which no resume can take (``train.resume_accept`` must not let it through)."""
    assert spec.num_experts == 3
    oracle = dataclasses.replace(spec, routing="domain", domains=("shapes", "charts", "tissue"))
    assert {c.field: c.impact for c in oracle.diff(spec)} == {"routing": "shape", "domains": "computation"}
    assert {c.field: c.impact for c in spec.diff(oracle)} == {"routing": "shape", "domains": "computation"}
    dense = dataclasses.replace(spec, routing="dense")
    assert [(c.field, c.impact) for c in dense.diff(spec)] == [("routing", "computation")], "both learn a router"


def test_diff_ignores_the_order_of_targets(spec):
    reordered = dataclasses.replace(spec, attn_targets=spec.attn_targets[::-1], mlp_targets=spec.mlp_targets[::-1])
    assert reordered.diff(spec) == [], "target order shapes no tensor"
    assert spec.diff(spec) == []


@pytest.mark.parametrize("field, value, message", [
    ("num_experts", 0, "num_experts: must be an integer >= 1, got 0"),
    ("num_experts", True, "num_experts: must be an integer >= 1, got True"),
    ("r", 2.5, "r: must be an integer >= 1, got 2.5"),
    ("hidden_size", "64", "hidden_size: must be an integer >= 1, got '64'"),
    ("alpha", float("nan"), "alpha: must be a finite number > 0"),
    ("dropout", 1.0, "dropout: must be in [0, 1), got 1.0"),
    ("routing", "top2", "routing: must be one of hard, scaled, dense, domain; got 'top2'"),
    ("aux_loss", None, "aux_loss: must be one of switch, per_sample; got None"),
    ("family", "llama", "family: must be one of llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl; got 'llama'"),
    ("attn_targets", "q_proj", "attn_targets: must be a list of distinct module names"),
    ("mlp_targets", ("up_proj", "up_proj"), "mlp_targets: must be a list of distinct module names"),
    ("mlp_targets", (), "mlp_targets: is empty, so the 3 experts would have nothing to adapt"),
    ("train_projector", 1, "train_projector: must be true or false, got 1"),
    ("base_model", 7, "base_model: expected a path or null, got 7"),
])
def test_a_bad_value_is_one_line_naming_the_field(spec, field, value, message):
    with pytest.raises(SpecError) as error:
        dataclasses.replace(spec, **{field: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert error.value.field == field


def test_an_image_choice_outside_the_choices_is_named():
    with pytest.raises(SpecError, match="image_aspect: must be one of pad, crop; got 'stretch'"):
        ImageSpec("stretch")


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("{}", r"missing keys \['format_version'\]"),
    ('{"format_version": "1"}', "adapter format_version '1' is not a version"),
    ("[" * 100_000 + "]" * 100_000, "not JSON"),
    ("\xff", "not JSON"),
])
def test_a_malformed_mole_config_is_an_adapter_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "mole_config.json"
    path.write_text(content, encoding="latin-1")
    with pytest.raises(AdapterError, match=f"{path}: {message}"):
        read_spec_file(str(path))


@pytest.mark.parametrize("key, value, field", [
    ("r", "16", "r"), ("routing", "fast", "routing"), ("num_experts", -1, "num_experts"),
    ("image_backend", "pil", "image_backend"), ("mlp_targets", {"up_proj": 1}, "mlp_targets"),
])
def test_a_hostile_value_in_a_version_1_file_names_the_file_and_field(tmp_path, key, value, field):
    raw = json.loads(V1_FIXTURE.read_text())
    path = tmp_path / "mole_config.json"
    path.write_text(json.dumps({**raw, key: value}))
    with pytest.raises(AdapterError, match=rf"{path}: {field}: "):
        read_spec_file(str(path))


def test_as_recorded_takes_what_a_run_recorded_and_keeps_the_rest(spec):
    run_config = {"lora": {"r": 8, "alpha": None}, "mole": "torn", "data": {"image_aspect": "pad"}}
    then = spec.as_recorded(run_config, {"hidden_size": 128, "routing": "dense"})
    assert [(c.field, c.before) for c in spec.diff(then)] == [("hidden_size", 128), ("r", 8), ("image", ImageSpec("pad", "fast"))]
    assert spec.as_recorded(None, None) == spec, "nothing recorded: nothing changed"
    with pytest.raises(SpecError, match="num_experts: must be an integer"):
        spec.as_recorded({"mole": {"num_experts": "three"}}, None)


def test_surgery_refuses_a_spec_of_another_base():
    from transformers import LlavaForConditionalGeneration

    from mole.surgery import SurgeryError, apply_mole

    model = LlavaForConditionalGeneration.from_pretrained(TINY_MODEL)
    cfg = load_config(str(TINY_CONFIG), [])
    spec = AdapterSpec.from_config(cfg, model.config)
    with pytest.raises(SurgeryError, match="hidden_size 128 in the spec, 64 in the model"):
        apply_mole(model, dataclasses.replace(spec, hidden_size=128))
    apply_mole(model, spec)
    assert model.mole_spec is spec, "the model keeps the spec it was built from"


def test_the_same_weights_save_to_the_same_bytes(tmp_path, spec):
    """The weights file is a function of the tensors alone: safetensors writes metadata keys in hash
    order, so more than one key would make every save of the same adapter a different file."""
    import torch

    from mole.adapter import ADAPTER_WEIGHTS, save_adapter

    state = {"a.lora_A": torch.arange(6.0).reshape(2, 3), "b.router.weight": torch.ones(3, 2)}
    saved = set()
    for attempt in range(8):
        save_adapter(str(tmp_path / str(attempt)), state, spec)
        saved.add((tmp_path / str(attempt) / ADAPTER_WEIGHTS).read_bytes())
    assert len(saved) == 1, f"{len(saved)} different files from 8 saves of the same tensors"


def test_a_version_2_file_reads_with_no_domains(spec):
    raw = {k: v for k, v in spec.to_dict().items() if k != "domains"}
    assert AdapterSpec.from_dict({**raw, "format_version": 2}) == spec
    with pytest.raises(SpecError, match=r"missing keys \['domains'\]"):
        AdapterSpec.from_dict(raw)


def test_a_domain_routed_spec_records_its_domain_names_in_expert_order(tmp_path):
    cfg = load_config(str(TINY_CONFIG), ["mole.routing=domain"])
    built = AdapterSpec.from_config(cfg, AutoConfig.from_pretrained(TINY_MODEL))
    assert built.domains == ("shapes", "charts", "tissue"), built.domains
    assert AdapterSpec.from_json(built.to_json()) == built
    assert built.domain_index("tissue") == 2
    with pytest.raises(ValueError, match=r"^domain 'docs' is not one of the adapter's domains \(shapes, charts, tissue\)$"):
        built.domain_index("docs")
    with pytest.raises(SpecError, match=r"^domains: routing domain needs one domain name per expert \(3\)"):
        dataclasses.replace(built, domains=("shapes", "charts"))
    with pytest.raises(SpecError, match=r"^domains: names domains, but routing hard does not route by domain$"):
        dataclasses.replace(built, routing="hard")
    saved = {"mole": {"routing": "domain"}, "data": {"domains": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}}
    assert built.as_recorded(saved, None).domains == ("a", "b", "c"), "a saved run's domain names are its adapter's"


def test_router_input_is_written_only_when_not_token_and_needs_a_learned_router(spec):
    assert "router_input" not in spec.to_dict(), "a token-routed adapter's file stays what version 3 readers read"
    prefix = dataclasses.replace(spec, router_input="prefix_mean")
    assert prefix.to_dict()["router_input"] == "prefix_mean" and AdapterSpec.from_json(prefix.to_json()) == prefix
    with pytest.raises(SpecError, match="router_input: 'prefix_mean' is what a learned router reads; K=1"):
        dataclasses.replace(spec, num_experts=1, router_input="prefix_mean")
    with pytest.raises(SpecError, match="router_input: must be one of"):
        dataclasses.replace(spec, router_input="sample")
    old = {**json.loads(V1_FIXTURE.read_text()), "router_input": "prefix_mean"}
    with pytest.raises(SpecError, match=r"unknown keys \['router_input'\] for format_version 1"):
        AdapterSpec.from_dict(old)


def test_a_run_config_recorded_before_router_input_records_token(spec):
    prefix = dataclasses.replace(spec, router_input="prefix_mean")
    assert prefix.as_recorded({"mole": {"routing": "hard"}}, None).router_input == "token"
    assert prefix.as_recorded({"mole": {"router_input": "prefix_mean"}}, None).router_input == "prefix_mean"
    assert prefix.as_recorded({"lora": {"r": 16}}, None).router_input == "prefix_mean", "no mole section: unrecorded"
