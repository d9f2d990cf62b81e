"""Local backends side by side on the tiny Llama: tokens/s, memory per worker, magic to ready.

    python benchmarks/bench_backends.py [--tokens 64] [--levels 1,8,32] [--backends vllm,transformers,llama_cpp]

One worker of each backend (1 CPU each) serves the project's tiny random
Llama; for 1, 8 and 32 concurrent chats of `--tokens` greedy tokens each it
prints generated tokens per second, and vLLM's as a ratio to transformers',
the baseline measured in the same run. Memory is the resident set of the
worker's process and its children (vLLM's engine core lives in a child).
"Magic to ready" is parse + deploy of the cell text, on the running cluster.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from byzer_magic.serving import chat

from byzer_magic.serving import deploy  # noqa: E402
from byzer_magic.backends.base import GenParams  # noqa: E402
from byzer_magic.serving.cluster import connect  # noqa: E402
from byzer_magic.spec.deploy_spec import parse_spec  # noqa: E402
from byzer_magic.tinymodel import build  # noqa: E402

CELLS = {
    "vllm": "--infer_backend vllm --model_path {hf} --infer_params backend.dtype=float32 "
            "backend.max_model_len=1024 backend.kv_cache_memory_bytes=536870912",
    "transformers": "--infer_backend transformers --model_path {hf}",
    "deepspeed": "--infer_backend deepspeed --model_path {hf}",
    "llama_cpp": "--infer_backend llama_cpp --model_path {gguf} --infer_params n_ctx=2048 verbose=false",
}


def worker_memory_mib(name: str) -> float:
    """Resident memory of the worker's process and its children (this machine's processes only)."""
    import psutil

    async def pid() -> int:
        return (await chat._handle(name).stats.remote())["pid"]

    proc = psutil.Process(chat.run_on_client_loop(pid()))
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


async def _one(name: str, i: int, gen: GenParams) -> int:
    tokens = 0
    async for delta in chat.astream(name, [{"role": "user", "content": f"tell me about ray {i}"}], gen):
        if delta.text or delta.token_ids:
            tokens += len(delta.token_ids) or 1
    return tokens


async def tokens_per_second(name: str, clients: int, gen: GenParams) -> float:
    await _one(name, -1, GenParams(temperature=0, max_tokens=2))
    started = time.perf_counter()
    counts = await asyncio.gather(*(_one(name, i, gen) for i in range(clients)))
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--backends", default="vllm,transformers,llama_cpp")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    model = build(ROOT / ".cache" / "tinymodel")
    connect()
    gen = GenParams(temperature=0, max_tokens=args.tokens)
    results: dict[str, dict[int, float]] = {}
    for backend in args.backends.split(","):
        name = f"bench_{backend}"
        cell = CELLS[backend].format(hf=model.hf_dir, gguf=model.gguf)
        started = time.perf_counter()
        deploy.deploy(parse_spec(f"--pretrained_model_type custom/auto {cell} --cpus_per_worker 1 --model {name}"))
        ready = time.perf_counter() - started
        try:
            results[backend] = {c: chat.run_on_client_loop(tokens_per_second(name, c, gen)) for c in levels}
            memory = worker_memory_mib(name)
        finally:
            deploy.undeploy(name)
        rates = "  ".join(f"{c:>2} chats {results[backend][c]:8.0f} tok/s" for c in levels)
        print(f"{backend:12s} magic->ready {ready:5.1f} s  memory {memory:6.0f} MiB  {rates}", flush=True)
    if "vllm" in results and "transformers" in results:
        ratios = "  ".join(f"{c} chats {results['vllm'][c] / results['transformers'][c]:.2f}x" for c in levels)
        print(f"vllm / transformers (same run): {ratios}")


if __name__ == "__main__":
    main()
