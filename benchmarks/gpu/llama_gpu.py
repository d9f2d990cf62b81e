"""llama.cpp on the GPU against the CPU, through the magics, on one GGUF and one build (issue 14).

    python benchmarks/gpu/llama_gpu.py STEP --parts DIR [--model DIR] [--layers 16] [--threads 16] [--cpu-dry-run]

Steps, each in its own process (llama_gpu.sh runs them in order, Ray already up):
  model  write a random Llama of about 0.8B parameters (hidden 2048, 16 layers, f32) with the
         project's own generator, byzer_magic.tinymodel, timed; its GGUF is what both runs load
  gpu    %%byzer_deploy --infer_backend llama_cpp --gpus_per_worker 1 with n_gpu_layers=-1, %byzer_chat,
         %byzer_bench (its DataFrame rows), GPU memory deployed and after %byzer_undeploy
  cpu    the same GGUF with the same llama-cpp-python build on the CPU: n_gpu_layers=0,
         --gpus_per_worker 0, --cpus_per_worker THREADS, n_threads=THREADS; the same bench
  merge  parts -> DIR/llama_results.json, with the GPU/CPU ratio of output tokens/s per level
--cpu-dry-run: the tiny default model, no GPU asked for (n_gpu_layers=-1 on a CPU build runs on the CPU),
a check of every step's plumbing on a machine without one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from bench_gpu import LOCAL_SHAPE, Parts, _cell, _gpu_memory_mib, _read, reported  # noqa: E402

LEVELS = (1, 4)
BENCH = "--requests 16 --max_tokens 64"
SHAPE = {k: v for k, v in LOCAL_SHAPE.items() if k != "num_layers"}
"""The GGUF of bench_gpu's local step: written once, it serves both when they share --model."""


def gguf_path(model_dir: Path) -> Path:
    return model_dir / "tiny-llama-f32.gguf"


def write_model(args: argparse.Namespace, parts: Parts) -> None:
    from byzer_magic.tinymodel import TinyConfig, build

    config = TinyConfig() if args.cpu_dry_run else TinyConfig(num_layers=args.layers, **SHAPE)
    started = time.perf_counter()
    model = build(args.model, config)
    size = model.gguf.stat().st_size
    parts.put(write_s=round(time.perf_counter() - started, 1), gguf=str(model.gguf), gguf_bytes=size,
              shape={**SHAPE, "num_layers": config.num_layers} if not args.cpu_dry_run else "tiny default",
              params_approx=size // 4)


def _deploy_cell(name: str, gguf: Path, cpus: int, gpus: int, params: str) -> str:
    return (f"%%byzer_deploy\n--pretrained_model_type custom/auto --infer_backend llama_cpp\n"
            f"--model_path {gguf} --cpus_per_worker {cpus} --gpus_per_worker {gpus}\n"
            f"--infer_params {params}\n--model {name}\n")


def _which_llama() -> str:
    """The llama_cpp workers import (PYTHONPATH puts the CUDA build first) and whether it can offload.

    Asked of a child process: loaded into this driver, the CUDA build's libraries and torch's (which
    the magics import after it) abort the process with "free(): invalid pointer".
    """
    import subprocess

    code = ("import llama_cpp; print(llama_cpp.__version__, 'gpu_offload=' + "
            "str(llama_cpp.llama_supports_gpu_offload()), llama_cpp.__file__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or f"does not import: {done.stderr.strip()[-300:]}"


def run_side(args: argparse.Namespace, parts: Parts, side: str) -> None:
    """One deployment of the GGUF on `side` (gpu or cpu), through the magics as a user would drive them."""
    from IPython.core.interactiveshell import InteractiveShell

    gguf = gguf_path(Path(args.model))
    name = f"llama_{side}"
    common = "n_ctx=2048 temperature=0 verbose=false"
    if side == "gpu":
        cpus, gpus, params = 1, 0 if args.cpu_dry_run else 1, f"n_gpu_layers=-1 {common}"
    else:
        cpus, gpus, params = args.threads, 0, f"n_gpu_layers=0 n_threads={args.threads} {common}"
    parts.put(llama_cpp_in_driver=_which_llama(), deploy=f"cpus={cpus} gpus={gpus} {params}",
              gpu_mib_before=_gpu_memory_mib())
    shell = InteractiveShell.instance()
    _cell(shell, "%load_ext byzer_magic")
    took, seen = _cell(shell, _deploy_cell(name, gguf, cpus, gpus, params))
    parts.put(deploy_to_ready_s=round(took, 2), deploy_output=seen[-500:])
    _, seen = _cell(shell, f"%byzer_chat {name} --max_tokens 16 --temperature 0 hello there")
    parts.put(chat_output=seen[-300:], gpu_mib_deployed=_gpu_memory_mib())
    rows: list[Any] = []
    for level in LEVELS:
        # one level per %byzer_bench (each opens with its own unmeasured request, as one call's levels do),
        # so a step cut off at its cap still reports the levels it finished
        shell.user_ns.pop("bench_rows", None)
        took, seen = _cell(shell, f"%byzer_bench {name} --concurrency {level} {BENCH} -o bench_rows")
        found = shell.user_ns.get("bench_rows")
        rows += found.to_dict(orient="records") if found is not None else [seen[-800:]]
        parts.put(**{f"bench_s_{level}": round(took, 1)}, bench=rows, gpu_mib_after_bench=_gpu_memory_mib())
    _, seen = _cell(shell, f"%byzer_undeploy {name}")
    time.sleep(5)
    parts.put(undeploy_output=seen[-300:], gpu_mib_after_undeploy=_gpu_memory_mib())


def merge(folder: Path) -> dict[str, Any]:
    build, model, gpu, cpu = (_read(folder, step) for step in ("build", "model", "gpu", "cpu"))
    by_level = {side: {row["concurrency"]: row for row in data.get("bench") or [] if isinstance(row, dict)}
                for side, data in (("gpu", gpu), ("cpu", cpu))}
    levels = []
    for c in sorted(set(by_level["gpu"]) | set(by_level["cpu"])):
        g, k = by_level["gpu"].get(c, {}), by_level["cpu"].get(c, {})
        row: dict[str, Any] = {"concurrency": c}
        for key in ("output_tokens_per_s", "mean_output_tokens", "ttft_p50_ms", "itl_p50_ms", "e2e_p50_ms", "errors"):
            row[f"gpu_{key}"], row[f"cpu_{key}"] = g.get(key), k.get(key)
        if g.get("output_tokens_per_s") and k.get("output_tokens_per_s"):
            row["tok_s_ratio_gpu_over_cpu"] = round(g["output_tokens_per_s"] / k["output_tokens_per_s"], 2)
        levels.append(row)
    result = {
        "build": {k: build.get(k) for k in ("ok", "rc", "seconds", "jobs", "nvcc", "scikit_build_core",
                                            "ninja_progress", "import_check", "cmake_args")},
        "model": model, "same_build_both_sides": "the CPU side is the CUDA build with n_gpu_layers=0",
        "levels": levels,
        "gpu": {k: v for k, v in gpu.items() if k != "bench"}, "cpu": {k: v for k, v in cpu.items() if k != "bench"},
    }
    (folder / "llama_results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["model", "gpu", "cpu", "merge"])
    parser.add_argument("--parts", type=Path, default=Path("/tmp/llama_parts"))
    parser.add_argument("--model", default="/tmp/llama_1b", help="the folder the model is written to")
    parser.add_argument("--layers", type=int, default=int(os.environ.get("LAYERS", 16)))
    parser.add_argument("--threads", type=int, default=16, help="CPU threads (and Ray CPUs) of the CPU side")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model, no GPU asked for")
    args = parser.parse_args()
    if args.step == "merge":
        print(json.dumps(merge(args.parts), indent=1))
        return
    parts = Parts(args.parts, args.step)
    reported(parts, lambda: write_model(args, parts) if args.step == "model" else run_side(args, parts, args.step))


if __name__ == "__main__":
    main()
