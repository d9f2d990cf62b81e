#!/bin/bash
# The whole GPU side-by-side in one command, on a machine with one GPU:
#   bash benchmarks/gpu/run.sh                  # vLLM, Ray and IPython already installed (pip install -e '.[vllm]')
#   CARRY=/tmp/u/site bash benchmarks/gpu/run.sh  # an unpacked carry (build_carry.sh) on an offline machine
#   NUM_GPUS=2 LEVELS=64,256 STEPS="model direct_tp2 magics_tp2 magics_2x1" bash benchmarks/gpu/run.sh  # two GPUs
# Steps run one after the other, each in its own process, each capped in time,
# each writing its figures to $PARTS as it goes; the last step merges them into
# benchmarks/gpu/results.json. STEPS picks steps (default: all), LEVELS the
# concurrencies, MODEL the model directory (written by the first step).
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PARTS="${PARTS:-/tmp/bench_parts}"
MODEL="${MODEL:-/tmp/llama3_8b}"
LEVELS="${LEVELS:-1,16,64,256}"
STEPS="${STEPS:-model direct vllm_serve magics checks ray_llm local}"
OUT="${RESULTS:-$HERE/results.json}"
if [ -n "${CARRY:-}" ]; then
  # CARRY may list several folders (the carry, then wheels installed beside it); scripts are in the first.
  export PYTHONPATH="$ROOT:$CARRY" PATH="${CARRY%%:*}/bin:$PATH"
else
  export PYTHONPATH="$ROOT"
fi
. "$HERE/common.sh"
mkdir -p "$PARTS"
python3 - "$PARTS/env.json" "$MODEL" <<'EOF'
import json, subprocess, sys
import ray, vllm
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except FileNotFoundError:  # a CPU dry run
    gpu = ""
json.dump({"device": gpu or "no GPU", "model": "Llama-3-8B shape, random bf16 weights (load_format=dummy)",
           "vllm": vllm.__version__, "ray": ray.__version__}, open(sys.argv[1], "w"))
print("ENV", gpu, "vllm", vllm.__version__, "ray", ray.__version__)
EOF
bench() { local cap=$1; shift; timeout "$cap" python3 "$HERE/bench_gpu.py" "$@" --parts "$PARTS" --model "$MODEL" --levels "$LEVELS" ${EXTRA:-}; echo "STEP $* rc=$?"; }
# A Ray head of its own for the steps that deploy; `ray` is whichever Ray is first on PATH (RAY_LLM_SITE's for ray_llm).
with_ray() {
  ray start --head --num-gpus="${NUM_GPUS:-1}" --disable-usage-stats --include-dashboard=false >/dev/null 2>&1
  "$@"
  ray stop --force >/dev/null 2>&1
}
for step in $STEPS; do
  case $step in
    model) bench 120 model ;;
    direct) bench 420 direct ;;
    magics) with_ray bench 560 magics ;;
    checks) with_ray bench 580 checks ;;
    vllm_serve) bench 420 vllm_serve ;;
    ray_llm)
      # An older Ray whose ray.serve.llm drives this vLLM can be laid over the carry (build_ray_llm_carry.sh).
      if [ -n "${RAY_LLM_SITE:-}" ]; then
        PYTHONPATH="$RAY_LLM_SITE:$PYTHONPATH" PATH="$RAY_LLM_SITE/bin:$PATH" with_ray bench 420 ray_llm
      else
        with_ray bench 420 ray_llm
      fi ;;
    local) with_ray bench 420 local ;;
    # Two GPUs (NUM_GPUS=2): tensor parallelism over both, against two workers of one GPU each.
    direct_1gpu) bench 420 direct --tag direct_1gpu ;;
    direct_tp2) bench 420 direct --tag direct_tp2 --engine tensor_parallel_size=2 ;;
    magics_tp2) with_ray bench 560 magics --tag magics_tp2 --gpus 2 ;;
    magics_2x1) SKIP_WALK=1 with_ray bench 420 magics --tag magics_2x1 --gpus 1 --workers 2 --no-endpoint ;;
    # llama.cpp with CUDA, built beforehand (STEPS=build bash llama_gpu.sh), on the local step's model.
    llama) PARTS="$PARTS" MODEL=/tmp/llama1b SITE="${CARRY%%:*}" STEPS="model gpu cpu" timeout 900 \
             bash "$HERE/llama_gpu.sh"; echo "STEP llama rc=$?" ;;
  esac
done
python3 "$HERE/bench_gpu.py" merge_sections --parts "$PARTS" --out "$OUT" > /dev/null
python3 "$HERE/bench_gpu.py" merge --parts "$PARTS" --out "$OUT" > /dev/null && echo "RESULTS $OUT"
