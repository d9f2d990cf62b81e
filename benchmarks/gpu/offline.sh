#!/bin/bash
# run.sh on an offline GPU machine that files reach only a piece at a time (at most 64 MiB a copy), and
# whose commands each end within minutes: the pieces are gathered call by call, then the run goes on
# detached (setsid) while later calls bring more pieces or wait for it.
#
#   offline.sh gather            copy whatever pieces came with this copy of the repo into /tmp/c
#   offline.sh start PHASE...    unpack the carry, copy the repo to /tmp/repo, and start the phases one
#                                after the other in the background; a phase is "LEVELS:STEP,STEP,..."
#                                or "wait:FILE" (until a piece brought later is unpacked, 10 min at most)
#   offline.sh build_llama       build llama-cpp-python with CUDA in the background (llama_gpu.sh)
#   offline.sh overlay           unpack the Ray Serve LLM overlay (build_ray_llm_carry.sh's pieces q*)
#   offline.sh wait SECONDS      until the run ends or SECONDS pass; its log and parts go to $OUT
#
# NUM_GPUS and anything run.sh reads pass through. NVLink multicast stays off everywhere (run.sh exports
# the switches before any step starts).
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
C=/tmp/c
export PARTS=/tmp/bench_parts NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# A copy of the repo that runs from it: a later call's fresh copy of the tree must not change a script
# bash is still reading.
copy_repo() {
  rm -rf "$1" && mkdir -p "$1" && (cd "$ROOT" && tar cf - --exclude=.carry .) | tar xf - -C "$1"
}

case "${1:-}" in
  gather)
    mkdir -p "$C"
    for f in "$ROOT"/.carry/p? "$ROOT"/.carry/sha256.txt "$ROOT"/.carry/extra/* "$ROOT"/.carry/llama/ship/* \
             "$ROOT"/.carry/rayllm/q? "$ROOT"/.carry/rayllm/*.sha256; do
      [ -f "$f" ] && [ ! -e "$C/${f##*/}" ] && cp "$f" "$C/"
    done
    ls -la "$C" ;;
  start)
    shift
    (cd "$C" && cat p0 p1 p2 | sha256sum -c sha256.txt) || exit 1
    mkdir -p /tmp/u && cat "$C"/p0 "$C"/p1 "$C"/p2 | xz -d -T0 | tar x -C /tmp/u || exit 1
    if ls "$C"/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/u/extra "$C"/*.whl || exit 1
    fi
    copy_repo /tmp/repo
    cat > /tmp/phases.sh <<EOF
export CARRY=/tmp/u/site:/tmp/u/extra RAY_LLM_SITE=/tmp/rl/site
for phase in $*; do
  case "\$phase" in
    wait:*) for i in \$(seq 120); do [ -f "\${phase#wait:}" ] && break; sleep 5; done; echo "WAITED \$phase" ;;
    *) LEVELS="\${phase%%:*}" STEPS="\$(echo "\${phase#*:}" | tr , ' ')" bash /tmp/repo/benchmarks/gpu/run.sh ;;
  esac
done
touch /tmp/run.done
EOF
    rm -f /tmp/run.done
    setsid nohup bash /tmp/phases.sh > /tmp/run.log 2>&1 < /dev/null &
    echo "started: $*" ;;
  build_llama)
    # llama-cpp-python with CUDA, in the background from a copy of its own (start re-copies /tmp/repo),
    # niced and on half the cores so that the measurements beside it keep theirs.
    copy_repo /tmp/repo_build
    SHIP=$C PARTS=$PARTS STEPS=build JOBS=${JOBS:-16} setsid nohup nice -n 15 \
      bash /tmp/repo_build/benchmarks/gpu/llama_gpu.sh > /tmp/llama_build.out 2>&1 < /dev/null &
    echo "llama build started" ;;
  overlay)
    (cd "$C" && cat q? | sha256sum -c rayllm.sha256) || exit 1
    mkdir -p /tmp/rl && cat "$C"/q? | xz -d -T0 | tar x -C /tmp/rl && touch /tmp/rl/ready && echo "overlay ready" ;;
  wait)
    deadline=$((SECONDS + ${2:-60}))
    while [ ! -f /tmp/run.done ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
    [ -f /tmp/run.done ] && echo "RUN DONE" || echo "still running"
    if [ -n "${OUT:-}" ]; then
      cp /tmp/run.log "$OUT/run.log" 2>/dev/null
      cp /tmp/llama_build.out "$OUT/llama_build.out" 2>/dev/null
      tar czf "$OUT/parts.tgz" -C /tmp bench_parts 2>/dev/null
      cp /tmp/repo/benchmarks/gpu/results.json "$OUT/results.json" 2>/dev/null
    fi
    grep -E "^STEP|^\[|RESULTS|Error|error" /tmp/run.log | cut -c1-300 | tail -40 ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
