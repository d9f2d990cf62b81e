#!/bin/bash
# Host side (x86_64, no GPU). Builds the Ray Serve LLM overlay for the offline GPU machine:
# Ray 2.57.0 (+ jsonref), installed for CPython 3.12 into one folder that goes FIRST on
# PYTHONPATH for the ray_llm step only, over the main carry (vLLM 0.26.0 + Ray 2.60.0).
#
# Why: Ray 2.60's ray.serve.llm imports vllm.entrypoints.serve.engine.protocol, which only
# vLLM >= 0.29 has (and that needs torch 2.13; the machine has torch 2.11, which vLLM
# 0.22-0.26 pin). Ray 2.57's ray.serve.llm was written against vLLM 0.25.1 (its `llm`
# extra pins vllm[audio]==0.25.1), and a static check of every vllm import in Ray 2.57's
# ray/llm and ray/serve/llm (modules and names) finds all of them in the carry's vLLM 0.26.0,
# as do vLLM 0.26's own ray imports (ray.dag, compiled graphs, placement groups) in Ray 2.57.
# So only Ray 2.57 travels, not another vLLM.
#
# What else of ray[llm] 2.57 the overlay carries: only what neither the main carry nor the
# machine's image has and something could import. Left out, on purpose:
#   nixl, nixl-cu13 (45 MB): only for prefill/decode disaggregation's KV transfer
#                            (NixlConnector), imported lazily; one replica never uses it.
#   hf_transfer:             only speeds up hub downloads (HF_HUB_ENABLE_HF_TRANSFER);
#                            the machine is offline and nothing in Ray imports it.
#   opentelemetry-proto:     importing it would switch Ray's dashboard agent out of the
#                            minimal mode that the Ray 2.60 columns ran in (the main carry
#                            lacks it too); Serve does not need it.
#   vllm[audio] extras:      only for transcription models.
# Everything else of ray[llm] is in the main carry (vLLM's and Serve's deps) or the image
# (pyarrow, pandas, numpy, grpcio, prometheus-client, fsspec, typer, pybind11, ninja, meson).
#
# Output (in the main checkout's .carry/rayllm/, ignored through .git/info/exclude):
#   wheels/  site/  rayllm.tar.xz  q0 [q1 ...] (pieces of at most 62 MiB)  sha256.txt ("HASH  -")
# On the GPU machine:
#   cat q? > /tmp/rayllm.tar.xz && sha256sum -c sha256.txt < /tmp/rayllm.tar.xz
#   mkdir -p /tmp/rl && tar xJf /tmp/rayllm.tar.xz -C /tmp/rl
#   PYTHONPATH=/tmp/rl/site:<repo>:/tmp/u/site PATH=/tmp/rl/site/bin:/tmp/u/site/bin:$PATH
# Rerunnable: wheels are kept, site/ and the archive are made anew.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# The main checkout (a worktree shares its git dir): the GPU run carries from there.
MAIN="$(dirname "$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir)")"
C="${RAYLLM_CARRY:-$MAIN/.carry/rayllm}"
. "$HERE/common.sh"
find_py312 || exit 1
PINS="ray==2.57.0 jsonref==1.1.0"
MAX_PIECE=62m
mkdir -p "$C/wheels"
grep -qx '/.carry/' "$MAIN/.git/info/exclude" 2>/dev/null || echo '/.carry/' >> "$MAIN/.git/info/exclude"
cd "$C"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

# 1. Download (pip skips wheels already there).
stamp "download"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d wheels $PINS \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
WHL="$(ls wheels/ray-2.57.0-cp312-*.whl wheels/jsonref-1.1.0-*.whl)"

# 2. Install into one folder for Python 3.12, no deps, no .pyc.
rm -rf site
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target site $WHL
stamp "installed: $(du -sh site | cut -f1)"

# 3. Trim as build_carry.sh does for Ray: the Java jar, and the dashboard's web UI (the
#    benchmark starts Ray with --include-dashboard=false; ray/dashboard's Python modules
#    stay, `ray start` and the dashboard agent import them).
rm -rf site/ray/jars site/ray/dashboard/client
find site -depth -type d -name __pycache__ -exec rm -rf {} +
sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' site/bin/*
stamp "trimmed: $(du -sh site | cut -f1)"

# 4. Nothing in the overlay may shadow the main carry or the image with another version:
#    only ray itself (on purpose) and jsonref's two modules are there.
TOP="$(ls site | grep -v '^bin$' | sort | tr '\n' ' ')"
[ "$TOP" = "jsonref-1.1.0.dist-info jsonref.py proxytypes.py ray ray-2.57.0.dist-info " ] \
  || { echo "unexpected top-level entries in the overlay: $TOP" >&2; exit 1; }
for n in jsonref.py proxytypes.py; do
  [ ! -e "$MAIN/.carry/stage/site/$n" ] || { echo "$n would shadow the main carry's" >&2; exit 1; }
done

# 5. Pack (fixed order, times and owners: a rerun gives the same bytes and hash), hash, split.
rm -f rayllm.tar.xz q? sha256.txt
tar cf - --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner site | xz -9 -T2 > rayllm.tar.xz
sha256sum rayllm.tar.xz | awk '{print $1"  -"}' > sha256.txt
split -b "$MAX_PIECE" -d -a 1 rayllm.tar.xz q
cat q? | sha256sum -c sha256.txt
ls -l rayllm.tar.xz q?
stamp "done: $(ls q? | wc -l) piece(s)"
