"""The training forward of the tiny MoLE LLaVA, in one process (no DeepSpeed engine needed)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from PIL import Image

from mole.config import load_config
from mole.data.collate import collate
from mole.data.stream import SampleProcessor
from mole.model import TrainingModel, build_mole_model
from tests.helpers import REPO, TINY_CONFIG, free_port, python, run_group, text_sample

QUESTION = {"conversations": [{"from": "human", "value": "<image>\nWhat color is the main object?"},
                              {"from": "gpt", "value": "red"}]}


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(str(TINY_CONFIG), ["lora.dropout=0.0"])
    llava, surgery, processor = build_mole_model(cfg, torch.float32)
    for name, param in llava.named_parameters():  # B starts at zero: make the experts matter
        if param.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return TrainingModel(llava, surgery, "switch", 0.01), processor


def batch_of(processor, raws: list[dict]) -> dict:
    process = SampleProcessor(processor, 256, "pad")
    examples = [process(raw) for raw in raws]
    return collate(examples, processor.tokenizer.pad_token_id)


def jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def forward_backward(model, batch):
    model.zero_grad()
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"])
    out["loss"].backward()
    return out, [p.grad.clone() for n, p in model.named_parameters() if "router" in n]


def test_gradient_checkpointing_leaves_losses_and_router_gradients_unchanged(tiny):
    model, processor = tiny
    batch = batch_of(processor, [{"json": json.dumps(QUESTION).encode(), "jpg": jpeg(c)} for c in ("red", "blue")])
    model.train()
    plain_out, plain_grads = forward_backward(model, batch)
    model.llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert model.llava.model.language_model.gradient_checkpointing, "checkpointing did not switch on"
        ckpt_out, ckpt_grads = forward_backward(model, batch)
    finally:
        model.llava.activation_checkpointing_disable()
    for key in ("lm_loss", "aux_loss"):
        torch.testing.assert_close(ckpt_out[key], plain_out[key], msg=f"{key} changed under checkpointing")
    assert plain_grads and all(g.abs().sum() > 0 for g in plain_grads), "routers got no gradient"
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg="router gradient changed under checkpointing")


def test_text_only_batch_still_runs_the_vision_tower_and_projector(tiny):
    model, processor = tiny
    calls = []
    handle = model.llava.model.multi_modal_projector.register_forward_hook(lambda *args: calls.append(1))
    sample = text_sample("t", "How many sides has a square?", "four")
    batch = batch_of(processor, [{"json": json.dumps(sample["json"]).encode()}])
    assert batch["pixel_values"] is None
    try:
        out, _ = forward_backward(model, batch)
    finally:
        handle.remove()
    assert calls == [1], "the projector must run once on a text-only batch (ZeRO-3 gathers it on every rank)"
    projector_grad = model.llava.model.multi_modal_projector.linear_1.weight.grad
    assert projector_grad is not None and projector_grad.abs().sum() == 0, "the dummy image must contribute nothing"
    assert torch.isfinite(out["loss"])


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path):
    proc = run_group(
        [python(), str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG), "train.max_steps=6",
         "train.lr=1e30", "train.grad_clip=0", "train.optimizer=sgd", f"output_dir={tmp_path}"],
        timeout=300, env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "at step" in proc.stderr, proc.stderr[-1500:]


def test_a_lora_target_that_matches_nothing_is_an_error_naming_it():
    from mole.surgery import SurgeryError

    cfg = load_config(str(TINY_CONFIG), ["lora.attn_targets=[q_proj,v_prj]"])
    with pytest.raises(SurgeryError, match=r"\['v_prj'\] match no module"):
        build_mole_model(cfg, torch.float32)


def test_the_padding_mask_reaches_the_routers_when_passed_by_position(tiny):
    model, processor = tiny
    samples = [text_sample("short", "Count?", "two"), text_sample("long", "How many objects are there here?", "three")]
    batch = batch_of(processor, [{**s, "json": json.dumps(s["json"]).encode()} for s in samples])
    assert (batch["attention_mask"] == 0).any(), "precondition: the batch has padding"
    context = model.context
    with torch.no_grad():
        model.llava(batch["input_ids"], None, batch["attention_mask"])
    tokens = [stats.tokens.sum().item() for stats in context.stats()]
    assert tokens and all(t == batch["attention_mask"].sum().item() for t in tokens), tokens


def test_attention_is_sdpa_on_a_cpu_and_flash_attention_without_flash_attn_is_a_config_error(tiny):
    """``model.attn_implementation``: auto is sdpa where flash-attn cannot run (this CPU), the model is
    loaded with it, an unknown name is refused by the schema, and an explicit flash_attention_2 that
    cannot run is one line naming the key, before any model is loaded."""
    from transformers.utils import is_flash_attn_2_available

    from mole.config import ConfigError
    from mole.model import attention_implementation

    assert not is_flash_attn_2_available(), "precondition: no flash-attn and CUDA here"
    model, _ = tiny
    assert attention_implementation("auto") == "sdpa"
    assert model.llava.config.get_text_config()._attn_implementation == "sdpa", "auto must load the backbone with sdpa"
    assert attention_implementation("eager") == "eager"
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation: flash_attention_2 needs the flash-attn package"):
        attention_implementation("flash_attention_2")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation: must be one of auto, sdpa, eager, "
                                          r"flash_attention_2; got 'flash'"):
        load_config(str(TINY_CONFIG), ["model.attn_implementation=flash"])
    eager = load_config(str(TINY_CONFIG), ["model.attn_implementation=eager"])
    llava, _, _ = build_mole_model(eager, torch.float32)
    assert llava.config.get_text_config()._attn_implementation == "eager", "the key must reach from_pretrained"


def test_auto_attention_keeps_an_fp32_model_off_flash_attention(monkeypatch):
    """flash-attn computes in fp16/bf16 only: where it is installed (a GPU machine), ``auto`` takes it for
    a 16-bit model and sdpa for an fp32 one, and an explicit flash_attention_2 with fp32 is refused in one
    line naming the key (otherwise the first forward fails inside flash-attn). Availability is what this
    CPU machine lacks, so it is stood in for; the choice made from it is mole's."""
    import transformers.utils

    from mole.config import ConfigError
    from mole.model import attention_implementation

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert attention_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert attention_implementation("auto", torch.float16) == "flash_attention_2"
    assert attention_implementation("auto", torch.float32) == "sdpa"
    assert attention_implementation("flash_attention_2", torch.bfloat16) == "flash_attention_2"
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation: flash_attention_2 computes in fp16 or bf16 only"):
        attention_implementation("flash_attention_2", torch.float32)
