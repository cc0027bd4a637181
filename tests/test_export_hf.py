"""``--format hf``: a MoLE model directory plain transformers loads with mole not importable, computing
mole.load_model's logits and generating its tokens, for every backbone family, in every routing mode and
for plain LoRA."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mole.backbones import FAMILIES, backbone_for
from mole.hf_export import MODELING_FILE, exported_name, modeling_source
from mole.inference import Prompt, PromptEncoder, load_model, load_processor, question_turns, routing_context
from tests.helpers import ASPECT, BASES, REPO, TINY_MODEL, cli_env, launch_module, make_adapter, python
from tests.helpers import one_thread_for_the_module  # noqa: F401  (autouse fixture)

ADAPTERS = {"scaled": ("llava", 3, "scaled", "fp32"), "hard": ("llava", 3, "hard", "fp32"),
            "dense": ("llava", 3, "dense", "fp32"), "lora": ("llava", 1, "scaled", "fp32"),
            "scaled_bf16": ("llava", 3, "scaled", "bf16"),
            "llava_next": ("llava_next", 3, "hard", "fp32"), "llava_onevision": ("llava_onevision", 3, "dense", "fp32"),
            "qwen2_5_vl": ("qwen2_5_vl", 3, "scaled", "fp32"), "qwen3_vl": ("qwen3_vl", 3, "scaled", "fp32")}
"""Exported adapters: name -> (family, K, routing, --dtype); every family once, LLaVA-1.5 in every mode."""
PROCESSOR_FAMILIES = ("llava", "llava_next")
"""Families whose combined processor loads without torchvision (the others save an image processor and a tokenizer)."""
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
"""Largest logit difference from mole.load_model's. bf16 is exact on a CPU; 1e-2 is about one bf16 step at
these logits (rounding the experts' delta before adding it to the frozen output was off by 0.025)."""
GENERATE = {"max_new_tokens": 6, "do_sample": False, "use_cache": True}
QUESTION = "What color is the main object?"
BATCHES = ("images", "text")
"""The compared batches: an image question left-padded beside a shorter text-only one; two text-only questions."""

LOADER = r"""
import json, sys
sys.modules["mole"] = None  # the editable install makes mole importable everywhere: not in this process
import torch
from safetensors.torch import load_file, save_file
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

inputs, out, image, directories = load_file(sys.argv[1]), sys.argv[2], Image.open(sys.argv[3]), sys.argv[4:]
generate = GENERATE
report, tensors = {}, {}
try:
    AutoModelForImageTextToText.from_pretrained(directories[0])
    report["without_trust"] = "loaded"
except ValueError as err:
    report["without_trust"] = str(err)
for name in directories:
    model = AutoModelForImageTextToText.from_pretrained(name, trust_remote_code=True).eval()
    report[name] = {"class": type(model).__name__, "model_type": model.config.model_type}
    for kind in BATCHES:
        prefix = f"{name}:{kind}:"
        batch = {key[len(prefix):]: value.to(model.dtype) if value.is_floating_point() else value
                 for key, value in inputs.items() if key.startswith(prefix)}
        with torch.no_grad():
            tensors[f"{prefix}logits"] = model(**batch).logits.float()
            tensors[f"{prefix}tokens"] = model.generate(**batch, **generate)
    if model.config.model_type in ("mole_llava", "mole_llava_next"):
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
        image_processor, tokenizer = processor.image_processor, processor.tokenizer
        report[name]["processor"] = type(processor).__name__
    else:
        image_processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    report[name] |= {"image_processor": type(image_processor).__name__, "tokenizer": type(tokenizer).__name__}
    tensors[f"{name}:pixels"] = image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if model.config.model_type == "mole_llava":  # a user's prompt: the processor's chat template, then the processor
        prompt = processor(images=image.convert("RGB"), return_tensors="pt",
                           text=processor.apply_chat_template(conversation, add_generation_prompt=True))
        tensors[f"{name}:user:input_ids"], tensors[f"{name}:user:pixel_values"] = prompt["input_ids"], prompt["pixel_values"]
    if model.config.model_type.startswith("mole_qwen"):  # README: the image token repeated once per merged patch
        pixels = image_processor(images=image.convert("RGB"), return_tensors="pt")
        count = int(pixels["image_grid_thw"].prod()) // image_processor.merge_size**2
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        tensors[f"{name}:user:input_ids"] = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * count),
                                                      return_tensors="pt")["input_ids"]
try:
    import mole
    report["mole"] = "imported"
except ImportError as err:
    report["mole"] = str(err)
report["mole_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "mole" and sys.modules[m] is not None)
save_file(tensors, out + ".safetensors")
with open(out + ".json", "w") as handle:
    json.dump(report, handle)
""".replace("GENERATE", repr(GENERATE)).replace("QUESTION", repr(QUESTION)).replace("BATCHES", repr(BATCHES))


def model_inputs(model, encoder: PromptEncoder, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
    """The stock model's inputs for ``prompts`` as mole's inference prepares them (a left-padded batch;
    the family's image inputs: ``image_sizes``, or ``image_grid_thw`` and ``mm_token_type_ids``)."""
    batch = encoder(prompts)
    images = None
    if batch["pixel_values"] is not None:
        images = {"pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            **backbone_for(model.config).generation_inputs(model, batch["input_ids"], images)}


@pytest.fixture(scope="module")
def jpg() -> bytes:
    with tarfile.open(REPO / "data_shards" / "charts" / "test-000000.tar") as tar:
        return next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg"))


@pytest.fixture(scope="module")
def expected(tmp_path_factory, jpg):
    """Per adapter of :data:`ADAPTERS`, made in a temporary directory: mole.load_model's inputs, logits and
    greedy tokens per batch of :data:`BATCHES`, its tokens per expert (K,) on the image batch, and how far
    the adapter moves the base's logits there."""
    root = tmp_path_factory.mktemp("adapters")
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    prompts = {"images": [Prompt(question_turns(QUESTION, True), image), Prompt(question_turns("How many?", False))],
               "text": [Prompt(question_turns("Which shape is it?", False)), Prompt(question_turns("How many?", False))]}
    out = {}
    for name, (family, num_experts, routing, dtype) in ADAPTERS.items():
        adapter = root / name
        make_adapter(adapter, family, num_experts, routing)
        model = load_model(str(BASES[family]), str(adapter), dtype=dtype)
        encoder = PromptEncoder(load_processor(str(BASES[family])), ASPECT.get(family, "pad"), backbone=FAMILIES[family])
        entry = {"adapter": adapter, "inputs": {}, "logits": {}, "tokens": {}}
        for kind in BATCHES:
            inputs = entry["inputs"][kind] = model_inputs(model, encoder, prompts[kind])
            assert not inputs["attention_mask"].all(), f"{name}: the {kind} batch should hold padding"
            with torch.no_grad():
                entry["logits"][kind] = model(**inputs).logits.float()
                if kind == "images":
                    entry["load"] = sum(stats.count.sum(dim=0) for stats in routing_context(model).stats())
                entry["tokens"][kind] = model.generate(**inputs, **GENERATE)
        base = FAMILIES[family].model_class.from_pretrained(BASES[family], dtype=model.dtype).eval()
        with torch.no_grad():
            entry["base_diff"] = (base(**entry["inputs"]["images"]).logits.float() - entry["logits"]["images"]).abs().max().item()
        out[name] = entry
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, expected, jpg):
    """Every adapter of :data:`ADAPTERS` exported by launch/export.py, then loaded in one process where
    mole cannot be imported: its report (JSON) and tensors (logits and tokens per export directory and
    batch; the saved image processor's pixels; a user's prompt)."""
    root = tmp_path_factory.mktemp("export_hf")
    directories, inputs = {}, {}
    for name, (family, num_experts, routing, dtype) in ADAPTERS.items():
        directories[name] = str(root / f"{name}_hf")
        argv = ["--adapter", str(expected[name]["adapter"]), "--format", "hf", "--out", directories[name], "--dtype", dtype]
        if name == "scaled":  # one through the script as a user runs it, the rest through its main()
            done = subprocess.run([python(), str(REPO / "launch" / "export.py"), *argv], env=cli_env(),
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0 and f"wrote {directories[name]}" in done.stdout, done.stderr[-2000:]
        else:
            assert launch_module("export").main(argv) == 0, f"export of {name} failed"
        for kind in BATCHES:
            inputs |= {f"{directories[name]}:{kind}:{key}": value for key, value in expected[name]["inputs"][kind].items()}
    save_file(inputs, str(root / "inputs.safetensors"))
    (root / "question.jpg").write_bytes(jpg)
    env = {**cli_env(), "HF_HOME": str(root / "hf_home"), "HF_MODULES_CACHE": str(root / "hf_modules"),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python(), "-c", LOADER, str(root / "inputs.safetensors"), str(root / "loaded"),
                           str(root / "question.jpg"), *directories.values()], env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "loaded.json").read_text())
    tensors = load_file(str(root / "loaded.safetensors"))
    return {name: (report[d], {key[len(d) + 1:]: value for key, value in tensors.items() if key.startswith(f"{d}:")})
            for name, d in directories.items()} | {"report": report}


@pytest.mark.slow  # the exports and the loading process: about a minute and a half on 2 cores, once for the module
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_exported_model_computes_mole_load_models_logits_and_tokens(exported, expected, name):
    (report, tensors), ours = exported[name], expected[name]
    family, num_experts, _, dtype = ADAPTERS[name]
    assert (report["class"], report["model_type"]) == ("MoleForConditionalGeneration", f"mole_{family}"), report
    assert num_experts == 1 or (ours["load"] > 0).sum() >= 2, \
        f"{name}: every token went to one expert ({ours['load']}), so routing goes untested"
    assert ours["base_diff"] > 1e-1, \
        f"{name}: the adapter barely changes the logits ({ours['base_diff']}), so the comparison proves little"
    for kind in BATCHES:
        diff = (tensors[f"{kind}:logits"] - ours["logits"][kind]).abs().max().item()
        assert diff <= TOLERANCE[dtype], \
            f"{name}: the exported model's logits differ from mole.load_model's by {diff} on the {kind} batch (padding included)"
        assert torch.equal(tensors[f"{kind}:tokens"], ours["tokens"][kind]), \
            f"{name}: batched KV-cache generation differs on the {kind} batch:\n{tensors[f'{kind}:tokens']}\n{ours['tokens'][kind]}"


@pytest.mark.slow
def test_exported_model_loads_without_mole_and_not_without_trust_remote_code(exported):
    report = exported["report"]
    assert report["mole"] == "import of mole halted; None in sys.modules", f"mole was importable: {report['mole']}"
    assert report["mole_modules"] == [], f"mole modules loaded: {report['mole_modules']}"
    assert "contains custom code" in report["without_trust"] and "trust_remote_code=True" in report["without_trust"], \
        f"loading without trust_remote_code should fail with transformers' message, got: {report['without_trust'][:300]}"


@pytest.mark.slow
def test_exported_processor_builds_the_prompt_mole_builds(exported, jpg):
    """A user's LLaVA-1.5 prompt (the saved processor's chat template and image processor) is the one mole's
    inference builds: the same token ids, and the pixels of training's padding within 2 uint8 levels."""
    user = exported["scaled"][1]
    processor = load_processor(str(TINY_MODEL))
    ours = PromptEncoder(processor)([Prompt(question_turns(QUESTION, True), Image.open(io.BytesIO(jpg)).convert("RGB"))])
    assert user["user:input_ids"].tolist() == ours["input_ids"].tolist(), "the exported processor builds other tokens"
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    levels = ((user["user:pixel_values"] - ours["pixel_values"]).abs() * std * 255).max().item()
    assert levels <= 2, f"the exported processor prepares the image {levels:.1f} uint8 levels from mole's"


@pytest.mark.slow
@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "llava"])
def test_exported_directory_holds_the_image_processor_and_tokenizer_mole_uses(exported, jpg, family):
    """The family's image processor and tokenizer load from the directory as the classes mole's inference
    loads, and prepare the image as the base's do; for Qwen-VL, the README's prompt (the tokenizer's chat
    template, the image token once per merged patch) is the one mole builds."""
    (report, tensors), processor = exported[family], load_processor(str(BASES[family]))
    classes = {"image_processor": type(processor.image_processor).__name__, "tokenizer": type(processor.tokenizer).__name__}
    if family in PROCESSOR_FAMILIES:
        classes["processor"] = type(processor).__name__
    assert {key: report.get(key) for key in classes} == classes, f"{family}: the directory loads {report}, mole uses {classes}"
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    ours = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(tensors["pixels"], ours), f"{family}: the saved image processor prepares the image otherwise"
    if family.startswith("qwen"):
        prompt = PromptEncoder(processor, ASPECT[family], backbone=FAMILIES[family])([Prompt(question_turns(QUESTION, True), image)])
        assert tensors["user:input_ids"].tolist() == prompt["input_ids"].tolist(), \
            f"{family}: the README's prompt is not the one mole builds"


def test_modeling_file_is_written_verbatim_for_llava_and_names_the_peft_weights_as_its_own():
    assert modeling_source("llava") == MODELING_FILE.read_text(), "the LLaVA export should ship the file as it is"
    assert exported_name("model.language_model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.weight"
    assert exported_name("model.language_model.layers.0.self_attn.q_proj.lora_B.default.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.lora_B"
    assert exported_name("model.language_model.layers.1.mlp.experts.up_proj.lora_A") == \
        "model.language_model.layers.1.mlp.experts.up_proj.lora_A"


def test_modeling_file_of_each_family_subclasses_its_stock_classes_and_differs_in_nothing_else():
    import mole.hf_export

    llava = MODELING_FILE.read_text().splitlines()
    for family, classes in mole.hf_export.FAMILIES.items():
        lines = modeling_source(family).splitlines()
        changed = [(ours, theirs) for ours, theirs in zip(llava, lines) if ours != theirs]
        assert len(lines) == len(llava) and len(changed) == (0 if family == "llava" else 2), f"{family}: {changed}"
        assert f"from transformers import {classes.config_class} as FamilyConfig" in lines, family
        assert f"from transformers import {classes.model_class} as FamilyForConditionalGeneration" in lines, family
        assert classes.model_class == FAMILIES[family].model_class_name, f"{family}: not the class mole loads"
    assert sorted(mole.hf_export.FAMILIES) == sorted(FAMILIES), "every backbone family should export"


def test_modeling_file_computes_the_adapter_format_mole_writes():
    """The modelling file is versioned with the adapter format: a new format must revisit it."""
    from mole.hf_export.modeling_mole import ADAPTER_FORMAT_VERSION
    from mole.spec import FORMAT_VERSION

    assert ADAPTER_FORMAT_VERSION == FORMAT_VERSION, "modeling_mole.py was not updated with the adapter format"


def test_an_adapter_the_modelling_file_cannot_compute_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A family without a FAMILIES entry (the next backbone, until it gets one) stops before anything loads."""
    import mole.hf_export

    make_adapter(tmp_path / "adapter", "llava", 3, "scaled")
    monkeypatch.setattr(mole.hf_export, "FAMILIES", {})
    capsys.readouterr()  # the base's loading bar
    code = launch_module("export").main(["--adapter", str(tmp_path / "adapter"), "--format", "hf", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "'llava' family" in lines[0] and "--format mole" in lines[0], (code, lines)
    assert not (tmp_path / "out").exists(), "nothing should be written"
