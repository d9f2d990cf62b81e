#!/bin/bash
# llama.cpp on the GPU (issue 14), in one command: build llama-cpp-python 0.3.36 with CUDA from the
# carried source, then one GGUF through the magics with n_gpu_layers=-1 and, with the very same build,
# on 16 CPU threads; %byzer_bench on each, GPU memory, the tok/s ratio.
#
#   bash benchmarks/gpu/llama_gpu.sh                       # on the GPU machine, carry .carry/llama/ship
#   STEPS=build bash benchmarks/gpu/llama_gpu.sh           # the build alone (it needs no Ray, no site carry)
#   STEPS="model gpu cpu" bash benchmarks/gpu/llama_gpu.sh # measure with a build already in $BUILD
#   CPU_DRY_RUN=1 bash benchmarks/gpu/llama_gpu.sh         # here: no build, the venv's CPU llama_cpp, tiny model
# A build cut off at BUILD_CAP (540 s) resumes from its ninja folder when STEPS=build runs again within
# ~30 s; EXTRA_CMAKE adds CMake flags (-DGGML_CUDA_FA=OFF drops the 39 flash-attention objects).
# Step caps (MODEL_CAP 120, GPU_CAP 180, CPU_CAP 260 s) keep a measuring call inside its 10 minutes;
# LAYERS (default 16) makes the model smaller if the CPU side is too slow for that.
#
# Every step writes $PARTS/STEP.json as it goes (bench_gpu.Parts); the end merges them into
# $PARTS/llama_results.json (copied to $OUT where that exists). SITE is the unpacked main carry
# (Ray, IPython, gguf: benchmarks/gpu/README.md); the build uses only the machine's own python3.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SHIP="${SHIP:-$ROOT/.carry/llama/ship}"
SITE="${SITE:-/tmp/u/site}"
BUILD="${BUILD:-/tmp/llama_cuda}"
PARTS="${PARTS:-/tmp/llama_parts}"
MODEL="${MODEL:-/tmp/llama_1b}"
CPU_THREADS="${CPU_THREADS:-16}"
STEPS="${STEPS:-build model gpu cpu}"
RAY_TMP="${RAY_TMP:-/tmp/ray_lg$$}"
RAY_PORT="${RAY_PORT:-6391}"
. "$HERE/common.sh"
mkdir -p "$PARTS"
DRY=()
if [ -n "${CPU_DRY_RUN:-}" ]; then
  STEPS="${STEPS/build /}"
  DRY=(--cpu-dry-run)
fi

find_cuda() {
  # nvcc: /usr/local/cuda first (a /usr/local/bin/nvcc may be a wrapper script), then PATH, then any /usr/local/cuda-*.
  NVCC=""
  for c in /usr/local/cuda/bin/nvcc "$(command -v nvcc 2>/dev/null)" /usr/local/cuda-*/bin/nvcc; do
    [ -n "$c" ] && [ -x "$c" ] && { NVCC="$c"; break; }
  done
  [ -n "$NVCC" ] || { echo "BUILD no nvcc found"; return 1; }
  CUDA_HOME="$(cd "$(dirname "$NVCC")/.." && pwd)"
  export CUDACXX="$NVCC" CUDA_HOME CUDA_PATH="$CUDA_HOME"
}

shim_libs() {
  # CMake's FindCUDAToolkit wants cublas_v2.h beside nvcc and unversioned libcublas.so / libcuda.so.
  # A toolkit made of NVIDIA's pip wheels (as on this dev host) has neither: cuBLAS then comes from the
  # python's nvidia/cu13 wheel and the driver from ldconfig, through a folder of links given to CMake.
  local shim=/tmp/llama_shim inc lib drv
  CMAKE_EXTRA=""
  LIB_DIRS="$CUDA_HOME/lib64"
  mkdir -p $shim/include $shim/lib
  if ! ls "$CUDA_HOME"/include/cublas_v2.h "$CUDA_HOME"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
    inc="$(python3 - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
found = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "*", "include", "cublas_v2.h"))]
print(os.path.dirname(found[0]) if found else "")
EOF
)"
    [ -n "$inc" ] || { echo "BUILD no cublas_v2.h beside nvcc nor in python3's nvidia wheels"; return 1; }
    lib="$(dirname "$inc")/lib"
    for h in "$inc"/cublas*.h "$inc"/nvblas.h; do [ -e "$h" ] && ln -sf "$h" $shim/include/; done
    ln -sf "$(ls "$lib"/libcublas.so.* | head -1)" $shim/lib/libcublas.so
    ln -sf "$(ls "$lib"/libcublasLt.so.* | head -1)" $shim/lib/libcublasLt.so
    CMAKE_EXTRA="-DCUDA_cublas_LIBRARY=$shim/lib/libcublas.so -DCUDA_cublasLt_LIBRARY=$shim/lib/libcublasLt.so"
    CMAKE_EXTRA="$CMAKE_EXTRA -DCMAKE_CUDA_FLAGS=-I$shim/include -DCMAKE_CXX_FLAGS=-I$shim/include"
    LIB_DIRS="$lib:$LIB_DIRS"
    echo "BUILD cuBLAS from the wheel at $lib"
  fi
  if ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/lib64/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so \
       >/dev/null 2>&1; then
    drv="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')"
    [ -n "$drv" ] || drv="$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null | head -1)"
    if [ -n "$drv" ]; then
      ln -sf "$drv" $shim/lib/libcuda.so
      CMAKE_EXTRA="$CMAKE_EXTRA -DCUDA_cuda_driver_LIBRARY=$shim/lib/libcuda.so"
      echo "BUILD driver library $drv"
    else
      CMAKE_EXTRA="$CMAKE_EXTRA -DGGML_CUDA_NO_VMM=ON"
      echo "BUILD no libcuda.so: GGML_CUDA_NO_VMM=ON"
    fi
  fi
}

build_tools() {
  # scikit-build-core from the image if it is new enough for 0.3.36 (>=0.9.2), else the carried wheel.
  if python3 -c "import sys, scikit_build_core as s; from packaging.version import Version as V; sys.exit(V(s.__version__) < V('0.9.2'))" 2>/dev/null; then
    SKB_FROM=image
  else
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/llama_tools "$SHIP"/scikit_build_core-*.whl || return 1
    export PYTHONPATH="/tmp/llama_tools${PYTHONPATH:+:$PYTHONPATH}"
    SKB_FROM=carried
  fi
  SKB_VERSION="$(python3 -c 'import scikit_build_core as s; print(s.__version__)')"
}

step_build() {
  local jobs started rc secs src log=$PARTS/llama_build.log
  find_cuda && shim_libs && build_tools || { record_build 0 1 "$log"; return 1; }
  jobs="${JOBS:-$(nproc)}"
  src=/tmp/llama_src/llama_cpp_python-0.3.36
  rm -rf "$BUILD"
  if [ ! -d "$src" ]; then
    mkdir -p /tmp/llama_src && tar xJf "$SHIP"/llama_cpp_python-0.3.36-slim.tar.xz -C /tmp/llama_src || return 1
  fi
  # A fixed build folder: a build cut off by BUILD_CAP goes on where ninja stopped if run again (/tmp lasts ~30 s).
  export SKBUILD_BUILD_DIR=/tmp/llama_skbuild CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 $CMAKE_EXTRA ${EXTRA_CMAKE:-}"
  echo "BUILD nvcc=$NVCC jobs=$jobs scikit-build-core=$SKB_VERSION ($SKB_FROM) CMAKE_ARGS=$CMAKE_ARGS"
  started=$(date +%s.%N)
  timeout "${BUILD_CAP:-540}" python3 -m pip install -v --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target "$BUILD" "$src" "$SHIP"/diskcache-*.whl "$SHIP"/starlette_context-*.whl > "$log" 2>&1
  rc=$?
  secs=$(python3 -c "import time; print(round(time.time() - $started, 1))")
  mkdir -p "$BUILD"
  echo "export LD_LIBRARY_PATH=$LIB_DIRS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" > "$BUILD/llama_env.sh" 2>/dev/null
  record_build "$secs" "$rc" "$log"
  [ $rc -eq 0 ]
}

record_build() {
  # build.json: seconds, exit status (124: past BUILD_CAP), how far ninja got, the log's tail, the import check.
  [ -f "$BUILD/llama_env.sh" ] && . "$BUILD/llama_env.sh"
  PYTHONPATH="$BUILD:$HERE:${PYTHONPATH:-}" python3 - "$PARTS" "$1" "$2" "$3" <<EOF
import json, re, subprocess, sys
from pathlib import Path
from bench_gpu import Parts
parts = Parts(Path(sys.argv[1]), "build")
log = Path(sys.argv[4]).read_text(errors="replace") if Path(sys.argv[4]).exists() else ""
steps = re.findall(r"\[(\d+)/(\d+)\]", log)
parts.put(seconds=float(sys.argv[2]), rc=int(sys.argv[3]), ok=sys.argv[3] == "0", jobs="${jobs:-}",
          nvcc="${NVCC:-}", cmake_args="${CMAKE_ARGS:-}", scikit_build_core="${SKB_VERSION:-} (${SKB_FROM:-})",
          ninja_progress="/".join(steps[-1]) if steps else None, log_tail=log[-1500:])
if Path("$BUILD/llama_cpp").is_dir():
    check = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '$BUILD'); import llama_cpp; "
                            "print(llama_cpp.__version__, 'gpu_offload', llama_cpp.llama_supports_gpu_offload(), "
                            "llama_cpp.__file__)"], capture_output=True, text=True)
    parts.put(import_check=(check.stdout + check.stderr).strip()[-600:])
else:
    parts.put(import_check="no build in $BUILD")
EOF
}

pack_build() {
  # The build back through \$OUT (at most 4 pieces of 15 MiB), so a later lease can carry it instead of building.
  [ -n "${OUT:-}" ] && [ -d "$BUILD/llama_cpp" ] || return 0
  tar cf - -C "$BUILD" . | xz -T0 -6 > /tmp/llama_cuda.tar.xz
  if [ "$(stat -c %s /tmp/llama_cuda.tar.xz)" -le $((60 * 1024 * 1024)) ]; then
    split -b 15M -d -a 1 /tmp/llama_cuda.tar.xz "$OUT/llama_cuda.tar.xz."
    echo "PACKED $(ls "$OUT"/llama_cuda.tar.xz.* | wc -l) pieces, $(stat -c %s /tmp/llama_cuda.tar.xz) bytes"
  else
    echo "PACKED not: $(stat -c %s /tmp/llama_cuda.tar.xz) bytes is over 60 MiB"
  fi
}

ray_up() {
  ray start --head --port="$RAY_PORT" --temp-dir="$RAY_TMP" --num-cpus="$1" --num-gpus="$2" \
    --disable-usage-stats --include-dashboard=false > "$PARTS/ray_start.log" 2>&1 || { tail -5 "$PARTS/ray_start.log"; return 1; }
  export RAY_ADDRESS="127.0.0.1:$RAY_PORT"
}

ray_down() {
  # Only this script's Ray (never `ray stop --force`): the processes whose arguments name its session
  # folder (not this script's own command line, which may name RAY_TMP), and their children (workers).
  local pids kids p
  pids="$(pgrep -f -- "$RAY_TMP/session_" | tr '\n' ' ')"
  for p in $pids; do kids="${kids:-} $(pgrep -P "$p" | tr '\n' ' ')"; done
  [ -n "$pids" ] && kill $pids ${kids:-} 2>/dev/null
  sleep 3
  pids="$(pgrep -f -- "$RAY_TMP/session_" | tr '\n' ' ')"
  for p in ${pids:-} ${kids:-}; do kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null; done
  return 0
}

measure() {
  timeout "$1" python3 "$HERE/llama_gpu.py" "$2" --parts "$PARTS" --model "$MODEL" --threads "$CPU_THREADS" "${DRY[@]}"
  echo "STEP $2 rc=$?"
  # what a step measured comes back even if the call is cut off later
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] && cp "$PARTS"/*.json "$OUT"/ 2>/dev/null
  return 0
}

run_steps() {
  local ray_started=""
  for step in $STEPS; do
    case $step in
      model) measure "${MODEL_CAP:-120}" model ;;
      gpu|cpu)
        if [ -z "$ray_started" ]; then
          ray_up "$CPU_THREADS" "${NUM_GPUS:-1}" || { echo "STEP ray_start failed"; return 1; }
          ray_started=1
        fi
        if [ "$step" = gpu ]; then measure "${GPU_CAP:-180}" gpu; else measure "${CPU_CAP:-260}" cpu; fi ;;
    esac
  done
  [ -n "$ray_started" ] && ray_down
  return 0
}

if [ -z "${CPU_DRY_RUN:-}" ]; then
  case " $STEPS " in *" build "*)
    # in a subshell, on the machine's own python3 alone: the site carry stays out of the build
    ( step_build; echo "STEP build rc=$?"; pack_build )
    STEPS="${STEPS/build/}" ;;
  esac
  [ -f "$BUILD/llama_env.sh" ] && . "$BUILD/llama_env.sh"
  # Workers import what the raylet's environment names: the CUDA build FIRST, then the repo, then the site carry.
  export PYTHONPATH="$BUILD:$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
run_steps
python3 "$HERE/llama_gpu.py" merge --parts "$PARTS" > /dev/null && echo "RESULTS $PARTS/llama_results.json"
[ -n "${OUT:-}" ] && [ -d "$OUT" ] && cp "$PARTS"/llama_results.json "$PARTS"/llama_build.log "$OUT"/ 2>/dev/null
exit 0
