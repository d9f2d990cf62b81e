"""The transformers and DeepSpeed backends on a CUDA GPU, with no Ray: for the lent GPU machine.

    python benchmarks/gpu_check.py MODEL_DIR

Builds nothing from a hub: MODEL_DIR is the tiny Llama from byzer_magic.tinymodel.
Greedy ids from each backend on cuda are compared with transformers' own
generate on the same device and dtype, and kernel injection is tried.
"""
from __future__ import annotations

import asyncio
import sys
import time


async def ids(backend, prompt) -> list[int]:
    from byzer_magic.backends.base import GenParams

    out: list[int] = []
    async for delta in backend.chat(prompt, GenParams(temperature=0, max_tokens=16)):
        out += delta.token_ids
    return out


async def main(path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from byzer_magic.backends import hf
    from byzer_magic.backends.base import Context

    prompt = [{"role": "user", "content": "hello there"}]
    print("cuda:", torch.cuda.get_device_name(0), flush=True)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).to("cuda")
    inputs = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True).to("cuda")
    reference = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0][inputs["input_ids"].shape[1]:].tolist()
    print("reference fp16 cuda:", reference, flush=True)
    context = Context("gpu_check", model_path=path, gpus=1)
    backend = hf.Backend(hf.Settings(dtype="float16"), context)
    await backend.start()
    got = await ids(backend, prompt)
    print("transformers backend:", backend.stats()["device"], got, "EQUAL" if got == reference else "DIFFERENT", flush=True)
    try:
        from byzer_magic.backends import deepspeed as ds
    except Exception as exc:  # noqa: BLE001
        print("deepspeed not importable:", exc)
        return
    for inject in (False, True):
        started = time.perf_counter()
        try:
            b = ds.Backend(ds.Settings(dtype="float16", replace_with_kernel_inject=inject), context)
            await b.start()
            got = await ids(b, prompt)
            print(f"deepspeed inject={inject}:", got, "EQUAL" if got == reference else "DIFFERENT",
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"deepspeed inject={inject} failed: {type(exc).__name__}: {str(exc)[:600]}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
