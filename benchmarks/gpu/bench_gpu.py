"""The guide's vLLM deployment on a GPU, side by side with vLLM alone, `vllm serve` and Ray Serve LLM.

    python benchmarks/gpu/bench_gpu.py STEP --parts DIR [--model DIR] [--levels 1,16,64,256] [--tokens 128]

Steps, each in its own process so each one's GPU memory is given back before
the next (run.sh runs them in order and merges):
  model        write a Llama-3-8B-shaped model directory: config, an offline
               word-level tokenizer of 128,256 entries and a chat template
               (weights are random: every engine loads with load_format=dummy)
  direct       vLLM's AsyncLLM alone in this process: the limit
  magics       the byzer_magic deployment driven through the magics in an
               IPython shell, as a user would: %%byzer_deploy (timed to ready),
               %byzer_chat, %byzer_status, the load through the handle,
               %byzer_serve and the load through the endpoint, the openai
               client, %byzer_scale to 0 and back, %byzer_undeploy, GPU memory
  vllm_serve   `vllm serve` on the same engine arguments, the load over HTTP
  ray_llm      Ray Serve LLM's build_openai_app on the same model, if it imports
  local        transformers (bf16 on cuda) and DeepSpeed without kernel injection
               through the magics on a ~1B Llama shape written by the project's
               generator: deploy, chat, %byzer_bench, undeploy, GPU memory
  merge        parts -> results.json (keys another run measured are kept)
  merge_sections  the runs made apart from the one-GPU side by side (two GPUs, Ray Serve
               LLM beside a baseline of its own run, transformers/DeepSpeed, llama.cpp) ->
               their own keys of results.json
For two GPUs (run.sh with NUM_GPUS=2): `direct --engine tensor_parallel_size=2`,
`magics --gpus 2` and `magics --gpus 1 --workers 2 --no-endpoint`, each with its
own --tag so their parts do not overwrite one another.
Each step writes DIR/STEP.json as soon as it has figures, so a run cut short
still reports what it measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import load  # noqa: E402

ENGINE: dict[str, Any] = {"dtype": "bfloat16", "gpu_memory_utilization": 0.85, "max_model_len": 2048,
                          "enforce_eager": True, "load_format": "dummy"}
WORDS = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NAME = "llama3_8b_chat"


def prompt_of(prompt_tokens: int) -> Callable[[int], str]:
    """About `prompt_tokens` words, each one token of the word-level tokenizer, distinct per request."""
    return lambda i: " ".join([f"w{i}"] + [WORDS[(i + k) % len(WORDS)] for k in range(prompt_tokens - 6)])


def write_model(out: Path, tiny: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab_size = 512 if tiny else 128256
    shape = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2) if tiny else
             dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, rope_theta=500000.0))
    LlamaConfig(vocab_size=vocab_size, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                torch_dtype="bfloat16", **shape).save_pretrained(out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|user|>": 3, "<|assistant|>": 4, "<|system|>": 5}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _typed(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value, value)


def engine_args(overrides: str) -> dict[str, Any]:
    """ENGINE with `k=v,...` over it; `k=` drops k (a CPU dry run drops gpu_memory_utilization)."""
    args = dict(ENGINE)
    for pair in filter(None, overrides.split(",")):
        key, value = pair.split("=", 1)
        if value:
            args[key] = _typed(value)
        else:
            args.pop(key, None)
    return args


class Parts:
    """DIR/STEP.json, rewritten whenever a step learns something."""

    def __init__(self, folder: Path, step: str):
        self.path = folder / f"{step}.json"
        self.data: dict[str, Any] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, **values: Any) -> None:
        self.data.update(values)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"[{self.path.stem}] {json.dumps(values)[:600]}", flush=True)


def reported(parts: Parts, step: Callable[[], None]) -> None:
    """Run a step; its failure goes into its parts and ends the process with 1, and the run goes on."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - a failed step reports and the run goes on
        parts.put(error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        raise SystemExit(1) from None


def run_direct(args: argparse.Namespace, parts: Parts) -> None:
    import vllm
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    parts.put(vllm=vllm.__version__)
    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=args.model, **args.engine),
                                       usage_context=UsageContext.OPENAI_API_SERVER)
    parts.put(engine_start_s=round(time.perf_counter() - started, 2))
    tokenizer = engine.get_tokenizer()
    prompts = prompt_of(args.prompt_tokens)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    async def path(i: int, tick: load.Tick) -> None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompts(i)}], tokenize=False,
                                             add_generation_prompt=True)
        seen = 0
        async for out in engine.generate(text, params, request_id=f"r{i}-{time.perf_counter_ns()}"):
            now = len(out.outputs[0].token_ids)
            tick(now - seen)
            seen = now

    async def main() -> None:
        for result in await load.levels(path, args.levels):
            parts.put(**{f"level_{result['concurrency']}": result})

    asyncio.run(main())
    engine.shutdown()


def _cell(shell: Any, source: str) -> tuple[float, str]:
    from IPython.utils.capture import capture_output

    started = time.perf_counter()
    with capture_output() as seen:
        shell.run_cell(source, store_history=False)
    took = time.perf_counter() - started
    out = (seen.stdout + seen.stderr).strip()
    print(f"--- {source.splitlines()[0][:80]} ({took:.1f} s)\n{out[-1200:]}", flush=True)
    return took, out


def _gpu_memory_each() -> list[int] | None:
    """GPU memory in use on each GPU, from nvidia-smi; None on a machine without one (a CPU dry run)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
    except FileNotFoundError:
        return None
    return [int(x) for x in out.split()] or None


def _gpu_memory_mib() -> int | None:
    """GPU memory in use on all GPUs together (one GPU: that one's)."""
    each = _gpu_memory_each()
    return sum(each) if each else None


def run_magics(args: argparse.Namespace, parts: Parts) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from byzer_magic.serving import chat
    from byzer_magic.backends.base import GenParams

    shell = InteractiveShell.instance()
    _cell(shell, "%load_ext byzer_magic")
    ready_s, seen = _cell(shell, _deploy_cell(NAME, args.model, args.gpus, args.engine, args.workers))
    parts.put(deploy_to_ready_s=round(ready_s, 2), deploy_cell_output=seen[-400:], workers=args.workers,
              gpus_per_worker=args.gpus)
    _, seen = _cell(shell, f"%byzer_chat {NAME} --max_tokens 16 --temperature 0 hello there")
    parts.put(chat_output=seen[-300:])
    _, seen = _cell(shell, f"%byzer_status {NAME}")
    parts.put(status_output=seen[-600:], gpu_mib_deployed=_gpu_memory_mib(), gpu_mib_each_deployed=_gpu_memory_each())

    prompts = prompt_of(args.prompt_tokens)
    gen = GenParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)

    async def handle_path(i: int, tick: load.Tick) -> None:
        async for delta in chat.astream(NAME, [{"role": "user", "content": prompts(i)}], gen):
            tick(len(delta.token_ids))

    async def handle_levels() -> list[dict[str, float]]:
        return await load.levels(handle_path, args.levels)

    for result in chat.run_on_client_loop(handle_levels(), timeout=1800):
        parts.put(**{f"deployment_level_{result['concurrency']}": result})
    if args.endpoint:
        _endpoint_levels(shell, args, parts, prompts)
    if not os.environ.get("SKIP_WALK"):
        _scale_walk(shell, parts)
    _cell(shell, f"%byzer_undeploy {NAME}")
    time.sleep(5)
    parts.put(gpu_mib_after_undeploy=_gpu_memory_mib(), gpu_mib_each_after_undeploy=_gpu_memory_each())


def _endpoint_levels(shell: Any, args: argparse.Namespace, parts: Parts, prompts: Callable[[int], str]) -> None:
    _cell(shell, "%byzer_serve --port 8011 --api_key bench-key")
    path, close = load.http_path("http://127.0.0.1:8011/v1", NAME, prompts, args.tokens, api_key="bench-key")

    async def endpoint_levels() -> list[dict[str, float]]:
        try:
            return await load.levels(path, args.levels)
        finally:
            await close()

    for result in asyncio.run(endpoint_levels()):
        parts.put(**{f"endpoint_level_{result['concurrency']}": result})
    parts.put(openai_client=_openai_chat("http://127.0.0.1:8011/v1", "bench-key"))
    _cell(shell, "%byzer_serve --stop")


def _openai_chat(base_url: str, key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key)
    pieces = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=8, temperature=0, stream=True)
    return "".join((c.choices[0].delta.content or "") for c in pieces if c.choices)


def _scale_walk(shell: Any, parts: Parts) -> None:
    took, seen = _cell(shell, f"%byzer_scale {NAME} 0")
    time.sleep(3)
    parts.put(scale_to_0_s=round(took, 2), scale_to_0_output=seen[-300:], gpu_mib_at_0=_gpu_memory_mib(),
              gpu_mib_each_at_0=_gpu_memory_each())
    took, seen = _cell(shell, f"%byzer_scale {NAME} 1")
    parts.put(scale_to_1_s=round(took, 2), scale_to_1_output=seen[-300:])
    _, seen = _cell(shell, f"%byzer_chat {NAME} --max_tokens 8 --temperature 0 back again")
    parts.put(chat_after_scale=seen[-200:])


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def _http_levels(args: argparse.Namespace, parts: Parts, base_url: str, model: str) -> None:
    path, close = load.http_path(base_url, model, prompt_of(args.prompt_tokens), args.tokens)

    async def main() -> list[dict[str, float]]:
        try:
            return await load.levels(path, args.levels)
        finally:
            await close()

    for result in asyncio.run(main()):
        parts.put(**{f"level_{result['concurrency']}": result})


def run_vllm_serve(args: argparse.Namespace, parts: Parts) -> None:
    flags = []
    for key, value in args.engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
                             "--served-model-name", NAME, "--host", "127.0.0.1", "--port", "8012", *flags])
    try:
        _wait_http("http://127.0.0.1:8012/health", 600, proc)
        parts.put(ready_s=round(time.perf_counter() - started, 2))
        _http_levels(args, parts, "http://127.0.0.1:8012/v1", NAME)
    finally:
        proc.terminate()
        proc.wait(60)


def _lists_model(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return NAME in resp.read().decode()
    except OSError:
        return False


def run_ray_llm(args: argparse.Namespace, parts: Parts) -> None:
    try:
        import ray
        from ray import serve
        from ray.serve.llm import LLMConfig, build_openai_app
    except Exception as exc:  # noqa: BLE001 - what failed is the finding
        parts.put(error=f"ray.serve.llm does not import here: {type(exc).__name__}: {exc}")
        return
    config = LLMConfig(model_loading_config={"model_id": NAME, "model_source": args.model},
                       engine_kwargs=dict(args.engine),
                       deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
                       accelerator_type=None)
    parts.put(ray=ray.__version__)
    serve.start(http_options={"host": "127.0.0.1", "port": 8013})
    started = time.perf_counter()
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    deadline = time.monotonic() + 300
    while not _lists_model("http://127.0.0.1:8013/v1/models"):
        if time.monotonic() > deadline:
            raise TimeoutError("Ray Serve LLM's /v1/models did not list the model in 300 s")
        time.sleep(0.5)
    parts.put(ready_s=round(time.perf_counter() - started, 2))
    _http_levels(args, parts, "http://127.0.0.1:8013/v1", NAME)
    serve.shutdown()


def _deploy_cell(name: str, model: str, gpus: str, engine: dict[str, Any], workers: int = 1,
                 backend: str = "vllm", model_type: str = "custom/auto") -> str:
    params = " ".join(f"backend.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in engine.items())
    return (f"%%byzer_deploy\n--pretrained_model_type {model_type} --infer_backend {backend} --model_path {model}\n"
            f"--num_workers {workers} --cpus_per_worker 1 --gpus_per_worker {gpus}\n--infer_params {params}\n"
            f"--model {name}\n")


def _mismatched_model(tiny: Path, out: Path) -> Path:
    """The tiny model's weights under a config that says they are twice as wide."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["hidden_size"] *= 2
    config["intermediate_size"] *= 2
    (out / "config.json").write_text(json.dumps(config))
    return out


def run_checks(args: argparse.Namespace, parts: Parts) -> None:
    """Two deployments sharing the GPU, then bad input: each one sentence, nothing left, memory back."""
    from IPython.core.interactiveshell import InteractiveShell

    from byzer_magic.tinymodel import build

    tiny = Path(build(Path("/tmp/tinymodel")).hf_dir)
    shell = InteractiveShell.instance()
    _cell(shell, "%load_ext byzer_magic")
    half = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 512}
    for name in ("half_a", "half_b"):
        took, seen = _cell(shell, _deploy_cell(name, str(tiny), "0.5", {**half, "gpu_memory_utilization": 0.4}))
        parts.put(**{f"share_{name}_s": round(took, 1), f"share_{name}_output": seen[-300:]})
    for name in ("half_a", "half_b"):
        _, seen = _cell(shell, f"%byzer_chat {name} --max_tokens 8 --temperature 0 hello")
        parts.put(**{f"share_{name}_chat": seen[-200:]})
    _, seen = _cell(shell, "%byzer_list")
    parts.put(share_list=seen[-600:], share_gpu_mib=_gpu_memory_mib())
    _cell(shell, "%byzer_undeploy half_b")
    bad = {
        "util_beside_another": _deploy_cell("too_big", str(tiny), "0.5", {**half, "gpu_memory_utilization": 0.9}),
        "two_gpus_on_one": _deploy_cell("two_gpus", str(tiny), "2", half),
        "max_model_len_over_kv": _deploy_cell("long_ctx", args.model, "0.5",
                                              {**ENGINE, "gpu_memory_utilization": 0.22, "max_model_len": 8192}),
        "weights_not_config": _deploy_cell("mismatch", str(_mismatched_model(tiny, Path("/tmp/mismatch"))), "0.5",
                                           {**half, "gpu_memory_utilization": 0.3}),
    }
    for case, cell in bad.items():
        took, seen = _cell(shell, cell)
        _, listed = _cell(shell, "%byzer_list")
        parts.put(**{f"bad_{case}": {"seconds": round(took, 1), "output": seen[-500:], "list_after": listed[-300:],
                                     "gpu_mib_after": _gpu_memory_mib()}})
    _cell(shell, "%byzer_undeploy half_a")
    time.sleep(5)
    parts.put(checks_gpu_mib_end=_gpu_memory_mib())


LOCAL_SHAPE = dict(hidden_size=2048, num_heads=16, num_kv_heads=16, num_layers=16, intermediate_size=5632)
"""About 0.9B parameters: big enough that a GPU's speed shows, quick to write (f32, about 3.6 GB twice)."""


def run_local(args: argparse.Namespace, parts: Parts) -> None:
    """transformers and DeepSpeed on the GPU through the magics, one after the other, each given back."""
    from IPython.core.interactiveshell import InteractiveShell

    from byzer_magic.tinymodel import TinyConfig, build

    started = time.perf_counter()
    shape = {} if args.tiny else LOCAL_SHAPE
    model = build(Path(args.local_model), TinyConfig(**shape))
    parts.put(local_model=shape, local_model_write_s=round(time.perf_counter() - started, 1))
    shell = InteractiveShell.instance()
    _cell(shell, "%load_ext byzer_magic")
    for backend in ("transformers", "deepspeed"):
        name = f"{backend}_gpu"
        took, seen = _cell(shell, _deploy_cell(name, str(model.hf_dir), args.gpus, {"dtype": "bfloat16"},
                                               backend=backend, model_type="llama2"))
        found = {"deploy_to_ready_s": round(took, 1), "deploy_output": seen[-300:]}
        found["chat"] = _cell(shell, f"%byzer_chat {name} --max_tokens 16 --temperature 0 hello there")[1][-200:]
        found["gpu_mib_deployed"] = _gpu_memory_mib()
        _cell(shell, f"%byzer_bench {name} --concurrency 1,2 --requests 8 --max_tokens 64 --prompt_tokens 128 "
                     f"-o bench_rows")
        rows = shell.user_ns.get("bench_rows")
        found["bench"] = rows.to_dict(orient="records") if rows is not None else None
        _cell(shell, f"%byzer_undeploy {name}")
        time.sleep(3)
        found["gpu_mib_after_undeploy"] = _gpu_memory_mib()
        parts.put(**{backend: found})


SECTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "tp2": {"vllm_direct_tp2": ("direct_tp2", "level_"), "deployment_tp2": ("magics_tp2", "deployment_level_"),
            "endpoint_tp2": ("magics_tp2", "endpoint_level_"), "deployment_2x1": ("magics_2x1", "deployment_level_")},
    "ray_serve_llm_run": {"vllm_direct": ("direct_1gpu", "level_"), "deployment": ("magics", "deployment_level_"),
                          "endpoint": ("magics", "endpoint_level_"), "ray_serve_llm": ("ray_llm", "level_")},
}
"""Runs made apart from the one-GPU side by side: their levels, each compared with a baseline of the same run."""
WHOLE = {"local": "local", "llama_cpp": "llama_results"}
"""Steps whose parts go into results.json as they are: each compares within itself."""


SIDE_BY_SIDE = {"vllm_direct": ("direct", "level_"), "deployment": ("magics", "deployment_level_"),
                "endpoint": ("magics", "endpoint_level_"), "vllm_serve": ("vllm_serve", "level_"),
                "ray_serve_llm": ("ray_llm", "level_")}
"""The one-GPU side by side: results.json's own levels."""


def _read(folder: Path, step: str) -> dict[str, Any]:
    path = folder / f"{step}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _levels(parts: dict[str, dict[str, Any]], sources: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per concurrency: each source's tokens/s and latencies, null where it has no such level."""
    concurrencies = sorted({int(k.rsplit("_", 1)[1]) for step, prefix in sources.values()
                            for k in parts[step] if k.startswith(prefix) and k.rsplit("_", 1)[1].isdigit()})
    rows = []
    for c in concurrencies:
        row: dict[str, Any] = {"concurrency": c}
        for name, (step, prefix) in sources.items():
            found = parts[step].get(f"{prefix}{c}")
            row[f"{name}_tok_s"] = round(found["tok_s"], 1) if found else None
            for q in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms"):
                row[f"{name}_{q}"] = round(found[q], 1) if found else None
        rows.append(row)
    return rows


def merge_sections(folder: Path, out: Path) -> dict[str, Any]:
    """SECTIONS and WHOLE whose runs left parts into results.json, beside (not over) the one-GPU side by side."""
    merged: dict[str, Any] = {}
    for section, sources in SECTIONS.items():
        parts = {step: _read(folder, step) for step in dict.fromkeys([*(step for step, _ in sources.values()), "env"])}
        if any(data for step, data in parts.items() if step != "env"):
            merged[section] = {
                **{k: parts["env"].get(k) for k in ("device", "vllm", "ray")},
                "levels": _levels(parts, sources),
                "steps": {step: {k: v for k, v in data.items() if "level_" not in k}
                          for step, data in parts.items() if step != "env"},
            }
    merged.update({key: data for key, step in WHOLE.items() if (data := _read(folder, step))})
    if merged:
        result = json.loads(out.read_text()) if out.exists() else {}
        result.update(merged)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return merged


def merge(folder: Path, out: Path) -> dict[str, Any]:
    """The one-GPU side by side into results.json, keeping what SECTIONS and WHOLE hold there."""
    parts = {step: _read(folder, step)
             for step in dict.fromkeys([*(step for step, _ in SIDE_BY_SIDE.values()), "checks", "env"])}
    direct, magics, env = parts["direct"], parts["magics"], parts["env"]
    if not (direct or magics):
        return {}
    result = {
        "device": env.get("device"), "model": env.get("model"), "vllm": direct.get("vllm") or env.get("vllm"),
        "ray": env.get("ray"), "deploy_to_ready_s": magics.get("deploy_to_ready_s"),
        "vllm_engine_start_s": direct.get("engine_start_s"), "vllm_serve_ready_s": parts["vllm_serve"].get("ready_s"),
        "ray_serve_llm_error": parts["ray_llm"].get("error"), "levels": _levels(parts, SIDE_BY_SIDE),
        "magics": {k: v for k, v in magics.items() if not k.startswith(("deployment_level_", "endpoint_level_"))},
        "checks": parts["checks"],
    }
    if out.exists():
        kept = json.loads(out.read_text())
        result.update({key: kept[key] for key in [*SECTIONS, *WHOLE] if key in kept})
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["model", "direct", "magics", "checks", "vllm_serve", "ray_llm", "local",
                                         "merge", "merge_sections"])
    parser.add_argument("--tag", default="", help="parts file name, when one step runs twice (direct_tp2)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-endpoint", dest="endpoint", action="store_false",
                        help="magics: measure the handle only")
    parser.add_argument("--local_model", default="/tmp/llama1b")
    parser.add_argument("--parts", type=Path, default=Path("/tmp/bench_parts"))
    parser.add_argument("--model", default="/tmp/llama3_8b")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a dry run on a CPU")
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--gpus", default="1")
    parser.add_argument("--engine", default="", help="k=v,... over the default engine arguments")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.engine = engine_args(args.engine)
    if args.step == "model":
        write_model(Path(args.model), args.tiny)
        return
    if args.step == "merge":
        print(json.dumps(merge(args.parts, args.out), indent=1))
        return
    if args.step == "merge_sections":
        print(json.dumps(merge_sections(args.parts, args.out), indent=1))
        return
    steps = {"direct": run_direct, "magics": run_magics, "checks": run_checks, "vllm_serve": run_vllm_serve,
             "ray_llm": run_ray_llm, "local": run_local}
    parts = Parts(args.parts, args.tag or args.step)
    reported(parts, lambda: steps[args.step](args, parts))


if __name__ == "__main__":
    main()
