"""Shared test utilities: launching real 2-rank DeepSpeed runs and writing tar shards."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "launch" / "configs" / "tiny.yaml"
TINY_MODEL = REPO / "models" / "tiny-llava"
SHORT_RUN_STEPS = 8  # steps of the shared short training runs
FAMILY_NAMES = ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl")
BASES = {family: REPO / "models" / f"tiny-{family.replace('_', '-')}" for family in FAMILY_NAMES}
"""Each backbone family's committed tiny model."""
ASPECT = {"qwen2_5_vl": "crop", "qwen3_vl": "crop"}
"""Image aspect of the adapters :func:`make_adapter` writes (training's ``data.image_aspect``), ``pad`` where
not given: the Qwen-VL families train on each image at its own aspect ratio."""


USED_PORTS: set[int] = set()  # DeepSpeed leaves /dev/shm buffers named after them; conftest removes those


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    USED_PORTS.add(port)
    return port


def remove_shared_memory_buffers() -> None:
    """Delete DeepSpeed CPU all-reduce buffers of the ports the tests used (killed runs leave them)."""
    for port in USED_PORTS:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)


def training_command(output_dir: Path, *overrides: str, ranks: int = 2) -> list[str]:
    """``deepspeed --num_gpus N launch/train.py --config tiny.yaml output_dir=... overrides...``."""
    return [
        python(), "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
        str(REPO / "launch" / "train.py"), "--config", str(TINY_CONFIG), f"output_dir={output_dir}", *overrides,
    ]


def launch_training(output_dir: Path, *overrides: str, ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """:func:`training_command` run for real; fails the test on error."""
    cmd = training_command(output_dir, *overrides, ranks=ranks)
    proc = run_group(cmd, timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def launch_trainings_together(runs: dict[Path, list[str]], timeout: int = 400) -> None:
    """:func:`launch_training` of each ``output_dir: overrides`` at the same time (their start-up, most
    of a tiny run, overlaps); fails the test naming the first that failed or hung."""
    started = {out: (cmd, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
               for out, overrides in runs.items() for cmd in [training_command(out, *overrides)]}
    problems = []
    for out, (cmd, proc) in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for _, other in started.values():
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            problems.append(f"timed out after {timeout} s (hung collective?): {' '.join(cmd)}\n{stderr[-3000:]}")
            continue
        if proc.returncode != 0:
            problems.append(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    if problems:
        raise AssertionError(problems[0])


def run_group(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in its own process group and kill the whole group on timeout, ranks included
    (a hung collective must fail the test, not leave orphaned ranks behind)."""
    proc = subprocess.Popen(cmd, cwd=kwargs.pop("cwd", REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s (hung collective?): {' '.join(cmd)}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def read_rank_log(output_dir: Path, rank: int) -> list[dict]:
    lines = (Path(output_dir) / "logs" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def logged_heldout_answers(output_dir: Path, ranks: int = 2) -> dict[tuple[str, int], str]:
    """The held-out answers every rank of a run logged during training, by (sample key, turn)."""
    return {(a["key"], a["turn"]): a["prediction"] for rank in range(ranks) for record in read_rank_log(output_dir, rank)
            if record.get("event") == "heldout_answers" for a in record["answers"]}


def evaluated_answers(base: Path, output_dir: Path, domain: str, shard: Path, max_new_tokens: int) -> dict[tuple[str, int], str]:
    """What :func:`mole.evaluate.evaluate`, the path of ``launch/eval.py``, answers on ``shard`` with the
    run's saved adapter (images prepared as its record says), by (sample key, turn)."""
    from mole.evaluate import EvalDomain, evaluate
    from mole.inference import load_model, load_processor

    adapter = str(Path(output_dir) / "adapter")
    model, processor = load_model(str(base), adapter), load_processor(str(base), adapter_dir=adapter)
    results = evaluate(model, processor, [EvalDomain(domain, [str(shard)])], batch_size=1, max_new_tokens=max_new_tokens)
    return {(p["key"], p["turn"]): p["prediction"] for p in results["predictions"]}


def step_records(output_dir: Path, rank: int) -> list[dict]:
    """A rank's per-step records (events such as ``{"event": "start", "step": 0}`` left out)."""
    return [r for r in read_rank_log(output_dir, rank) if "step" in r and "event" not in r]


def summed_over_ranks(output_dir: Path, key: str, ranks: tuple[int, ...] = (0, 1)) -> Counter:
    """A per-step counter field (``skipped``, ``domains``) summed over every step of the given ranks."""
    total: Counter = Counter()
    for rank in ranks:
        for record in step_records(output_dir, rank):
            total.update(record[key])
    return total


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A tar shard from ``{"__key__": str, "<ext>": bytes | dict}`` samples (dicts become JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = json.dumps(value).encode() if isinstance(value, dict) else value
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def read_shard_samples(shard: Path, count: int) -> list[dict]:
    """The first ``count`` samples of a shard (by key), as :func:`write_shard` takes them: ``{"__key__",
    "<ext>": bytes}``, the JSON member parsed."""
    members: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            data = tar.extractfile(member).read()
            members.setdefault(key, {"__key__": key})[ext] = json.loads(data) if ext == "json" else data
    return [members[key] for key in sorted(members)[:count]]


def noise_png(size: tuple[int, int], seed: int) -> bytes:
    """A noisy RGB image of ``size`` (width, height) as PNG: every pixel and tile differs."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def text_sample(key: str, question: str, answer: str) -> dict:
    return {"__key__": key, "json": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}}


def python() -> str:
    return sys.executable


def env_without_ranks() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def cli_env() -> dict:
    """This checkout's mole first on the path (whichever mole is installed), one thread for the tiny model."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def launch_module(name: str):
    """A ``launch/`` script as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def one_torch_thread():
    """Tiny matmuls run far faster on one thread on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)



@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """Imported into a test module, runs all of its tests on one torch thread (see one_torch_thread)."""
    with one_torch_thread():
        yield


def make_adapter(directory, family: str, num_experts: int, routing: str, domains: tuple[str, ...] = ()) -> None:
    """A tiny adapter of ``family`` saved by mole's own surgery and save path, every tensor random and far from zero."""
    import torch

    from mole.adapter import save_adapter
    from mole.backbones import FAMILIES
    from mole.spec import AdapterSpec, ImageSpec
    from mole.surgery import apply_mole

    model = FAMILIES[family].model_class.from_pretrained(BASES[family])
    spec = AdapterSpec.from_base(model.config, base_model=str(BASES[family]), num_experts=num_experts, routing=routing,
                                 aux_loss="switch", r=4, alpha=8.0, dropout=0.0,
                                 attn_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                 mlp_targets=("gate_proj", "up_proj", "down_proj"), train_projector=True,
                                 image=ImageSpec(ASPECT.get(family, "pad")), domains=domains)
    apply_mole(model, spec)
    generator = torch.Generator().manual_seed(num_experts * 7 + len(routing) + len(family))
    state = {name: torch.randn(param.shape, generator=generator) * 0.3
             for name, param in model.named_parameters() if param.requires_grad}
    save_adapter(str(directory), state, spec)
