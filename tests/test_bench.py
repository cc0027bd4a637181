"""Smoke runs of the benches at tiny shapes (seconds), so they keep working; the real numbers come from
the full commands in docs/performance.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from benchmarks import summarize
from tests.helpers import REPO, python

H, I, R, K, T = 32, 48, 4, 3, 16


def test_summarize_takes_ratios_of_medians_and_paired_iqr():
    times = {"lora": [1.0, 2.0, 3.0], "mole": [1.1, 2.2, 3.3], "base": [0.5, 1.0, 4.5]}
    out = summarize(times, baseline="lora")
    assert out["ratios"] == {"lora": 1.0, "mole": 1.1, "base": 0.5}, "median / median of the baseline"
    assert out["paired_ratio_iqr"]["mole"] == [1.1, 1.1], "per-round ratios are all 1.1"
    assert out["paired_ratio_iqr"]["base"] == [0.5, 1.0], "quartiles of [0.5, 0.5, 1.5]"
    assert out["paired_ratio_median"] == {"lora": 1.0, "mole": 1.1, "base": 0.5}, out["paired_ratio_median"]
    assert out["times_s"]["base"] == [0.5, 1.0, 4.5], "every round's time is kept"
    assert out["rounds"] == 3


def test_interleaved_rotates_the_order_and_leaves_the_warm_up_rounds_out():
    from benchmarks import interleaved

    calls: list[str] = []

    def variant(name: str):
        def run():
            calls.append(name)
            time.sleep(0.5 if len(calls) <= 6 else 0)  # the two warm-up rounds are slow, as first calls are
        return run

    times = interleaved({name: variant(name) for name in "abc"}, repeats=4, warmup=2, device=torch.device("cpu"))
    assert "".join(calls) == "abc" "bca" "cab" "abc" "bca" "cab", "round i starts at variant i mod 3"
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert max(max(t) for t in times.values()) < 0.4, f"warm-up rounds were timed: {times}"


def test_layer_bench_runs_every_variant_with_the_right_trainable_parameters(tmp_path):
    from benchmarks import layer

    out = tmp_path / "layer.json"
    result = layer.main(["--hidden", str(H), "--intermediate", str(I), "--tokens", str(T), "--rank", str(R),
                         "--repeats", "2", "--warmup", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    ran = set(result["ratios"])
    skipped = set(result["setup"]["notes"])
    assert ran | skipped == set(layer.CPU_VARIANTS) and skipped <= {"mixlora"}, (ran, skipped)
    assert result["ratios"]["lora"] == 1.0 and all(t > 0 for t in result["medians_s"].values())
    params = result["setup"]["trainable_params"]
    one = 3 * R * (H + I)  # gate, up, down: r * (in + out) each
    assert params["base"] == 0, "the base MLP must be frozen"
    assert params["lora"] == one
    assert params["mole"] == params["dense"] == K * one + K * H + K, "K experts + router with bias"
    if "mixlora" in ran:
        assert params["mixlora"] == K * one + K * H, "K experts + router without bias"


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def test_layer_bench_takes_the_mlp_shapes_of_the_family_it_is_given(family):
    from benchmarks import layer

    text = json.loads((REPO / "models" / f"tiny-{family.replace('_', '-')}" / "config.json").read_text())["text_config"]
    result = layer.main(["--backbone", family, "--tokens", str(T), "--rank", str(R), "--variants", "mole",
                         "--repeats", "1", "--warmup", "0"])
    setup = result["setup"]
    assert (setup["backbone"], setup["hidden"], setup["intermediate"]) == (family, text["hidden_size"],
                                                                           text["intermediate_size"]), setup
    h, i = text["hidden_size"], text["intermediate_size"]
    assert setup["trainable_params"]["mole"] == K * 3 * R * (h + i) + K * h + K, "K experts + router on the family's MLP"
    assert result["ratios"]["lora"] == 1.0 and result["medians_s"]["mole"] > 0


def test_layer_bench_with_one_expert_is_plain_lora_on_our_code(tmp_path):
    from benchmarks import layer

    result = layer.main(["--hidden", str(H), "--intermediate", str(I), "--tokens", str(T), "--rank", str(R),
                         "--experts", "1", "--variants", "mole", "--repeats", "1", "--warmup", "0"])
    assert result["setup"]["trainable_params"]["mole"] == result["setup"]["trainable_params"]["lora"], \
        "K=1 has no router: the same trainable parameters as peft's LoRA"


def test_ops_bench_counts_the_host_work_of_each_variant(tmp_path):
    """Counts, not times: exact on any machine, so they pin properties of the layer's host work."""
    from benchmarks import ops

    out = tmp_path / "ops.json"
    result = ops.main(["--hidden", str(H), "--intermediate", str(I), "--tokens", str(T), "--rank", "8",
                       "--layers", "4", "--variants", "base,mole_hard,mole_scaled,dense,mixlora", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    counts, per_op = result["counts"], result["per_op"]
    for name in per_op:  # mixlora where the optional package is installed
        assert "bernoulli_" not in {**per_op[name]["prefill"], **per_op[name]["decode"]}, f"{name}: dropout in eval mode"
    # LoRA's training call has no per-model add; one module reused as every block would sum each of its
    # 6 parameters' gradients over the 4 blocks, 6 x 3/4 adds a block
    assert per_op["lora"]["train"]["add"] == int(per_op["lora"]["train"]["add"]), \
        f"parameters accumulate gradients over blocks; each block must be its own module: {per_op['lora']['train']}"
    assert counts["base"]["train"] < counts["lora"]["train"] < counts["mole_hard"]["train"], counts
    assert result["ratios"]["mole_hard"] == counts["mole_hard"]["train"] / counts["lora"]["train"]
    assert all(n > 0 for c in counts.values() for n in c.values()), counts
    for name in ("mole_hard", "mole_scaled"):
        assert not {"sort", "index_select"} & set(per_op[name]["decode"]), f"{name}: a lone token must not be sorted"
        assert {"sort", "index_select"} <= set(per_op[name]["prefill"]), f"{name}: a prefill sorts its tokens"
    extra = per_op["mole_scaled"]["prefill"].get("mul", 0) - per_op["mole_hard"]["prefill"].get("mul", 0)
    assert extra == 1, f"scaled routing should scale its tokens once per layer, not per projection: {extra} muls"
    if result["setup"]["mole_dispatch"] != "grouped":
        pytest.skip("no CPU torch._grouped_mm here: the GPU path's counts cannot be checked")
    assert "_grouped_mm" in per_op["mole_hard"]["train"] and "mm" in per_op["mole_hard"]["train"]
    decode = {op: n for op, n in per_op["mole_hard"]["decode"].items() if op not in ("_grouped_mm", "mm", "add", "add_")}
    lora = {op: n for op, n in per_op["lora"]["decode"].items() if op not in ("mm", "add", "add_")}
    extra = {op: n - lora.get(op, 0) for op, n in decode.items() if n != lora.get(op, 0)}
    assert extra == {"addmm": 1, "_to_copy": 1, "_softmax": 1, "max": 1, "searchsorted": 1}, \
        f"a bf16 decode step should add only the router, its fp32 softmax, the top-1 and the offsets to LoRA's: {extra}"


def test_generate_bench_decodes_the_requested_tokens(tmp_path):
    from benchmarks import generate

    result = generate.main(["--size", "tiny", "--new-tokens", "3", "--prompt-tokens", "4", "--rank", "4",
                            "--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "gen.json")])
    assert result["setup"]["produced_tokens"] == {"lora": 3, "mole": 3}
    assert set(result["tokens_per_s"]) == {"lora", "mole"} and result["ratios"]["lora"] == 1.0


def run_step_bench(tmp_path, *extra: str, watch: set | None = None) -> dict:
    """The step bench in its own process; ``watch`` collects the DeepSpeed buffers of its ranks seen in
    /dev/shm meanwhile (named by their master port: other runs on the machine have buffers too)."""
    out = tmp_path / "step.json"
    cmd = [python(), "-m", "benchmarks", "step", "--size", "tiny", "--rank", "4",
           "--repeats", "1", "--warmup", "1", "--json", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline, ports = time.monotonic() + 240, set()
    while proc.poll() is None and time.monotonic() < deadline:
        if watch is not None:
            ports |= master_ports(proc.pid)
            watch.update(path for port in ports for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0]
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{output[-6000:]}"
    return json.loads(out.read_text())


def master_ports(pid: int) -> set[str]:
    """The ``--master_port`` of the DeepSpeed launchers under process ``pid``."""
    ports = set()
    try:
        for child in psutil.Process(pid).children(recursive=True):
            args = child.cmdline()
            ports |= {args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--master_port"}
            ports |= {arg.split("=", 1)[1] for arg in args if arg.startswith("--master_port=")}
    except psutil.Error:  # a process that ended between listing and reading
        pass
    return ports


@pytest.mark.slow
def test_step_bench_one_rank_reports_ratio_and_model_flops(tmp_path):
    result = run_step_bench(tmp_path, "--ranks", "1")
    assert set(result["ratios"]) == {"lora", "mole"} and result["setup"]["ranks"] == 1
    counts = result["mfu"]["mole"]["param_counts"]
    assert counts["router"] > 0 and result["mfu"]["lora"]["param_counts"]["router"] == 0
    assert counts["adapter_active"] == result["mfu"]["lora"]["param_counts"]["adapter_active"], \
        "top-1 MoLE and plain LoRA apply the same number of adapter weights per token"
    # By hand, the tiny preset (hidden 64, intermediate 172, 2 layers, vocab 512; CLIP 32 wide, 1 layer,
    # 28 px in 14 px patches: 4 image tokens + CLS; seq 32, batch 1) at r=4, K=3:
    #   frozen LLM 2-D weights: 2 x (4 x 64^2 + 3 x 64 x 172) + lm_head 512 x 64 = 131,584
    #   active adapters: 2 x (attention 4 x (4x64 + 64x4) + experts' one each of gate, up, down 3 x 944) = 9,760
    #   router 2 x (64 x 3 + 3) = 390 (MoLE only); projector 32x64 + 64 + 64x64 + 64 = 6,272
    #   vision tower, all of it: patch conv 18,816 + CLS 32 + positions 160 + pre-norm 64
    #     + layer (4 x 1,056 + fc 2,112 + 2,080 + norms 128) 8,544 + post-norm 64 = 27,680
    #   LLM 4 x 131,584 x 32 + attention 12 x 2 x 64 x 32^2 = 18,415,616
    #   trainable 6 x (9,760 [+ 390]) x 32 + projector 6 x 6,272 x 4 = 2,024,448 [2,099,328]
    #   vision forward 2 x 27,680 x 5 + 4 x 1 x 32 x 5^2 = 280,000
    flops = {variant: result["mfu"][variant]["model_flops_per_rank"] for variant in ("lora", "mole")}
    assert flops == {"lora": 20_720_064, "mole": 20_794_944}, flops


def test_ragged_llava665k_samples_pad_a_fifth_of_padded_batches_and_under_5_percent_of_packed_rows():
    """The step bench's --packing data (benchmarks/ragged.py) at LLaVA-1.5's scale: 576 image tokens,
    2,048-token rows, 4 rows per micro-batch; real tokens per step packed >= 2x padded."""
    from benchmarks.ragged import mode_batches, ragged_examples

    examples = ragged_examples(400, 0, 2048, 576, lambda gen: (torch.randn(3, 2, 2, generator=gen), None), 32000, 31999)
    assert 0.03 < sum(e.pixel_values is None for e in examples) / 400 < 0.1, "about 6 % text-only samples"
    stats = {}
    for mode in ("none", "grouped", "packed"):
        batches = mode_batches(examples, mode, 4, 2048, 64, 0, 20, 0)
        tokens, slots = sum(b["tokens"] for b in batches), sum(b["input_ids"].numel() for b in batches)
        assert all(b["input_ids"].shape[1] <= 2048 for b in batches)
        stats[mode] = (tokens / 20, 1 - tokens / slots)
    assert stats["none"][1] > 0.2 and stats["grouped"][1] < stats["none"][1] / 2, stats
    assert stats["packed"][1] < 0.05 and stats["packed"][0] > 2 * stats["none"][0], stats


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_step_bench_packing_runs_a_family_on_its_own_images(tmp_path, family):
    """``--packing`` builds the family's ragged samples (its image inputs, AnyRes tiles with their sizes
    or Qwen-VL's patches with their grid, and its image-token count, the image sized to LLaVA-1.5's
    share of the row) and times the modes on them. OneVision and Qwen3-VL share these layouts."""
    result = run_step_bench(tmp_path, "--ranks", "1", "--batch", "2", "--backbone", family, "--packing", "none", "packed")
    setup, packing = result["setup"], result["packing"]
    assert setup["backbone"] == family and setup["max_length"] == 32
    assert setup["image_tokens"] == {"llava_next": 10, "qwen2_5_vl": 9}[family], setup
    assert set(packing) == {"mole/none", "mole/packed", "lora/packed"}
    assert all(p["real_tokens_per_s"] > 0 for p in packing.values()), packing
    assert packing["mole/packed"]["real_tokens_per_step"] > packing["mole/none"]["real_tokens_per_step"], packing


@pytest.mark.distributed
def test_step_bench_launches_two_ranks_and_leaves_no_shared_memory(tmp_path):
    seen = set()
    result = run_step_bench(tmp_path, "--ranks", "2", watch=seen)
    assert result["setup"]["ranks"] == 2 and result["ratios"]["lora"] == 1.0
    assert seen, "the ranks' DeepSpeed buffers never appeared: the check below would pass vacuously"
    left = [path.name for path in seen if path.exists()]
    assert not left, f"the ranks left DeepSpeed's buffers in RAM: {sorted(left)}"


@pytest.mark.slow
def test_the_gpu_script_runs_every_bench_and_keeps_going_past_a_failure(tmp_path):
    """``launch/bench_gpu.sh`` at its smoke shapes, with the first bench made to fail (its result path
    is a directory): the failure is reported, every later bench still leaves its JSON, and the exit
    status says one failed."""
    (tmp_path / "layer_r128_t16.json").mkdir()
    done = subprocess.run(["bash", str(REPO / "launch" / "bench_gpu.sh"), str(tmp_path), "smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "!! layer_r128_t16 failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.glob("*.json") if p.is_file())
    assert names == ["generate.json", "layer_r16_t16.json", "step.json"], f"{names}\n{done.stdout[-3000:]}"
    assert all("mole" in json.loads((tmp_path / name).read_text())["ratios"] for name in names)
    assert "1 failed" in done.stdout.splitlines()[-1], done.stdout[-500:]
