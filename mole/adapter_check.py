"""An adapter directory is untrusted input: it is checked before anything is built from it.

``mole_config.json`` decides how large the modules surgery creates are, and ``adapter.safetensors``
what is copied into them. A hostile or damaged pair must fail in one line naming the field or tensor
and the file, not allocate gigabytes, spin, reach the network, or load NaNs that then "answer". The
checks, in the order loading runs them:

1. the spec's types and ranges (:class:`mole.spec.AdapterSpec`, read by :func:`mole.adapter.read_adapter_spec`);
2. the base: a local directory with ``config.json`` unless the caller allows a remote one
   (:func:`resolve_base`), with the family and shapes the spec records (:func:`mole.inference.check_base_fits`);
3. the weights file's header, read without loading a tensor (:func:`read_header`): every tensor a float
   (fp32, bf16, fp16) and exactly the tensors the surgery would create on that base, with their shapes
   (:func:`expected_shapes`, surgery on the meta device, which allocates nothing); without a base,
   the names, K and r the spec describes (:func:`check_against_spec`);
4. the values, each tensor as it is read: a NaN or an infinity is refused (:func:`read_finite_tensors`).
"""

from __future__ import annotations

import os
import re

import torch

from mole.adapter import AdapterError
from mole.backbones import FAMILIES, backbone_for
from mole.spec import AdapterSpec

FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""The safetensors dtypes an adapter tensor may have; the model computes in one of these."""

EXPERT_KEY = re.compile(r"(?P<layer>.*\.layers\.(?P<index>\d+)\.mlp)\.experts\.(?P<proj>\w+)\.lora_(?P<ab>[AB])")
ROUTER_KEY = re.compile(r".*\.layers\.(?P<index>\d+)\.mlp\.router\.(?P<part>weight|bias)")
ATTN_KEY = re.compile(r"(?P<module>.*\.layers\.(?P<index>\d+)\.self_attn\.(?P<proj>\w+))\.lora_(?P<ab>[AB])\.default\.weight")

Shapes = dict[str, tuple[int, ...]]


def resolve_base(base: str | None, named_by: str, allow_remote: bool = False) -> str:
    """The local directory of base model ``base`` (``named_by`` says where the name came from, for the
    error). A base is a local directory with ``config.json``; a Hugging Face Hub id is downloaded only
    when ``allow_remote`` says so, and nothing reaches the network before that is decided."""
    if not base:
        raise AdapterError(f"{named_by}: no base model recorded; pass --base")
    if os.path.isfile(os.path.join(base, "config.json")):
        return base
    if not allow_remote:
        what = "has no config.json" if os.path.isdir(base) else "is not a local directory"
        raise AdapterError(f"{named_by}: base model {base!r} {what} (relative paths start at {os.getcwd()!r}); "
                           f"pass --base with a local LLaVA directory, or --allow-remote-base to download a Hub model")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base)
    except (OSError, ValueError) as err:
        raise AdapterError(f"{named_by}: base model {base!r} could not be downloaded ({err})") from None


def read_header(path: str) -> Shapes:
    """Each tensor's shape as the file's header states it, read without loading any tensor; every
    tensor must be a float. safetensors itself refuses a header whose shapes do not fit the file's size."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as handle:
            header = {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                      for name in handle.keys()}
    except (SafetensorError, OSError) as err:  # a truncated, overwritten or unreadable file
        raise AdapterError(f"{path}: not a readable safetensors file ({err})") from None
    wrong = [f"{name} is {dtype}" for name, (dtype, _) in sorted(header.items()) if dtype not in FLOAT_DTYPES]
    if wrong:
        raise AdapterError(f"{path}: {len(wrong)} tensors are not float32, bfloat16 or float16: {', '.join(wrong[:3])}")
    return {name: shape for name, (_, shape) in header.items()}


def expected_shapes(spec: AdapterSpec, base_config, where: str = "mole_config.json") -> Shapes:
    """Name -> shape of every tensor :func:`mole.surgery.apply_mole` makes trainable on the base that
    ``base_config`` describes: the surgery itself, run on the meta device (no memory, no values)."""
    from mole.surgery import SurgeryError, apply_mole

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = backbone_for(base_config).model_class(base_config)
        try:
            apply_mole(model, spec)
        except SurgeryError as err:
            raise AdapterError(f"{where}: does not fit the base model: {err}") from None
    return {name: tuple(param.shape) for name, param in model.named_parameters() if param.requires_grad}


def check_names(found: Shapes, expected: Shapes, path: str) -> None:
    """``found`` (a file's header) must hold exactly the ``expected`` tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{path} does not match the model its mole_config.json describes: {len(missing)} missing "
                           f"tensors {missing[:3]}, {len(unexpected)} unexpected tensors {unexpected[:3]}")


def check_shapes(found: Shapes, expected: Shapes, path: str) -> None:
    """Every ``expected`` tensor has its shape in ``found`` (which holds the same names)."""
    wrong = [f"{name}: file {found[name]} vs model {shape}" for name, shape in expected.items() if found[name] != shape]
    if wrong:
        raise AdapterError(f"{path} has {len(wrong)} tensors of the wrong shape: {wrong[:3]}")


def check_against_spec(found: Shapes, spec: AdapterSpec, where: str) -> None:
    """Without the base: every layer has every MLP target's experts with K and r as specified, a
    router (K, hidden) iff K>1 and the routing is learned (not ``domain``), attention LoRA of rank r on every attention target, the projector iff
    it trained, and nothing else. Runs in time linear in the number of tensors, whatever the spec says."""
    layers, num_experts, r, hidden = spec.num_hidden_layers, spec.num_experts, spec.r, spec.hidden_size
    per_layer = {
        "expert": {(p, ab) for p in spec.mlp_targets for ab in "AB"},
        "attention LoRA": {(p, ab) for p in spec.attn_targets for ab in "AB"},
        "router": {("weight",), ("bias",)} if num_experts > 1 and spec.routing != "domain" else set(),
    }
    seen: dict[str, set] = {what: set() for what in per_layer}
    problems: list[str] = []
    for name, shape in sorted(found.items()):
        if match := EXPERT_KEY.fullmatch(name):
            what, key = "expert", (match["proj"], match["ab"])
            rank_dim = 1 if match["ab"] == "A" else 2
            if len(shape) != 3 or shape[0] != num_experts or shape[rank_dim] != r:
                problems.append(f"{name} has the wrong shape {shape}, expected K={num_experts} (num_experts), r={r}")
        elif (match := ROUTER_KEY.fullmatch(name)) and per_layer["router"]:
            what, key = "router", (match["part"],)
            want = (num_experts, hidden) if match["part"] == "weight" else (num_experts,)
            if shape != want:
                problems.append(f"{name} has the wrong shape {shape}, expected {want} (num_experts, hidden_size)")
        elif match := ATTN_KEY.fullmatch(name):
            what, key = "attention LoRA", (match["proj"], match["ab"])
            if len(shape) != 2 or shape[0 if match["ab"] == "A" else 1] != r:
                problems.append(f"{name} has the wrong shape {shape}, expected rank r={r}")
        else:
            if not (spec.train_projector and _is_projector(name, spec)):
                problems.append(f"unexpected tensor {name}")
            continue
        index = match["index"]
        entry = (int(index), *key)
        if index != str(int(index)) or int(index) >= layers or key not in per_layer[what] or entry in seen[what]:
            problems.append(f"{what} tensor {name} is not one mole_config.json describes")
        seen[what].add(entry)
    for what, keys in per_layer.items():
        if len(seen[what]) < layers * len(keys):  # name the first few missing, looking no further than needed
            missing = []
            for index in range(layers):
                missing += [(index, *key) for key in sorted(keys) if (index, *key) not in seen[what]]
                if len(missing) >= 3:
                    break
            problems.append(f"missing {what} tensors for (layer, ...) {missing[:3]} of num_hidden_layers={layers}")
    if spec.train_projector and not any(_is_projector(name, spec) for name in found):
        problems.append("train_projector is set but there are no projector tensors")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(f"{where}: weights do not match mole_config.json: {problems[0]}{more}")


def _is_projector(name: str, spec: AdapterSpec) -> bool:
    """Whether ``name`` is a tensor of the projection the family trains with ``train_projector``."""
    backbone = FAMILIES[spec.family]
    return any(name == f"model.{prefix}" or name.startswith(f"model.{prefix}.") for prefix in backbone.projector_prefixes)


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise AdapterError(f"{where}: tensor {name} has {int((~finite).sum())} non-finite values (NaN or inf) "
                           f"of {tensor.numel()}; the adapter is damaged (a diverged run?)")


def read_finite_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checked file, one at a time, each refused if it holds a NaN or an infinity."""
    from safetensors import SafetensorError, safe_open

    state = {}
    try:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                state[name] = handle.get_tensor(name)
                check_finite(name, state[name], path)
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path}: not a readable safetensors file ({err})") from None
    return state


def checked_weights(path: str, spec: AdapterSpec, base_config=None) -> dict[str, torch.Tensor]:
    """The tensors of adapter weights file ``path`` for ``spec``, after checks 3 and 4 of this module
    (against the spec, and the base ``base_config`` describes when given)."""
    found = read_header(path)
    config = os.path.join(os.path.dirname(path), "mole_config.json")
    expected = None if base_config is None else expected_shapes(spec, base_config, config)
    if expected is not None:
        check_names(found, expected, path)
    check_against_spec(found, spec, path)  # names the spec field behind a wrong shape
    if expected is not None:
        check_shapes(found, expected, path)
    return read_finite_tensors(path)


def check_state(state: dict[str, torch.Tensor], spec: AdapterSpec, where: str) -> None:
    """Checks 3 and 4 (without a base) for weights already in memory, e.g. consolidated from a checkpoint."""
    wrong = [f"{name} is {tensor.dtype}" for name, tensor in state.items() if tensor.dtype not in FLOAT_DTYPES.values()]
    if wrong:
        raise AdapterError(f"{where}: tensors are not float32, bfloat16 or float16: {', '.join(wrong[:3])}")
    check_against_spec({name: tuple(tensor.shape) for name, tensor in state.items()}, spec, where)
    for name, tensor in state.items():
        check_finite(name, tensor, where)
