"""Exports: peft (K=1) loads in PeftModel with our logits, merged, and mole from a DeepSpeed checkpoint."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mole.adapter import AdapterError, load_adapter
from mole.export import ExportError, export_merged, export_mole, export_peft
from mole.inference import Prompt, PromptEncoder, load_model, load_processor, question_turns
from tests.helpers import REPO, TINY_MODEL, launch_module
from tests.helpers import one_thread_for_the_module  # noqa: F401  (autouse fixture)

@pytest.fixture(scope="module")
def inputs():
    """A left-padded batch: an image question and a text-only one."""
    with tarfile.open(REPO / "data_shards" / "charts" / "test-000000.tar") as tar:
        jpg = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg"))
    prompts = [
        Prompt(question_turns("What color is the main object?", True), Image.open(io.BytesIO(jpg)).convert("RGB")),
        Prompt(question_turns("How many objects are there?", False)),
    ]
    return PromptEncoder(load_processor(str(TINY_MODEL)))(prompts)


@pytest.fixture(scope="module")
def mole_logits(mode_runs, inputs):
    model = load_model(str(TINY_MODEL), str(mode_runs["lora"] / "adapter"))
    with torch.no_grad():
        return model(**inputs).logits


def logits_of(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_peft_export_loads_in_peftmodel_with_our_logits(mode_runs, tmp_path, inputs, mole_logits):
    export_peft(str(mode_runs["lora"] / "adapter"), str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["multi_modal_projector"], config
    peft_model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(TINY_MODEL), str(tmp_path / "peft"))
    real = inputs["attention_mask"].bool()
    diff = (logits_of(peft_model, inputs) - mole_logits)[real].abs().max().item()
    assert diff < 1e-4, f"peft logits differ from mole.load_model by {diff}"
    base_diff = (logits_of(LlavaForConditionalGeneration.from_pretrained(TINY_MODEL), inputs) - mole_logits)[real].abs().max().item()
    assert base_diff > 1e-2, f"the adapter barely changes the logits ({base_diff}): is anything loaded?"
    projector = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in projector, "trained projector not exported"


def test_merged_export_is_a_plain_llava_directory_with_our_logits(mode_runs, tmp_path, inputs, mole_logits):
    export_merged(str(mode_runs["lora"] / "adapter"), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "processor_config.json").exists(), "the processor should be saved with the model"
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    real = inputs["attention_mask"].bool()
    diff = (logits_of(merged, inputs) - mole_logits)[real].abs().max().item()
    assert diff < 1e-4, f"merged logits differ from mole.load_model by {diff}"
    assert not any("lora" in name for name, _ in merged.named_parameters()), "LoRA modules left after merging"
    # the adapter was trained on padded images (data.image_aspect: pad): the saved processor pads too
    image = Image.fromarray(torch.randint(0, 256, (40, 120, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy())
    saved = torch.as_tensor(AutoProcessor.from_pretrained(tmp_path / "merged").image_processor(image, return_tensors="pt")["pixel_values"][0])
    trained = PromptEncoder(load_processor(str(TINY_MODEL)), "pad", "processor").pixels(image)
    levels = ((saved - trained).abs() * torch.tensor(load_processor(str(TINY_MODEL)).image_processor.image_std).view(3, 1, 1) * 255).max()
    assert levels <= 2, f"the merged export's processor prepares images {levels:.1f} uint8 levels from training's pad"


def test_peft_export_of_experts_explains_in_one_line_and_points_to_mole_format(mode_runs, tmp_path, capsys):
    export_cli = launch_module("export")
    code = export_cli.main(["--adapter", str(mode_runs["scaled"] / "adapter"), "--format", "peft", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit {code}"
    assert len(lines) == 1 and "--format mole" in lines[0] and "K=3" in lines[0], lines
    assert not (tmp_path / "out").exists(), "nothing should be written"


def test_mole_export_from_deepspeed_checkpoint_equals_the_saved_adapter(mode_runs, tmp_path):
    """The trainer saves its last checkpoint and the adapter at the same step: consolidating one must give the other."""
    run = mode_runs["scaled"]
    checkpoint = next((run / "checkpoints").glob("step_*"))
    export_mole(str(checkpoint), str(tmp_path / "from_checkpoint"))
    consolidated, config = load_adapter(str(tmp_path / "from_checkpoint"))
    saved, saved_config = load_adapter(str(run / "adapter"))
    assert sorted(consolidated) == sorted(saved), "consolidated tensors are not the adapter's"
    for name, tensor in saved.items():
        assert torch.equal(consolidated[name], tensor.float()), f"{name} differs after consolidation"
    assert config == saved_config, "the config rebuilt from config.yaml differs from the saved mole_config.json"
    model = load_model(str(TINY_MODEL), str(tmp_path / "from_checkpoint"))
    assert model is not None
    copy = tmp_path / "run_copy"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    (copy / "config.yaml").write_text("lora: {r: 4}\n")  # a hand-edited record: the checkpoint's own spec wins
    export_mole(str(copy), str(tmp_path / "from_copy"))
    assert load_adapter(str(tmp_path / "from_copy"))[1] == saved_config


def test_mole_export_refuses_weights_the_config_does_not_describe(mode_runs, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(mode_runs["scaled"] / "adapter", adapter)
    config = json.loads((adapter / "mole_config.json").read_text())
    config["num_experts"] = 2
    (adapter / "mole_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="expected K=2"):
        export_mole(str(adapter), str(tmp_path / "out"))


@pytest.mark.parametrize("damage", ["missing", "zeroed", "truncated"])
def test_mole_export_of_a_damaged_checkpoint_is_an_export_error(mode_runs, tmp_path, damage):
    import shutil

    checkpoint = tmp_path / "step"
    shutil.copytree(next((mode_runs["scaled"] / "checkpoints").glob("step_*")), checkpoint)
    shutil.copy(mode_runs["scaled"] / "config.yaml", tmp_path / "config.yaml")
    victim = next(checkpoint.glob("*rank_1*optim_states.pt"))
    if damage == "missing":
        victim.unlink()
    else:  # a crash can leave a file of its full size in zeros, or cut short
        victim.write_bytes(bytes(victim.stat().st_size) if damage == "zeroed" else victim.read_bytes()[:200])
    with pytest.raises(ExportError, match=r"checkpoint .*step cannot be consolidated"):
        export_mole(str(checkpoint), str(tmp_path / "out"))


def test_peft_export_refuses_image_settings_its_base_directory_does_not_hold(tmp_path):
    """A peft adapter is served with its base directory's processor and config: an adapter trained with
    other tile limits is refused in one line pointing to the exports that carry them; one trained with
    the directory's own limits (what an unset key records) exports."""
    from mole.adapter import read_adapter_spec
    from mole.export import refuse_image_settings_peft_drops
    from tests.helpers import make_adapter

    adapter = tmp_path / "adapter"
    make_adapter(adapter, "llava_next", num_experts=1, routing="hard")
    config = json.loads((adapter / "mole_config.json").read_text())
    directory = json.loads((REPO / "models" / "tiny-llava-next" / "config.json").read_text())["image_grid_pinpoints"]
    (adapter / "mole_config.json").write_text(json.dumps({**config, "image_grid_pinpoints": directory}))
    refuse_image_settings_peft_drops(read_adapter_spec(str(adapter)), str(adapter))  # (its image_newline has no peft form)
    (adapter / "mole_config.json").write_text(json.dumps({**config, "image_grid_pinpoints": [[56, 56], [28, 56]]}))
    with pytest.raises(ExportError, match=r"^--format peft cannot carry the image settings .* image_grid_pinpoints "
                                          r"\(\(56, 56\), \(28, 56\)\), but its base .* use --format merged or hf"):
        export_peft(str(adapter), str(tmp_path / "other"))
