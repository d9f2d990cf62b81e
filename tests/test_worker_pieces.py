"""How a worker packs an answer's pieces into messages, and how a vLLM worker sizes its engine.

No Ray and no engine: the worker's chat loop runs over a backend that yields
a known answer, with the worker's own request log set to the load it would
see; the vLLM backend's engine arguments and its reading of an engine's log
are plain functions of their inputs.
"""
from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

import pytest

from byzer_magic.backends import vllm as vllm_backend
from byzer_magic.backends.base import Backend, BackendSettings, Context, Delta, GenParams
from byzer_magic.serving.metrics import RequestLog
from byzer_magic.serving.worker import STREAMS_PER_TOKEN, Worker, hide_gpus_unless_given

PIECES = 40


class Counting(Backend):
    """A backend that answers PIECES one-token pieces, then a text-less tail with usage."""

    name = "counting"
    Settings = BackendSettings
    library = "asyncio"

    async def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        for i in range(PIECES):
            yield Delta(f"t{i} ", token_ids=(i,))
            await asyncio.sleep(0)
        yield Delta("", "length", {"prompt_tokens": 3, "completion_tokens": PIECES, "total_tokens": PIECES + 3})

    def chat(self, messages, gen: GenParams) -> AsyncIterator[Delta]:
        return self.generate("", gen)

class Bare(Worker):
    """The worker's chat loop without Serve: nothing to shut down."""

    def __del__(self) -> None:
        pass


def messages_with(other_streams: int) -> list[Delta]:
    worker = Bare.__new__(Bare)
    worker._backend, worker._log = Counting(BackendSettings(), Context("bare")), RequestLog()
    worker._where = ("bare", "replica")
    worker._log.in_flight = other_streams

    async def collect() -> list[Delta]:
        return [delta async for delta in worker.chat("go", GenParams())]

    return asyncio.run(collect())


@pytest.mark.parametrize("other_streams", [0, 7, STREAMS_PER_TOKEN * 2 - 2])
def test_a_worker_with_few_streams_sends_every_piece_at_once(other_streams):
    sent = messages_with(other_streams)
    assert [d.token_ids for d in sent[:-1]] == [(i,) for i in range(PIECES)]
    tail = sent[-1]
    assert (tail.text, tail.token_ids, tail.finish_reason) == ("", (), "length"), "the tail comes after the last piece"
    assert tail.usage["completion_tokens"] == PIECES


@pytest.mark.parametrize("other_streams,per_message", [(63, 4), (255, 16)])
def test_a_busy_worker_sends_the_first_piece_alone_then_several_per_message(other_streams, per_message):
    sent = messages_with(other_streams)
    assert sent[0].token_ids == (0,), "the first piece must never wait"
    assert all(len(d.token_ids) == per_message for d in sent[1:-1])
    assert len(sent) == 1 + -(-(PIECES - 1) // per_message)
    assert "".join(d.text for d in sent) == "".join(f"t{i} " for i in range(PIECES))
    assert [i for d in sent for i in d.token_ids] == list(range(PIECES))
    assert sent[-1].finish_reason == "length" and sent[-1].usage["total_tokens"] == PIECES + 3


def backend(gpus: float, **keys) -> vllm_backend.Backend:
    return vllm_backend.Backend(vllm_backend.Settings(**keys), Context("v", model_path="/m", gpus=gpus))


def test_a_cpu_worker_sizes_its_kv_cache_to_the_memory_it_has_unless_told():
    args = backend(0).engine_args()
    assert 256 << 20 <= args["kv_cache_memory_bytes"] <= 4 << 30
    assert "gpu_memory_utilization" not in args
    told = backend(0, kv_cache_memory_bytes=1 << 28).engine_args()
    assert told["kv_cache_memory_bytes"] == 1 << 28
    assert backend(0, gpu_memory_utilization=0.5).engine_args()["gpu_memory_utilization"] == 0.5


def test_gpu_workers_take_their_share_or_shard_over_whole_gpus():
    assert backend(0.5).engine_args()["gpu_memory_utilization"] == 0.45
    assert backend(0.5, gpu_memory_utilization=0.3).engine_args()["gpu_memory_utilization"] == 0.3
    whole = backend(1).engine_args()
    assert whole["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in whole
    sharded = backend(2).engine_args()
    assert sharded["tensor_parallel_size"] == 2 and sharded["distributed_executor_backend"] == "mp"
    assert backend(2, distributed_executor_backend="ray").engine_args()["distributed_executor_backend"] == "ray"


ENGINE_LOG = """\
INFO 11-25 19:20:01 [core.py:90] Initializing a V1 LLM engine
(EngineCore_DP0 pid=881) ERROR 11-25 19:20:09 [core.py:708] EngineCore failed to start.
(EngineCore_DP0 pid=881) Traceback (most recent call last):
(EngineCore_DP0 pid=881)   File "vllm/v1/core/kv_cache_utils.py", line 700, in check_enough_kv_cache_memory
(EngineCore_DP0 pid=881) ValueError: To serve at least one request with the model's max seq len (8192), (1.0 GiB KV cache is needed, which is larger than the available KV cache memory (0.17 GiB).
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_a_worker_given_no_gpu_sees_none_and_one_given_gpus_keeps_what_ray_set(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    hide_gpus_unless_given(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    hide_gpus_unless_given(0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_the_engines_own_reason_is_read_from_the_log_it_wrote_since_the_start(tmp_path):
    log = tmp_path / "worker.err"
    log.write_text("ValueError: an old failure of an earlier engine\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write(ENGINE_LOG)
    cause = vllm_backend.engine_root_cause(str(log), start)
    assert cause.startswith("ValueError: To serve at least one request with the model's max seq len (8192)")
    assert vllm_backend.engine_root_cause(str(log), log.stat().st_size) is None
    assert vllm_backend.engine_root_cause(None, 0) is None
