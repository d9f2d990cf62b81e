"""A transformers model wrapped by `deepspeed.init_inference`.

Loading, chat, streaming and embeddings are the transformers backend's; this
module only hands the loaded model to DeepSpeed. DeepSpeed picks its
accelerator itself: CUDA where there is one, else its CPU accelerator, where
kernel injection does not exist. One worker is one process, so DeepSpeed's
tensor parallelism (one process per GPU) is not offered.

Kernel injection is off unless asked for: on an H100 with DeepSpeed 0.19.8 and
transformers 5.17 the injected Llama kernels built and loaded, then failed to
generate ('tuple' object has no attribute 'size'); the warm-up generate turns
such a mismatch into a failed deploy with that reason.
"""
from __future__ import annotations

import os
import re
from typing import Any

from pydantic import Field

from . import hf
from .base import GpuRule


class Settings(hf.Settings):
    """`backend.*` keys: the transformers ones, plus DeepSpeed's kernel injection."""

    replace_with_kernel_inject: bool = Field(
        default=False, description="DeepSpeed's fused inference kernels; needs a CUDA GPU and a DeepSpeed that knows the model"
    )


class Backend(hf.Backend):
    """The transformers backend, with the model passed through DeepSpeed's inference engine."""

    name = "deepspeed"
    Settings = Settings
    library = "deepspeed"
    extra = "deepspeed"
    tasks = frozenset({"chat"})
    serves_model_types = False
    gpu_rule = GpuRule(
        whole_above_one=True, most=1,
        why_most="a deepspeed worker is one process on one GPU, and DeepSpeed's tensor parallelism needs one "
                 "process per GPU; use --gpus_per_worker 1 with more --num_workers, or --infer_backend vllm, "
                 "which shards one model over several GPUs",
    )

    def _prepare(self, model: Any) -> Any:
        import deepspeed
        import torch
        from deepspeed.accelerator import get_accelerator

        on_cpu = get_accelerator().device_name() == "cpu"
        inject = self._settings.replace_with_kernel_inject
        if inject and on_cpu:
            raise ValueError(
                "backend.replace_with_kernel_inject=true needs a CUDA GPU, and DeepSpeed found none on this "
                "worker (it runs on its CPU accelerator); leave the key out or set it to false"
            )
        if inject and not re.fullmatch(r"[\d.;+ PTX]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "x")):
            # DeepSpeed's JIT build reads the arch list as numbers: "9.0a" (what an H100 image sets) stops it.
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        dtype = model.dtype if self._settings.dtype == "auto" else getattr(torch, self._settings.dtype)
        engine = deepspeed.init_inference(
            model, dtype=dtype, replace_with_kernel_inject=inject, tensor_parallel={"tp_size": 1}
        )
        return engine.module
