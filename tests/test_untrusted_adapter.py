"""An adapter directory is untrusted input: hostile specs and weights files are refused in one line
naming the field or tensor and the file, before anything large is built, with no network, exit 2."""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mole.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, save_adapter
from mole.spec import AdapterSpec
from tests.helpers import REPO, TINY_MODEL, cli_env, python, run_group
from tests.helpers import one_thread_for_the_module  # noqa: F401  (autouse fixture)

ROUTER = "model.language_model.layers.0.mlp.router.weight"
EXPERT = "model.language_model.layers.1.mlp.experts.up_proj.lora_A"


def build_adapter(directory, num_experts: int) -> None:
    """A valid adapter on the tiny model (random LoRA B, so it changes the logits), saved as training saves one."""
    from transformers import LlavaForConditionalGeneration

    from mole.surgery import apply_mole

    model = LlavaForConditionalGeneration.from_pretrained(TINY_MODEL)
    spec = AdapterSpec.from_base(model.config, base_model=str(TINY_MODEL), num_experts=num_experts, routing="scaled",
                                 aux_loss="switch", r=4, alpha=8, dropout=0.0, attn_targets=["q_proj", "v_proj"],
                                 mlp_targets=["up_proj", "down_proj"], train_projector=True)
    torch.manual_seed(0)
    apply_mole(model, spec)
    state = {name: (p.detach() + 0.05 * torch.randn_like(p)).contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_adapter(str(directory), state, spec)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A K=3 MoLE adapter and a K=1 plain LoRA adapter."""
    root = tmp_path_factory.mktemp("adapters")
    build_adapter(root / "mole", 3)
    build_adapter(root / "lora", 1)
    return root


def edit_config(**values):
    def edit(adapter):
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
        (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, **values}))
    return edit


def edit_state(change):
    def edit(adapter):
        state = load_file(str(adapter / ADAPTER_WEIGHTS))
        change(state)
        save_file(state, str(adapter / ADAPTER_WEIGHTS), metadata={"format": "mole"})
    return edit


def huge_header(adapter):
    """A header claiming a (10^6, 10^6) tensor over 16 bytes of data."""
    header = json.dumps({ROUTER: {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}).encode()
    (adapter / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


def _put(name, value):
    return edit_state(lambda state: state.__setitem__(name, value(state)))


HOSTILE = {  # id -> (which adapter, edit, what the one-line error must say)
    "huge_num_experts": ("mole", edit_config(num_experts=3_000_000), "K=3000000 (num_experts)"),
    "huge_r": ("mole", edit_config(r=10**9), "r=1000000000"),
    "huge_num_hidden_layers": ("lora", edit_config(num_hidden_layers=10**12), "num_hidden_layers=1000000000000"),
    "unknown_mlp_target": ("mole", edit_config(mlp_targets=["up_proj", "__class__"]), "__class__"),
    "int8_router": ("mole", _put(ROUTER, lambda s: s[ROUTER].to(torch.int8)), f"{ROUTER} is I8"),
    "wrong_shape": ("mole", _put(EXPERT, lambda s: s[EXPERT][:, :2].contiguous()), EXPERT),
    "extra_tensor": ("mole", _put("model.language_model.layers.0.mlp.extra", lambda s: torch.zeros(2)), "model.language_model.layers.0.mlp.extra"),
    "missing_tensor": ("mole", edit_state(lambda s: s.pop(ROUTER)), ROUTER),
    "all_nan": ("mole", _put(EXPERT, lambda s: torch.full_like(s[EXPERT], float("nan"))), f"tensor {EXPERT} has"),
    "inf_in_lora": ("lora", _put(EXPERT, lambda s: s[EXPERT].index_fill(1, torch.tensor([0]), float("inf"))), f"tensor {EXPERT} has"),
    "huge_header_shape": ("mole", huge_header, "not a readable safetensors file"),
}


def hostile_copy(adapters, tmp_path, case):
    kind, edit, message = HOSTILE[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters / kind, adapter)
    edit(adapter)
    touched = ADAPTER_CONFIG if "num_" in case or case in ("huge_r", "unknown_mlp_target") else ADAPTER_WEIGHTS
    return adapter, message, adapter / touched


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_load_model_refuses_a_hostile_adapter_naming_the_field_or_tensor_and_file(adapters, tmp_path, case):
    from mole.inference import load_model

    adapter, message, _ = hostile_copy(adapters, tmp_path, case)
    start = time.monotonic()
    with pytest.raises(AdapterError) as error:
        load_model(str(TINY_MODEL), str(adapter))
    text = str(error.value)
    assert message in text and str(adapter) in text and "\n" not in text, f"{case}: {text}"
    assert time.monotonic() - start < 20, f"{case}: refusing took {time.monotonic() - start:.0f} s"


@pytest.mark.parametrize("case", ["huge_num_experts", "huge_num_hidden_layers", "int8_router", "all_nan", "inf_in_lora", "wrong_shape"])
def test_export_refuses_a_hostile_adapter_in_every_format(adapters, tmp_path, case):
    from mole.export import export_mole, export_peft

    adapter, message, _ = hostile_copy(adapters, tmp_path, case)
    exports = [lambda: export_mole(str(adapter), str(tmp_path / "mole"))]
    if HOSTILE[case][0] == "lora":
        exports.append(lambda: export_peft(str(adapter), str(tmp_path / "peft")))
    for export in exports:
        start = time.monotonic()
        with pytest.raises(AdapterError) as error:
            export()
        assert message.split(" (")[0] in str(error.value) and time.monotonic() - start < 10, f"{case}: {error.value}"
    assert not (tmp_path / "mole").exists() and not (tmp_path / "peft").exists(), "nothing may be written"


def test_a_valid_adapter_loads_and_answers_as_before(adapters):
    """The checks change nothing for a valid adapter: its tensors are in the model and the logits are finite."""
    from mole.inference import load_model

    model = load_model(str(TINY_MODEL), str(adapters / "mole"))
    saved = load_file(str(adapters / "mole" / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in saved.items())
    ids = torch.tensor([[1, 15, 27, 99, 4]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


# --------------------------------------------------------------------------------- real processes

MEASURE = """import os, subprocess, sys
child = subprocess.Popen([sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(child.pid, 0)
print(f"peak_rss_kb={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs a script and reports its peak RSS from outside (the scripts end with ``os._exit``, past any code of theirs)."""


def cli(script: str, adapter, tmp_path, *extra: str) -> list[str]:
    args = {"infer": ["--prompt", "What color?", "--max-new-tokens", "2"],
            "eval": ["--shards", f"shapes={REPO / 'data_shards/shapes/test-000000.tar'}", "--max-samples", "1",
                     "--out", str(tmp_path / "eval")],
            "export": ["--format", "mole", "--out", str(tmp_path / "export")]}[script]
    return [python(), "-c", MEASURE, str(REPO / "launch" / f"{script}.py"), "--adapter", str(adapter), *args, *extra]


def assert_one_line_exit_2(proc, message: str, limit_kb: int = 1_500_000) -> None:
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("peak_rss_kb=")]
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    peak = int(proc.stderr.rsplit("peak_rss_kb=", 1)[1].split()[0])
    assert peak < limit_kb, f"peak RSS {peak} kB: something large was allocated"


@pytest.mark.parametrize("script, case", [
    ("infer", "huge_num_experts"), ("eval", "all_nan"), ("export", "huge_num_hidden_layers"),
])
def test_cli_refuses_a_hostile_adapter_in_one_line_with_exit_2(adapters, tmp_path, script, case):
    adapter, message, _ = hostile_copy(adapters, tmp_path, case)
    proc = run_group(cli(script, adapter, tmp_path), 120, env=cli_env())
    assert_one_line_exit_2(proc, message)
    assert str(adapter) in proc.stderr, f"the error must name the file: {proc.stderr[-2000:]}"


@pytest.mark.parametrize("script", ["infer", "eval"])
def test_a_hub_id_as_base_model_is_refused_without_touching_the_network(adapters, tmp_path, script):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters / "mole", adapter)
    edit_config(base_model="llava-hf/llava-1.5-7b-hf")(adapter)
    env = {**cli_env(), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # a network attempt would hang or fail otherwise
    start = time.monotonic()
    proc = run_group(cli(script, adapter, tmp_path), 120, env=env)
    assert_one_line_exit_2(proc, f"base_model in {adapter / ADAPTER_CONFIG}: base model 'llava-hf/llava-1.5-7b-hf' is not a local directory")
    assert "--allow-remote-base" in proc.stderr


def test_export_merged_refuses_a_hub_id_base_and_a_nan_adapter(adapters, tmp_path):
    from mole.export import export_merged

    adapter, message, _ = hostile_copy(adapters, tmp_path, "inf_in_lora")
    with pytest.raises(AdapterError, match="non-finite"):
        export_merged(str(adapter), str(tmp_path / "merged"), str(TINY_MODEL))
    with pytest.raises(AdapterError, match="'llava-hf/llava-1.5-7b-hf' is not a local directory"):
        export_merged(str(adapters / "lora"), str(tmp_path / "merged"), "llava-hf/llava-1.5-7b-hf")
    assert not (tmp_path / "merged").exists()
