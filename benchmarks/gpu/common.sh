# Sourced by the GPU scripts: what each of them needs the same way.

# The environment every step runs in, exported so that every child (raylet, Ray workers, vLLM's
# processes) has it. NVLink multicast stays off (a shared host's GPUs can be put out of service by
# it): NCCL's, PyTorch's and NVSHMEM's switches, and vLLM's symmetric-memory all-reduce (multimem)
# is not even tried under tensor parallelism. Nothing reaches a hub or reports usage.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0

# find_py312: PY312, else the first python3.12 that runs (a pyenv shim of that name may exist yet not run).
find_py312() {
  local c
  if [ -z "${PY312:-}" ]; then
    for c in /root/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
      [ -n "$c" ] && "$c" --version >/dev/null 2>&1 && { PY312="$c"; break; }
    done
  fi
  [ -n "${PY312:-}" ] || { echo "no working python3.12" >&2; return 1; }
}
