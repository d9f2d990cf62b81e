#!/bin/bash
# Host side (x86_64, no GPU). Builds the "carry" for the offline GPU machine:
# vLLM 0.26 + Ray 2.60 + IPython and friends (pins.txt beside this file),
# installed for CPython 3.12 into one folder, trimmed, packed with xz -9 and
# split into exactly 3 pieces, each under 62 MiB:
#   .carry/p0 .carry/p1 .carry/p2   (cat p0 p1 p2 > site.tar.xz)
#   .carry/sha256.txt               (sha256 of the whole archive, "HASH  -":
#                                    check with `sha256sum -c sha256.txt < site.tar.xz`)
# Everything (wheels/, stage/, site.tar.xz, pieces) lives in <repo>/.carry/,
# which .git/info/exclude keeps out of git.
# The GPU machine already has torch 2.11.0, transformers, numpy, tokenizers,
# safetensors, huggingface_hub, triton, ...: they are not carried.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
C="$ROOT/.carry"
PINS="$HERE/pins.txt"
. "$HERE/common.sh"
find_py312 || exit 1
MAX_PIECE=$((62 * 1024 * 1024))   # each piece strictly under this
mkdir -p "$C"
grep -qx '/.carry/' "$ROOT/.git/info/exclude" 2>/dev/null || { mkdir -p "$ROOT/.git/info"; echo '/.carry/' >> "$ROOT/.git/info/exclude"; }
cd "$C"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

# 1. Download (pip skips wheels already in wheels/).
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64"
stamp "download"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $P -d wheels -r "$PINS" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# Keep exactly the pinned wheels (a stale wheel from an older pins.txt must not be installed).
WHL=$(python3 - "$PINS" wheels <<'EOF'
import os, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        n, v = line.split("==")
        pins[norm(n)] = v.strip()
found = {}
for f in sorted(os.listdir(sys.argv[2])):
    if f.endswith(".whl"):
        n, v = f.split("-")[:2]
        if pins.get(norm(n)) == v:
            found[norm(n)] = os.path.join(sys.argv[2], f)
missing = sorted(set(pins) - set(found))
if missing:
    sys.exit("missing wheels: %s" % missing)
print("\n".join(found[k] for k in sorted(found)))
EOF
)
stamp "$(echo "$WHL" | wc -l) wheels, $(du -ch $WHL | tail -1 | cut -f1)"

# 2. Install into one folder for Python 3.12, no deps, no .pyc.
rm -rf stage
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target stage/site $WHL
stamp "installed: $(du -sh stage/site | cut -f1)"

# 3. Trim what the H100 run does not need (as in shared/gpu/build_carry.sh).
cd stage/site
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs ray/jars/ray_dist.jar \
      ray/dashboard/client/build/static/js/*.map \
      vllm/third_party/deep_gemm/_C.cpython-31[0134]-x86_64-linux-gnu.so
find . -depth -type d -name __pycache__ -exec rm -rf {} +
sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' bin/*
cd "$C"
stamp "trimmed: $(du -sh stage/site | cut -f1)"

# 4. Pack, hash, split into exactly 3 pieces.
pack() {
  rm -f site.tar.xz p0 p1 p2 p3 sha256.txt
  tar cf - -C stage site | xz -9 -T2 > site.tar.xz
  SIZE=$(stat -c %s site.tar.xz)
  PIECE=$(( (SIZE + 2) / 3 ))
  stamp "packed: $SIZE bytes; piece size $PIECE"
}
pack
if [ "$PIECE" -ge "$MAX_PIECE" ]; then
  # Second trim, only when needed: nothing here is used by
  # `import vllm, ray; from ray import serve; from vllm.entrypoints.openai import api_server`.
  stamp "too big for 3 pieces under 62 MiB: trimming more"
  ( cd stage/site
    rm -rf ray/dashboard/client/build          # dashboard web UI (runs use --include-dashboard=false)
    rm -rf vllm/third_party/fmha_sm100 )       # Blackwell-only kernels, imported lazily (MiniMax M3 on SM100)
  pack
  [ "$PIECE" -lt "$MAX_PIECE" ] || { echo "still too big: trim more" >&2; exit 1; }
fi
sha256sum site.tar.xz | awk '{print $1"  -"}' > sha256.txt
split -b "$PIECE" -d -a 1 site.tar.xz p
ls p? | wc -l | grep -qx 3 || { echo "expected exactly 3 pieces" >&2; exit 1; }
cat p0 p1 p2 | sha256sum -c sha256.txt
ls -l site.tar.xz p0 p1 p2
stamp "done"
