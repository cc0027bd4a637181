"""Loading a trained adapter onto its base, strict mismatch errors, prompts, batched KV-cache generation."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from mole.adapter import AdapterError
from mole.data.conversation import parse_conversation
from mole.data.stream import SampleProcessor
from mole.experts import MoleMLP
from mole.inference import Prompt, PromptEncoder, generate_answers, load_model, load_processor, question_turns, routing_context
from tests.helpers import REPO, TINY_CONFIG, TINY_MODEL, cli_env, launch_module, python, run_group
from tests.helpers import one_thread_for_the_module  # noqa: F401  (autouse fixture)

@pytest.fixture(scope="module")
def processor():
    return load_processor(str(TINY_MODEL))


@pytest.fixture(scope="module")
def mole_model(mode_runs):
    return load_model(str(TINY_MODEL), str(mode_runs["scaled"] / "adapter"))


def shard_samples(domain: str, count: int) -> list[dict]:
    """The first ``count`` samples of a bundled test shard, as member -> bytes dicts."""
    samples: dict[str, dict] = {}
    with tarfile.open(REPO / "data_shards" / domain / "test-000000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())[:count]


def prompts_of(raws: list[dict]) -> list[Prompt]:
    prompts = []
    for raw in raws:
        turns, _ = parse_conversation(raw["json"])
        image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB") if "jpg" in raw else None
        prompts.append(Prompt(turns[:1], image))
    return prompts


def test_load_model_rebuilds_experts_with_the_saved_weights_in_eval_mode(mode_runs, mole_model):
    assert isinstance(mole_model, LlavaForConditionalGeneration)
    assert not mole_model.training, "load_model must return an eval-mode model"
    layers = [m for m in mole_model.modules() if isinstance(m, MoleMLP)]
    assert [m.num_experts for m in layers] == [3, 3], "expected two MoLE layers with 3 experts"
    saved = load_file(str(mode_runs["scaled"] / "adapter" / "adapter.safetensors"))
    params = dict(mole_model.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor), f"{name} differs from the adapter file"
    assert not any(p.requires_grad for p in mole_model.parameters()), "an inference model should be frozen"


def test_plain_lora_adapter_loads_as_single_expert_layers(mode_runs):
    model = load_model(str(TINY_MODEL), str(mode_runs["lora"] / "adapter"))
    layers = [m for m in model.modules() if isinstance(m, MoleMLP)]
    assert layers and all(m.num_experts == 1 and m.router is None for m in layers), "K=1 should have no router"


def broken_copy(source, tmp_path, edit_config=None, edit_state=None):
    target = tmp_path / "adapter"
    shutil.copytree(source, target)
    if edit_config:
        config = json.loads((target / "mole_config.json").read_text())
        edit_config(config)
        (target / "mole_config.json").write_text(json.dumps(config))
    if edit_state:
        state = load_file(str(target / "adapter.safetensors"))
        edit_state(state)
        save_file(state, str(target / "adapter.safetensors"))
    return target


def _drop_router(state):
    del state["model.language_model.layers.1.mlp.router.weight"]


def _add_extra(state):
    state["model.language_model.layers.0.mlp.extra"] = torch.zeros(2)


def _smaller_rank(state):
    key = "model.language_model.layers.0.mlp.experts.up_proj.lora_A"
    state[key] = state[key][:, :8].contiguous()


@pytest.mark.parametrize(
    "edit_config, edit_state, message",
    [
        (lambda c: c.update(hidden_size=128), None, "hidden_size=128"),
        (lambda c: c.update(num_hidden_layers=4), None, "num_hidden_layers=4"),
        (lambda c: c.update(format_version=99), None, "format_version 99"),
        (None, _drop_router, "1 missing tensors ['model.language_model.layers.1.mlp.router.weight']"),
        (None, _add_extra, "1 unexpected tensors ['model.language_model.layers.0.mlp.extra']"),
        (None, _smaller_rank, "wrong shape"),
    ],
    ids=["hidden_size", "layers", "format_version", "missing", "unexpected", "shape"],
)
def test_mismatched_adapter_gives_a_clear_error(mode_runs, tmp_path, edit_config, edit_state, message):
    adapter = broken_copy(mode_runs["scaled"] / "adapter", tmp_path, edit_config, edit_state)
    with pytest.raises(AdapterError) as error:
        load_model(str(TINY_MODEL), str(adapter))
    assert message in str(error.value), f"error does not say {message!r}: {error.value}"


def test_a_torn_adapter_file_is_named_not_a_traceback(mode_runs, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(mode_runs["scaled"] / "adapter", adapter)
    weights = adapter / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match=rf"{weights}: not a readable safetensors file"):
        load_model(str(TINY_MODEL), str(adapter))
    (adapter / "mole_config.json").write_text('{"format_version": 1,')
    with pytest.raises(AdapterError, match=rf"{adapter / 'mole_config.json'}: not JSON"):
        load_model(str(TINY_MODEL), str(adapter))


def test_prompt_tokens_are_the_training_tokens_up_to_the_answer(processor):
    """The question as generation sees it is token for token what training saw before the answer."""
    training = SampleProcessor(processor, 256, "pad")
    encoder = PromptEncoder(processor)
    multi_turn = [raw for raw in shard_samples("shapes", 40) if len(parse_conversation(raw["json"])[0]) > 2]
    assert multi_turn, "the shapes test shard should hold a multi-turn sample"
    for raw in [shard_samples("charts", 1)[0], multi_turn[0]]:
        turns, _ = parse_conversation(raw["json"])
        example = training(raw)
        image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
        for end in range(1, len(turns), 2):
            ids = encoder.token_ids(Prompt(turns[:end], image))
            assert example.input_ids[: len(ids)] == ids, f"{raw['__key__']} turn {end}: prompt is not a prefix of the training ids"
            assert example.labels[len(ids)] != -100, "the first token after the prompt should be an answer token"


def test_batched_left_padded_generation_equals_one_by_one_and_no_cache(mole_model, processor):
    prompts = prompts_of(shard_samples("tissue", 2)) + [Prompt(question_turns("Is there a blue object?", False))]
    batched = generate_answers(mole_model, processor, prompts, max_new_tokens=4, batch_size=3)
    single = [generate_answers(mole_model, processor, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == single, f"batched {batched} vs one by one {single}"
    batch = PromptEncoder(processor)(prompts)
    cached = mole_model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = mole_model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached), "KV-cache generation differs from recomputing the whole sequence"


def test_routing_with_kv_cache_counts_only_real_tokens(mole_model, processor):
    """Prefill routes each prompt's own tokens (left padding excluded); each decode step one token per row."""
    prompts = prompts_of(shard_samples("charts", 1)) + [Prompt(question_turns("Is there a blue object?", False))]
    batch = PromptEncoder(processor)(prompts)
    lengths = batch["attention_mask"].sum(dim=1).float()
    assert lengths[0] != lengths[1], "the test needs prompts of different lengths"
    context, seen = routing_context(mole_model), []
    handle = mole_model.register_forward_hook(lambda *_: seen.append([s.tokens.clone() for s in context.stats()]))
    try:
        mole_model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=True)
    finally:
        handle.remove()
    assert len(seen) == 3, f"{len(seen)} forwards for 3 new tokens"
    for layer_tokens in seen[0]:
        assert torch.equal(layer_tokens, lengths), f"prefill routed {layer_tokens.tolist()} tokens, prompts have {lengths.tolist()}"
    for step in seen[1:]:
        for layer_tokens in step:
            assert torch.equal(layer_tokens, torch.ones(2)), f"a decode step routed {layer_tokens.tolist()} tokens"


def test_infer_cli_answers_one_question_and_a_jsonl_batch(mode_runs, tmp_path, capsys):
    """The single question in a real process, the JSONL batch through main() in this one."""
    raw = shard_samples("shapes", 1)[0]
    (tmp_path / "q.jpg").write_bytes(raw["jpg"])
    (tmp_path / "questions.jsonl").write_text(
        json.dumps({"image": "q.jpg", "prompt": "What color is the main object?"}) + "\n" + json.dumps({"prompt": "How many objects are there?", "id": "q2"}) + "\n"
    )
    args = ["--adapter", str(mode_runs["scaled"] / "adapter"), "--base", str(TINY_MODEL), "--max-new-tokens", "4"]
    single = run_group([python(), str(REPO / "launch" / "infer.py"), *args, "--image", str(tmp_path / "q.jpg"),
                        "--prompt", "What color is the main object?"], 120, env=cli_env())
    assert single.returncode == 0, single.stderr[-2000:]
    answer = single.stdout.strip().splitlines()[-1] if single.stdout.strip() else ""
    infer = launch_module("infer")
    assert infer.main([*args, "--jsonl", str(tmp_path / "questions.jsonl"), "--out", str(tmp_path / "answers.jsonl")]) == 0, capsys.readouterr().err
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == ["What color is the main object?", "How many objects are there?"], answers
    assert all(isinstance(a["answer"], str) for a in answers), answers
    assert answers[1]["id"] == "q2", "keys other than image and prompt are carried through"
    assert answers[0]["answer"] == answer, f"the same question answered differently: {answers[0]['answer']!r} vs {answer!r}"


def test_infer_cli_names_the_line_of_a_broken_jsonl_and_the_missing_image(tmp_path, capsys):
    infer = launch_module("infer")
    args = ["--adapter", str(tmp_path / "unused"), "--base", str(TINY_MODEL)]
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "ok?"}) + "\n{\"prompt\": \"cut\n")
    assert infer.main([*args, "--jsonl", str(tmp_path / "q.jsonl")]) == 2
    assert f"{tmp_path / 'q.jsonl'}:2: not JSON" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "ok?", "image": "nope.jpg"}) + "\n")
    assert infer.main([*args, "--jsonl", str(tmp_path / "q.jsonl")]) == 2
    assert f"{tmp_path / 'q.jsonl'}:1: image 'nope.jpg'" in capsys.readouterr().err
    lines = [{"prompt": "ok?", "id": 7, "page": 3, "image_id": "x1", "usage": "test"}, {"prompt": "ok?", "img": "a.JPG"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert infer.main([*args, "--jsonl", str(tmp_path / "q.jsonl")]) == 2
    assert f"{tmp_path / 'q.jsonl'}:2: key 'img' holds an image file; the image goes under 'image'" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "ok?"}) + "\n" + json.dumps({"prompt": "stop</s>here"}) + "\n")
    assert infer.main([*args, "--jsonl", str(tmp_path / "q.jsonl")]) == 2
    assert f"{tmp_path / 'q.jsonl'}:2: the prompt spells the special token '</s>'" in capsys.readouterr().err
    (tmp_path / "q.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "ok?", "image": "q.eps"}) + "\n")
    assert infer.main([*args, "--jsonl", str(tmp_path / "q.jsonl")]) == 2
    assert f"{tmp_path / 'q.jsonl'}:1: image 'q.eps'" in capsys.readouterr().err, "an EPS file must not reach Ghostscript"
    for option, value in (("--batch-size", "0"), ("--max-new-tokens", "0")):
        with pytest.raises(SystemExit):
            infer.main([*args, "--prompt", "hi", option, value])
        assert f"{option} must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("script, out_kind", [("infer", "dir"), ("eval", "file"), ("export", "file")])
def test_an_output_path_of_the_wrong_kind_is_refused_before_any_work(tmp_path, capsys, script, out_kind):
    """infer writes a JSONL file, eval and export a directory: the wrong kind fails at once in one line,
    not in a traceback after the model has loaded and run."""
    out = tmp_path / "out"
    out.mkdir() if out_kind == "dir" else out.write_text("")
    args = {"infer": ["--prompt", "hi", "--out", str(out)],
            "eval": ["--out", str(out)],
            "export": ["--format", "mole", "--out", str(out)]}[script]
    try:
        code = launch_module(script).main(["--adapter", str(tmp_path / "never_read"), *args])
    except SystemExit as exit_:  # argparse's error
        code = exit_.code
    assert code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_prompts_carry_the_pixels_training_saw(aspect):
    processor = load_processor(str(TINY_MODEL))
    image = Image.linear_gradient("L").resize((90, 40)).convert("RGB")  # not square, smooth: resampling shows
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    question = {"conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]}
    trained = SampleProcessor(processor, 256, aspect)({"json": json.dumps(question).encode(), "png": buffer.getvalue()})
    prompted = PromptEncoder(processor, aspect)([Prompt(question_turns("Color?", has_image=True), image)])
    assert torch.equal(prompted["pixel_values"][0], trained.pixel_values)


def test_a_base_that_is_not_llava_and_a_missing_adapter_are_named(mode_runs, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(AdapterError, match="holds a 'llama' model; expected a LLaVA"):
        load_model(str(tmp_path / "llama"), str(mode_runs["scaled"] / "adapter"))
    with pytest.raises(AdapterError, match="does not exist"):
        load_model(str(TINY_MODEL), str(tmp_path / "nowhere"))
    with pytest.raises(AdapterError, match=r"a training output_dir\? its adapter is"):
        load_model(str(TINY_MODEL), str(mode_runs["scaled"]))


def test_the_adapter_records_how_training_prepared_images_and_inference_follows_it():
    from transformers import AutoConfig

    from mole.config import load_config
    from mole.spec import AdapterSpec, ImageSpec

    cfg = load_config(str(TINY_CONFIG), ["data.image_aspect=crop", "data.image_backend=processor"])
    spec = AdapterSpec.from_config(cfg, AutoConfig.from_pretrained(TINY_MODEL))
    recorded = spec.to_dict()
    assert (recorded["image_aspect"], recorded["image_backend"]) == ("crop", "processor")
    assert AdapterSpec.from_dict(recorded).image == ImageSpec("crop", "processor"), "inference must prepare images as training did"
    assert spec.image.overridden("pad", None) == ImageSpec("pad", "processor"), "an explicit choice wins"
    older = {k: v for k, v in recorded.items() if k not in ("image_aspect", "image_backend", "family")}
    older["format_version"] = 1
    assert AdapterSpec.from_dict(older).image == ImageSpec("pad", "fast"), "an adapter without the record gets training's defaults"


def test_an_answer_cut_inside_a_character_drops_the_half_character():
    from mole.inference import decode_answers

    tokenizer = load_processor(str(TINY_MODEL)).tokenizer
    ids = tokenizer("café", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5, f"precondition: 'é' spelled by two byte tokens: {tokenizer.convert_ids_to_tokens(ids)}"
    # generation stopped after the first byte of 'é', and after both
    assert decode_answers(tokenizer, torch.tensor([ids[:-1]])) == ["caf"]
    assert decode_answers(tokenizer, torch.tensor([ids])) == ["café"]


def test_a_loaded_model_prepares_images_as_its_adapter_recorded(mode_runs, tmp_path):
    """The Python API (``generate_answers`` on a :func:`load_model` model, no image settings passed)
    gives the vision tower the pixels of the adapter's training, here a centre crop, not a pad."""
    adapter = tmp_path / "adapter"
    shutil.copytree(mode_runs["scaled"] / "adapter", adapter)
    config = json.loads((adapter / "mole_config.json").read_text())
    (adapter / "mole_config.json").write_text(json.dumps({**config, "image_aspect": "crop"}))
    model, processor = load_model(str(TINY_MODEL), str(adapter)), load_processor(str(TINY_MODEL))
    image = Image.fromarray(torch.randint(0, 256, (40, 120, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy())
    crop, pad = (PromptEncoder(processor, aspect).pixels(image) for aspect in ("crop", "pad"))
    assert not torch.allclose(crop, pad), "precondition: cropping and padding this image give other pixels"
    seen = []
    hook = model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["pixel_values"]), with_kwargs=True)
    try:
        generate_answers(model, processor, [Prompt(question_turns("What is it?", True), image)], max_new_tokens=1)
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.allclose(seen[0][0], crop), "the image was not prepared as the adapter records"
