"""A transformers model wrapped by `deepspeed.init_inference`.

Loading, chat, streaming and embeddings are the transformers backend's; this
module only hands the loaded model to DeepSpeed. DeepSpeed picks its
accelerator itself: CUDA where there is one, else its CPU accelerator, where
kernel injection does not exist. One worker is one process, so DeepSpeed's
tensor parallelism (one process per GPU) is not offered.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from . import hf



class Settings(hf.Settings):
    """`backend.*` keys: the transformers ones, plus DeepSpeed's kernel injection."""

    replace_with_kernel_inject: bool | None = Field(
        default=None, description="DeepSpeed's fused inference kernels; default: on with a CUDA GPU, off on CPU"
    )


class Backend(hf.Backend):
    """The transformers backend, with the model passed through DeepSpeed's inference engine."""

    library = "deepspeed"

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
        dtype = model.dtype if self._settings.dtype == "auto" else getattr(torch, self._settings.dtype)
        engine = deepspeed.init_inference(
            model,
            dtype=dtype,
            replace_with_kernel_inject=bool(inject if inject is not None else not on_cpu),
            tensor_parallel={"tp_size": 1},
        )
        return engine.module
