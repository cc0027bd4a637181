"""``--format hf``: a MoLE model directory plain transformers loads with mole not importable, computing
mole.load_model's logits and generating its tokens, in every routing mode and for plain LoRA."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from mole.adapter import save_adapter
from mole.hf_export import MODELING_FILE, exported_name, modeling_source
from mole.inference import Prompt, PromptEncoder, load_model, load_processor, question_turns, routing_context
from mole.spec import AdapterSpec
from mole.surgery import apply_mole
from tests.helpers import REPO, TINY_MODEL, cli_env, launch_module, python
from tests.helpers import one_thread_for_the_module  # noqa: F401  (autouse fixture)

ADAPTERS = {"scaled": (3, "scaled", "fp32"), "hard": (3, "hard", "fp32"), "dense": (3, "dense", "fp32"),
            "lora": (1, "scaled", "fp32"), "scaled_bf16": (3, "scaled", "bf16")}
"""Exported adapters: name -> (K, routing, --dtype)."""
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
"""Largest logit difference from mole.load_model's. bf16 is exact on a CPU; 1e-2 is about one bf16 step at
these logits (rounding the experts' delta before adding it to the frozen output was off by 0.025)."""
GENERATE = {"max_new_tokens": 6, "do_sample": False, "use_cache": True}
QUESTION = "What color is the main object?"

LOADER = r"""
import json, sys
sys.modules["mole"] = None  # the editable install makes mole importable everywhere: not in this process
import torch
from safetensors.torch import load_file, save_file
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

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
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
    batch = {key: value.to(model.dtype) if value.is_floating_point() else value for key, value in inputs.items()}
    with torch.no_grad():
        tensors[f"{name}:logits"] = model(**batch).logits.float()
        tensors[f"{name}:tokens"] = model.generate(**batch, **generate)
    report[name] = {"class": type(model).__name__, "model_type": model.config.model_type,
                    "processor": type(processor).__name__}
# a user's prompt: the processor's chat template, then the processor on the image and the text
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
prompt = processor(images=image.convert("RGB"), text=processor.apply_chat_template(conversation, add_generation_prompt=True),
                   return_tensors="pt")
tensors["user:input_ids"], tensors["user:pixel_values"] = prompt["input_ids"], prompt["pixel_values"]
try:
    import mole
    report["mole"] = "imported"
except ImportError as err:
    report["mole"] = str(err)
report["mole_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "mole" and sys.modules[m] is not None)
save_file(tensors, out + ".safetensors")
with open(out + ".json", "w") as handle:
    json.dump(report, handle)
""".replace("GENERATE", repr(GENERATE)).replace("QUESTION", repr(QUESTION))


def make_adapter(directory, num_experts: int, routing: str) -> None:
    """A tiny-LLaVA adapter saved by mole's own save path, every tensor random and far from zero."""
    model = LlavaForConditionalGeneration.from_pretrained(TINY_MODEL)
    spec = AdapterSpec.from_base(model.config, base_model=str(TINY_MODEL), num_experts=num_experts, routing=routing,
                                 aux_loss="switch", r=4, alpha=8.0, dropout=0.0,
                                 attn_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                 mlp_targets=("gate_proj", "up_proj", "down_proj"), train_projector=True)
    apply_mole(model, spec)
    generator = torch.Generator().manual_seed(num_experts * 7 + len(routing))
    state = {name: torch.randn(param.shape, generator=generator) * 0.3
             for name, param in model.named_parameters() if param.requires_grad}
    save_adapter(str(directory), state, spec)


@pytest.fixture(scope="module")
def jpg() -> bytes:
    with tarfile.open(REPO / "data_shards" / "charts" / "test-000000.tar") as tar:
        return next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg"))


@pytest.fixture(scope="module")
def inputs(jpg):
    """A left-padded batch: an image question and a shorter text-only one."""
    prompts = [
        Prompt(question_turns(QUESTION, True), Image.open(io.BytesIO(jpg)).convert("RGB")),
        Prompt(question_turns("How many?", False)),
    ]
    batch = PromptEncoder(load_processor(str(TINY_MODEL)))(prompts)
    assert not batch["attention_mask"].all(), "the batch should hold padding"
    return batch


@pytest.fixture(scope="module")
def exported(tmp_path_factory, inputs, jpg):
    """Every adapter of :data:`ADAPTERS` exported by launch/export.py, then loaded in one process where
    mole cannot be imported: its report (JSON) and its logits and tokens per export directory."""
    root = tmp_path_factory.mktemp("export_hf")
    directories = {}
    for name, (num_experts, routing, dtype) in ADAPTERS.items():
        make_adapter(root / f"{name}_adapter", num_experts, routing)
        directories[name] = str(root / f"{name}_hf")
        argv = ["--adapter", str(root / f"{name}_adapter"), "--format", "hf", "--out", directories[name], "--dtype", dtype]
        if name == "scaled":  # one through the script as a user runs it, the rest through its main()
            done = subprocess.run([python(), str(REPO / "launch" / "export.py"), *argv], env=cli_env(),
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0 and f"wrote {directories[name]}" in done.stdout, done.stderr[-2000:]
        else:
            assert launch_module("export").main(argv) == 0, f"export of {name} failed"
    save_file({k: v for k, v in inputs.items() if v is not None}, str(root / "inputs.safetensors"))
    (root / "question.jpg").write_bytes(jpg)
    env = {**cli_env(), "HF_HOME": str(root / "hf_home"), "HF_MODULES_CACHE": str(root / "hf_modules"),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python(), "-c", LOADER, str(root / "inputs.safetensors"), str(root / "loaded"),
                           str(root / "question.jpg"), *directories.values()], env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "loaded.json").read_text())
    tensors = load_file(str(root / "loaded.safetensors"))
    return {name: (report[d], tensors[f"{d}:logits"], tensors[f"{d}:tokens"], root / f"{name}_adapter")
            for name, d in directories.items()} | {"report": report, "user": tensors}


@pytest.mark.slow  # the exports and the loading process: about a minute on 2 cores, once for the module
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_exported_model_computes_mole_load_models_logits_and_tokens(exported, inputs, name):
    report, logits, tokens, adapter = exported[name]
    assert report == {"class": "MoleForConditionalGeneration", "model_type": "mole_llava",
                      "processor": "LlavaProcessor"}, report
    dtype = ADAPTERS[name][2]
    model = load_model(str(TINY_MODEL), str(adapter), dtype=dtype)
    batch = {key: value.to(model.dtype) if value is not None and value.is_floating_point() else value
             for key, value in inputs.items()}
    with torch.no_grad():
        expected = model(**batch).logits.float()
        load = sum(stats.count.sum(dim=0) for stats in routing_context(model).stats())  # (K,) tokens per expert
        expected_tokens = model.generate(**batch, **GENERATE)
    assert ADAPTERS[name][0] == 1 or (load > 0).sum() >= 2, \
        f"{name}: every token went to one expert ({load}), so routing goes untested"
    diff = (logits - expected).abs().max().item()
    assert diff <= TOLERANCE[dtype], \
        f"{name}: the exported model's logits differ from mole.load_model's by {diff} (padding included)"
    base = LlavaForConditionalGeneration.from_pretrained(TINY_MODEL, dtype=model.dtype).eval()
    with torch.no_grad():
        base_diff = (base(**batch).logits.float() - expected).abs().max().item()
    assert base_diff > 1e-1, f"{name}: the adapter barely changes the logits ({base_diff}), so the comparison proves little"
    assert torch.equal(tokens, expected_tokens), f"{name}: batched KV-cache generation differs:\n{tokens}\n{expected_tokens}"


@pytest.mark.slow
def test_exported_model_loads_without_mole_and_not_without_trust_remote_code(exported):
    report = exported["report"]
    assert report["mole"] == "import of mole halted; None in sys.modules", f"mole was importable: {report['mole']}"
    assert report["mole_modules"] == [], f"mole modules loaded: {report['mole_modules']}"
    assert "contains custom code" in report["without_trust"] and "trust_remote_code=True" in report["without_trust"], \
        f"loading without trust_remote_code should fail with transformers' message, got: {report['without_trust'][:300]}"


@pytest.mark.slow
def test_exported_processor_builds_the_prompt_mole_builds(exported, jpg):
    """A user's prompt (the saved processor's chat template and image processor) is the one mole's inference
    builds: the same token ids, and the pixels of training's padding within 2 uint8 levels."""
    user = exported["user"]
    processor = load_processor(str(TINY_MODEL))
    ours = PromptEncoder(processor)([Prompt(question_turns(QUESTION, True), Image.open(io.BytesIO(jpg)).convert("RGB"))])
    assert user["user:input_ids"].tolist() == ours["input_ids"].tolist(), "the exported processor builds other tokens"
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    levels = ((user["user:pixel_values"] - ours["pixel_values"]).abs() * std * 255).max().item()
    assert levels <= 2, f"the exported processor prepares the image {levels:.1f} uint8 levels from mole's"


def test_modeling_file_is_written_verbatim_for_llava_and_names_the_peft_weights_as_its_own():
    assert modeling_source("llava") == MODELING_FILE.read_text(), "the LLaVA export should ship the file as it is"
    assert exported_name("model.language_model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.weight"
    assert exported_name("model.language_model.layers.0.self_attn.q_proj.lora_B.default.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.lora_B"
    assert exported_name("model.language_model.layers.1.mlp.experts.up_proj.lora_A") == \
        "model.language_model.layers.1.mlp.experts.up_proj.lora_A"


def test_modeling_file_computes_the_adapter_format_mole_writes():
    """The modelling file is versioned with the adapter format: a new format must revisit it."""
    from mole.hf_export.modeling_mole import ADAPTER_FORMAT_VERSION
    from mole.spec import FORMAT_VERSION

    assert ADAPTER_FORMAT_VERSION == FORMAT_VERSION, "modeling_mole.py was not updated with the adapter format"


def test_an_adapter_the_modelling_file_cannot_compute_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A family without a FAMILIES entry (the next backbone, until it gets one) stops before anything loads."""
    import mole.hf_export

    make_adapter(tmp_path / "adapter", 3, "scaled")
    monkeypatch.setattr(mole.hf_export, "FAMILIES", {})
    capsys.readouterr()  # the base's loading bar
    code = launch_module("export").main(["--adapter", str(tmp_path / "adapter"), "--format", "hf", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "'llava' family" in lines[0] and "--format mole" in lines[0], (code, lines)
    assert not (tmp_path / "out").exists(), "nothing should be written"
