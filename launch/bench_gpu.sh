#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one go, on one Hopper GPU (bf16, LLaVA-1.5-7B shapes):
#
#     bash launch/bench_gpu.sh OUT_DIR [full|quick|smoke]
#
# writes layer_r*_t*.json, step.json, generate.json and each bench's log to OUT_DIR. Each bench
# runs under its own time limit and a failure does not stop the others, so a partial run still
# leaves every result it reached (the exit status says whether any failed). `quick` runs fewer
# rounds (about half the time) for a first look; `smoke` checks the script itself at tiny shapes.
# Needs deepspeed, peft and transformers; mixlora (optional) adds the peer variant to `layer`.
set -uo pipefail

out=${1:?usage: bash launch/bench_gpu.sh OUT_DIR [full|quick|smoke]}
mode=${2:-full}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2
export PYTHONUNBUFFERED=1

dtype=bf16 layer_tokens=(2048 8192) layer_shape=() step_size=(--size 7b) generate_size=(--size 7b --new-tokens 64)
case $mode in
    full) layer_rounds=30 step_rounds=8 generate_rounds=4 ;;
    quick) layer_rounds=12 step_rounds=4 generate_rounds=2 ;;
    smoke)  # the script's own check: tiny shapes in fp32, on any machine
        layer_rounds=1 step_rounds=1 generate_rounds=1 dtype=fp32 layer_tokens=(16)
        layer_shape=(--hidden 64 --intermediate 128) step_size=(--size tiny) generate_size=(--size tiny --new-tokens 2) ;;
    *) echo "unknown mode '$mode': full, quick or smoke" >&2; exit 2 ;;
esac

failed=0
run() {  # NAME LIMIT_S COMMAND...: one bench, its output in OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$out/$name.log"
    if [[ $rc != 0 ]]; then
        echo "!! $name failed (exit $rc): see $out/$name.log"
        failed=$((failed + 1))
    fi
}

python3 -c 'import torch; print("torch", torch.__version__, "| device:",
            torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
for tokens in "${layer_tokens[@]}"; do
    for rank in 128 16; do
        run "layer_r${rank}_t${tokens}" 150 python3 -m benchmarks layer --dtype "$dtype" --rank "$rank" \
            --tokens "$tokens" ${layer_shape[@]+"${layer_shape[@]}"} --repeats "$layer_rounds" --warmup 3 \
            --json "$out/layer_r${rank}_t${tokens}.json"
    done
done
run step 300 python3 -m benchmarks step "${step_size[@]}" --dtype "$dtype" --ranks 1 \
    --repeats "$step_rounds" --warmup 2 --json "$out/step.json"
run generate 240 python3 -m benchmarks generate "${generate_size[@]}" --dtype "$dtype" \
    --repeats "$generate_rounds" --warmup 1 --json "$out/generate.json"
echo "== done ($(date -u +%H:%M:%S)): $(ls "$out"/*.json 2>/dev/null | wc -l) result files in $out, $failed failed"
exit $((failed > 0))
