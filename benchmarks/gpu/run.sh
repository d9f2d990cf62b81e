#!/bin/bash
# The whole GPU side-by-side in one command, on a machine with one GPU:
#   bash benchmarks/gpu/run.sh                  # vLLM, Ray and IPython already installed (pip install -e '.[vllm]')
#   CARRY=/tmp/u/site bash benchmarks/gpu/run.sh  # an unpacked carry (build_carry.sh) on an offline machine
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
STEPS="${STEPS:-model direct vllm_serve magics checks ray_llm}"
OUT="${RESULTS:-$HERE/results.json}"
if [ -n "${CARRY:-}" ]; then
  export PYTHONPATH="$ROOT:$CARRY" PATH="$CARRY/bin:$PATH"
else
  export PYTHONPATH="$ROOT"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$PARTS"
python3 - "$PARTS/env.json" "$MODEL" <<'EOF'
import json, subprocess, sys
import ray, vllm
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
json.dump({"device": gpu or "no GPU", "model": "Llama-3-8B shape, random bf16 weights (load_format=dummy)",
           "vllm": vllm.__version__, "ray": ray.__version__}, open(sys.argv[1], "w"))
print("ENV", gpu, "vllm", vllm.__version__, "ray", ray.__version__)
EOF
bench() { timeout "$1" python3 "$HERE/bench_gpu.py" "$2" --parts "$PARTS" --model "$MODEL" --levels "$LEVELS" ${EXTRA:-}; echo "STEP $2 rc=$?"; }
for step in $STEPS; do
  case $step in
    model) bench 120 model ;;
    direct) bench 420 direct ;;
    magics)
      ray start --head --num-gpus="${NUM_GPUS:-1}" --disable-usage-stats --include-dashboard=false >/dev/null 2>&1
      bench 560 magics
      ray stop --force >/dev/null 2>&1 ;;
    checks)
      ray start --head --num-gpus="${NUM_GPUS:-1}" --disable-usage-stats --include-dashboard=false >/dev/null 2>&1
      bench 580 checks
      ray stop --force >/dev/null 2>&1 ;;
    vllm_serve) bench 420 vllm_serve ;;
    ray_llm)
      ray start --head --num-gpus="${NUM_GPUS:-1}" --disable-usage-stats --include-dashboard=false >/dev/null 2>&1
      bench 420 ray_llm
      ray stop --force >/dev/null 2>&1 ;;
  esac
done
python3 "$HERE/bench_gpu.py" merge --parts "$PARTS" --out "$OUT" > /dev/null && echo "RESULTS $OUT"
