"""The OpenAI-compatible endpoint, driven by the official openai client over real HTTP.

Behind it: a SaaS deployment (llama.cpp's server as the provider) and a
llama_cpp deployment of the tiny GGUF, on the test session's Ray cluster.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import sys
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest

from byzer_magic.serving import chat, deploy, raydoor

from byzer_magic.openai import gateway
from byzer_magic.backends.base import GenParams
from byzer_magic.openai.key_store import endpoint_key
from byzer_magic.errors import DeployError
from byzer_magic.spec.deploy_spec import parse_spec

from .conftest import ROOT, alive_replicas, free_port
from .support import clients
from .test_deploy_saas import saas_spec
from .test_llama_cpp import llama_spec

KEY = "gw-test-key-0123456789abcdef"
HELLO = [{"role": "user", "content": "Hello there, what is ray?"}]


@pytest.fixture(scope="module")
def served(ray_head, openai_server, tiny_model):
    """Deployments of different backends behind one endpoint with an API key.

    ep_tools is a SaaS deployment of the provider's tool-capable model;
    ep_llama_tools a llama.cpp one with the chat format that answers tools.
    """
    deploy.deploy(saas_spec(openai_server, "ep_saas", workers=1))
    deploy.deploy(llama_spec(tiny_model.gguf, "ep_llama"))
    deploy.deploy(saas_spec(openai_server, "ep_tools", workers=1, model="tiny-tools"))
    deploy.deploy(llama_spec(tiny_model.gguf, "ep_llama_tools", "chat_format=chatml-function-calling"))
    port = free_port()
    up = gateway.start("127.0.0.1", port, KEY)
    assert up.state == "running" and up.auth and up.url == f"http://127.0.0.1:{port}/v1"
    yield up
    gateway.stop()
    for name in ("ep_saas", "ep_llama", "ep_tools", "ep_llama_tools"):
        deploy.undeploy(name)
    assert alive_replicas(gateway.GATEWAY_APP) == []


@pytest.fixture(scope="module")
def direct_llama(tiny_model):
    """The tiny GGUF in this process, as ep_llama loads it: the reference for token counts."""
    from llama_cpp import Llama

    return Llama(str(tiny_model.gguf), n_ctx=512, verbose=False)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url, api_key=KEY, max_retries=0, timeout=60)


def http(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_models_lists_every_deployment_with_its_backend(client):
    cards = {m.id: m for m in client.models.list()}
    assert {"ep_saas", "ep_llama"} <= set(cards)
    assert cards["ep_saas"].backend == "saas" and cards["ep_llama"].backend == "llama_cpp"
    assert cards["ep_llama"].owned_by == "byzer_magic" and cards["ep_llama"].created > 0
    assert client.models.retrieve("ep_saas").id == "ep_saas"
    assert gateway.GATEWAY_APP not in cards
    # What clients ask before they send: the context (as llama.cpp sized it) and what the deployment takes.
    assert cards["ep_llama"].max_model_len == 512 and cards["ep_saas"].max_model_len is None
    for card in (cards["ep_llama"], cards["ep_saas"]):
        assert card.capabilities["chat"] and not card.capabilities["embeddings"]
        assert {"tools", "structured_output"} <= set(card.capabilities)


@pytest.mark.parametrize("name", ["ep_saas", "ep_llama"])
def test_chat_whole_and_streamed_match_the_handle(client, name, direct_llama):
    direct = chat.chat(name, HELLO, GenParams(temperature=0, max_tokens=12))
    expected = direct.text
    whole = client.chat.completions.create(model=name, messages=HELLO, temperature=0, max_tokens=12)
    assert whole.choices[0].message.content == expected and expected
    assert whole.choices[0].finish_reason == "length" and whole.model == name
    chunks = list(client.chat.completions.create(model=name, messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    # include_usage: one last chunk with no choices and the usage; every other chunk has none.
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    counts = (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert counts == (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens)
    assert counts == (direct.usage["prompt_tokens"], direct.usage["completion_tokens"], direct.usage["total_tokens"])
    if name == "ep_llama":
        # llama.cpp's own count of the same chat, outside Ray: its tokenizer, its chat template.
        own = direct_llama.create_chat_completion(HELLO, temperature=0, max_tokens=12)["usage"]
        assert counts == (own["prompt_tokens"], own["completion_tokens"], own["total_tokens"]) and own["prompt_tokens"] > 5
    else:
        # llama.cpp's server reports no usage in its streams: zeros, present, as the README says.
        assert counts == (0, 0, 0)


def test_completions_continue_a_raw_prompt_not_a_chat(client):
    gen = GenParams(temperature=0, max_tokens=10)
    for name in ("ep_llama", "ep_saas"):
        expected = chat.ChatResult.of(chat.run_on_client_loop(chat.acomplete(name, "Ray is", gen))).text
        as_chat = chat.chat(name, "Ray is", gen).text
        assert expected and expected != as_chat
        whole = client.completions.create(model=name, prompt="Ray is", temperature=0, max_tokens=10)
        assert whole.choices[0].text == expected and whole.object == "text_completion"
        assert whole.choices[0].finish_reason == "length"
        streamed = list(client.completions.create(model=name, prompt="Ray is", temperature=0, max_tokens=10, stream=True))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected and len(streamed) > 1


def test_every_route_but_health_needs_the_key(served):
    base = served.url.removesuffix("/v1")
    assert http(f"{base}/health") == (200, {"status": "ok"})
    for key in (None, "wrong-key"):
        for path, body in (("/v1/models", None), ("/metrics", None), ("/openapi.json", None),
                           ("/v1/chat/completions", {"model": "ep_saas", "messages": HELLO})):
            status, answer = http(f"{base}{path}", body, key)
            assert status == 401, (path, key)
            assert answer["error"]["type"] == "authentication_error" and KEY not in json.dumps(answer)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()


def test_unknown_model_is_404_naming_what_is_deployed(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no_such_model", messages=HELLO)
    message = caught.value.body["message"]
    assert "no_such_model" in message and "ep_saas" in message and "ep_llama" in message
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no_such_model", messages=HELLO, stream=True)


@pytest.mark.parametrize("body, param", [
    ({"model": "ep_saas", "messages": HELLO, "temperature": 7}, "temperature"),
    ({"model": "ep_saas", "messages": []}, "messages"),
    ({"model": "ep_saas"}, "messages"),
    ({"model": "ep_saas", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "ep_saas", "messages": HELLO, "n": 3}, "n"),
    ({"model": "ep_llama", "messages": HELLO, "n": 3}, "n"),
    ({"model": "ep_llama", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": "ep_llama", "messages": HELLO, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"model": "ep_llama", "messages": HELLO, "logprobs": True}, "logprobs"),
    ({"model": "ep_llama", "messages": HELLO, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"model": "ep_llama", "messages": HELLO, "reasoning_effort": "high"}, "reasoning_effort"),
    ({"model": "ep_llama", "messages": HELLO, "logit_bias": {"99999": 5}}, "logit_bias"),
    ({"model": "ep_llama", "messages": HELLO, "logit_bias": {"ray": 5}}, "logit_bias"),
    ({"model": "ep_saas", "messages": HELLO, "web_search_options": {}}, "web_search_options"),
    ({"messages": HELLO}, "model"),
])
def test_bad_requests_are_400_naming_the_field(served, body, param):
    status, answer = http(f"{served.url}/chat/completions", body, KEY)
    assert status == 400
    assert answer["error"]["param"] == param and answer["error"]["message"].startswith(param)


def test_refusals_name_the_backend_and_reach_no_backend(client):
    async def served() -> int:
        return (await chat._handle("ep_llama").stats.remote())["served"]

    served_before = chat.run_on_client_loop(served())
    for fields, param in (({"n": 3}, "n"), ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
                          ({"logit_bias": {"512": 1}}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="ep_llama", messages=HELLO, **fields)
        message = caught.value.body["message"]
        assert caught.value.param == param and message.startswith(f"{param}: ") and "'ep_llama' (llama_cpp)" in message
    assert message == "logit_bias: token 512 is not in 'ep_llama' (llama_cpp)'s vocabulary (token ids 0 to 511)"
    assert chat.run_on_client_loop(served()) == served_before


def test_logit_bias_is_honoured_as_llama_cpp_honours_it(client, direct_llama):
    token = direct_llama.tokenize(b"ray", add_bos=False)[0]
    plain = direct_llama.create_chat_completion(HELLO, temperature=0, max_tokens=4)["choices"][0]["message"]["content"]
    biased = direct_llama.create_chat_completion(HELLO, temperature=0, max_tokens=4, logit_bias={token: 100})
    expected = biased["choices"][0]["message"]["content"]
    assert expected != plain
    whole = client.chat.completions.create(model="ep_llama", messages=HELLO, temperature=0, max_tokens=4,
                                           logit_bias={str(token): 100})
    assert whole.choices[0].message.content == expected


def test_a_prompt_over_the_context_is_a_400_at_once_with_both_numbers(client, direct_llama):
    long = [{"role": "user", "content": "ray " * 600}]
    with pytest.raises(ValueError, match=r"Requested tokens \((\d+)\)") as own:
        direct_llama.create_chat_completion(long, max_tokens=1)
    tokens = re.search(r"\((\d+)\)", str(own.value))[1]
    for stream in (False, True):
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="ep_llama", messages=long, stream=stream)
        assert time.monotonic() - started < 10
        assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
        assert caught.value.body["message"] == (f"the prompt is {tokens} tokens, and 'ep_llama' holds 512 tokens in its "
                                        f"context, answer included; shorten the prompt")


def test_max_tokens_left_out_is_what_the_context_has_left(client, direct_llama):
    def prompt_tokens(words: int) -> int:
        asked = [{"role": "user", "content": "ray " * words}]
        return direct_llama.create_chat_completion(asked, max_tokens=1)["usage"]["prompt_tokens"]

    words = 400 + (512 - 20 - prompt_tokens(400))  # about 20 tokens of the context left
    prompt = prompt_tokens(words)
    started = time.monotonic()
    whole = client.chat.completions.create(model="ep_llama", messages=[{"role": "user", "content": "ray " * words}])
    assert time.monotonic() - started < 30
    assert whole.usage.prompt_tokens == prompt and 505 > prompt > 480
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage.total_tokens <= 512
    if whole.choices[0].finish_reason == "length":  # llama.cpp may stop a few short of the end, holding back a split character
        assert whole.usage.total_tokens >= 508


def test_saas_passes_on_its_providers_usage(client, served):
    """A SaaS deployment whose provider is this endpoint (ep_llama behind it): one that does report usage."""
    spec = parse_spec(f"--pretrained_model_type saas/openai --infer_params saas.api_key={KEY} saas.model=ep_llama "
                      f"saas.base_url={served.url} --num_workers 1 --cpus_per_worker 0.001 --model ep_relay")
    deploy.deploy(spec)
    try:
        asked = dict(messages=HELLO, temperature=0, max_tokens=6)
        own = client.chat.completions.create(model="ep_llama", **asked).usage
        relayed = client.chat.completions.create(model="ep_relay", user="tester", **asked).usage
        assert (relayed.prompt_tokens, relayed.completion_tokens) == (own.prompt_tokens, own.completion_tokens)
        assert own.prompt_tokens > 5 and own.completion_tokens >= 6
        with pytest.raises(openai.BadRequestError, match=r"n: 'ep_relay' \(saas\) gives one choice"):
            client.chat.completions.create(model="ep_relay", n=2, **asked)
    finally:
        deploy.undeploy("ep_relay")


def test_not_json_and_unknown_routes_answer_in_the_openai_format(served):
    request = urllib.request.Request(f"{served.url}/chat/completions", b"{not json",
                                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400 and "not valid JSON" in json.loads(caught.value.read())["error"]["message"]
    status, answer = http(f"{served.url}/nothing/here", None, KEY)
    assert status == 404 and "error" in answer


def test_provider_failures_become_502_and_429_with_its_words(client, clean_server):
    clean_server.control(fail_next=1, fail_status=400)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="ep_saas", messages=HELLO, max_tokens=4)
    assert caught.value.status_code == 502 and "injected failure 400" in caught.value.message
    clean_server.control(fail_next=3, fail_status=429)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="ep_saas", messages=HELLO, max_tokens=4)
    assert "injected failure 429" in caught.value.message
    clean_server.control(fail_next=0)
    assert client.chat.completions.create(model="ep_saas", messages=HELLO, max_tokens=4).choices[0].message.content


def test_a_deployment_added_later_is_served_and_its_removal_is_seen_at_once(client, clean_server):
    deploy.deploy(saas_spec(clean_server, "ep_late", workers=1))
    try:
        assert "ep_late" in {m.id for m in client.models.list()}
        answer = client.chat.completions.create(model="ep_late", messages=HELLO, max_tokens=4)
        assert answer.choices[0].message.content
    finally:
        deploy.undeploy("ep_late")
    assert "ep_late" not in {m.id for m in client.models.list()}
    if raydoor.ray_version() < (2, 53):
        pytest.skip("before Ray 2.53 Serve does not tell a handle that its deployment was deleted, so a request to a "
                    "removed deployment waits instead of a 404 (README, Ray versions); the rest of this test ran")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ep_late", messages=HELLO, max_tokens=4)


def test_embeddings_refuse_a_text_model_plainly(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="ep_llama", input="hello")
    assert "does not embed" in caught.value.message


def test_metrics_count_requests_errors_and_latency_per_deployment(client, served):
    client.chat.completions.create(model="ep_saas", messages=HELLO, max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=HELLO)
    request = urllib.request.Request(served.url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    assert 'byzer_requests_total{model="ep_saas",route="chat",status="200"}' in text
    assert 'byzer_request_errors_total{model="-",route="chat",type="invalid_request_error"}' in text
    assert 'byzer_request_seconds_bucket{le="0.005",model="ep_saas",route="chat"}' in text

    def completion_tokens() -> float:
        text = urllib.request.urlopen(request, timeout=10).read().decode()
        found = re.search(r'^byzer_tokens_total\{kind="completion",model="ep_llama"\} (\S+)$', text, re.M)
        return float(found[1]) if found else 0.0

    before = completion_tokens()
    usage = client.chat.completions.create(model="ep_llama", messages=HELLO, max_tokens=5).usage
    assert usage.completion_tokens >= 5 and completion_tokens() - before == usage.completion_tokens


def test_a_taken_port_is_a_readable_error_and_leaves_nothing(served):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            with pytest.raises(DeployError) as caught:
                gateway.start("127.0.0.1", port, None)
            assert f"cannot listen on 127.0.0.1:{port}" in str(caught.value) and "--port" in str(caught.value)
            assert gateway.endpoint() is None
            assert alive_replicas(gateway.GATEWAY_APP) == []
        finally:
            gateway.start(served.host, served.port, KEY)


def test_cli_serve_and_stop(served, ray_head):
    port = free_port()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "byzer_magic.frontends.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    try:
        started = cli("serve", "--port", str(port))
        assert started.returncode == 0 and f"http://127.0.0.1:{port}/v1" in started.stdout
        assert endpoint_key() not in started.stdout + started.stderr
        assert http(f"http://127.0.0.1:{port}/v1/models")[0] == 401
        assert http(f"http://127.0.0.1:{port}/v1/models", key=endpoint_key())[0] == 200
        bad = cli("serve", "--prot", "9000")
        assert bad.returncode == 2 and "Did you mean --port?" in bad.stderr
        stopped = cli("serve", "--stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert gateway.endpoint() is None
    finally:
        gateway.start(served.host, served.port, KEY)


def test_a_plain_serve_is_closed_keeps_its_key_and_checks_the_host(served):
    """No key given: the user's own kept key is required; a second plain serve keeps the first; a foreign Host is refused."""
    port = free_port()
    try:
        first = gateway.start("127.0.0.1", port)
        assert first.auth and first.generated_key and endpoint_key() not in repr(first)
        url = f"http://127.0.0.1:{port}/v1/models"
        assert http(url)[0] == 401
        assert http(url, key=endpoint_key())[0] == 200
        replicas = sorted(a.actor_id for a in alive_replicas(gateway.GATEWAY_APP))
        again = gateway.start("127.0.0.1", port)
        assert again == first and sorted(a.actor_id for a in alive_replicas(gateway.GATEWAY_APP)) == replicas, \
            "a plain repeat must not replace it"
        rebound = urllib.request.Request(url, headers={"Host": "attacker.example", "Authorization": f"Bearer {endpoint_key()}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=30)
        assert refused.value.code == 400
        with pytest.raises(DeployError, match="open it to the network: add --force"):
            gateway.start("0.0.0.0", port)
        assert http(url, key=endpoint_key())[0] == 200
    finally:
        gateway.start(served.host, served.port, KEY)


def _gateway_processes() -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:byzer_openai" in " ".join(p.info["cmdline"] or [])]


def _gateway_rss_mib() -> float:
    found = _gateway_processes()
    assert len(found) == gateway.default_processes(), "the endpoint's processes, no more"
    return sum(p.memory_info().rss for p in found) / 2**20


def _counted(url: str, sample: str) -> float:
    request = urllib.request.Request(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(sample))


def test_its_processes_share_the_port_and_count_together(served):
    """Connections spread over every process of the endpoint, and /metrics on any one counts them all."""
    import socket
    import time

    held = [socket.create_connection((served.host, served.port), timeout=10) for _ in range(40)]
    try:
        time.sleep(0.5)
        taken = [sum(c.laddr.port == served.port and c.status == "ESTABLISHED" for c in p.net_connections())
                 for p in _gateway_processes()]
    finally:
        for sock in held:
            sock.close()
    assert len(taken) == gateway.default_processes() >= 2 and sum(taken) == 40 and min(taken) > 0, taken
    sample = 'byzer_requests_total{model="-",route="chat",status="404"}'
    before = _counted(served.url, sample)
    for i in range(40):  # urllib opens a new connection each time, which the kernel hands to any of them
        assert http(f"{served.url}/chat/completions", {"model": f"nobody_{i}", "messages": HELLO}, key=KEY)[0] == 404
    assert _counted(served.url, sample) - before == 40


def test_a_40_mib_body_is_refused_before_it_is_read(served):
    import socket
    import time

    before = _gateway_rss_mib()
    started = time.monotonic()
    with socket.create_connection((served.host, served.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 41943040\r\n\r\n")
        answer = b""
        while b"request_too_large" not in answer and (piece := sock.recv(65536)):
            answer += piece
        answer = answer.decode()
    took = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 413") and "request_too_large" in answer and took < 1.0, (answer[:200], took)
    assert _gateway_rss_mib() - before < 50


def test_unknown_and_oversized_model_names_leave_the_gateways_memory_flat(served):
    from concurrent.futures import ThreadPoolExecutor

    url = f"{served.url}/chat/completions"
    huge = http(url, {"model": "m" * 100_000, "messages": HELLO}, key=KEY)
    assert huge[0] == 400 and huge[1]["error"]["param"] == "model"
    http(url, {"model": "warm_up_unknown", "messages": HELLO}, key=KEY)
    before = _gateway_rss_mib()
    with ThreadPoolExecutor(16) as pool:
        codes = set(pool.map(lambda i: http(url, {"model": f"unknown_{i:05d}_" + "x" * 40, "messages": HELLO},
                                              key=KEY)[0], range(2000)))
    assert codes == {404}
    assert _gateway_rss_mib() - before < 20


def test_clients_that_give_up_while_queued_never_reach_the_provider(served, openai_server):
    """One request holds ep_saas's only worker; ten more queue behind it and hang up: none reaches the provider."""
    import socket
    import threading
    import time

    body = json.dumps({"model": "ep_saas", "messages": HELLO, "max_tokens": 2, "stream": True}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)
    openai_server.control(delay=2.0, reset=True)
    try:
        busy = threading.Thread(target=http, args=(f"{served.url}/chat/completions",
                                                   {"model": "ep_saas", "messages": HELLO, "max_tokens": 2}, KEY))
        busy.start()
        time.sleep(0.5)
        quitters = [socket.create_connection((served.host, served.port), timeout=10) for _ in range(10)]
        for sock in quitters:
            sock.sendall(request)
        time.sleep(0.5)
        for sock in quitters:
            sock.close()
        busy.join(30)
        time.sleep(3.0)
        assert openai_server.stats()["requests"] == 1
    finally:
        openai_server.control(delay=0.0)


def test_500_half_sent_requests_are_closed_within_10_s(served):
    import selectors
    import socket
    import time

    socks = []
    try:
        for _ in range(500):
            sock = socket.create_connection((served.host, served.port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            sock.setblocking(False)
            socks.append(sock)
        opened = time.monotonic()
        open_ = set(socks)
        with selectors.DefaultSelector() as watch:
            for sock in socks:
                watch.register(sock, selectors.EVENT_READ)
            while open_ and time.monotonic() - opened < 10:
                for key, _ in watch.select(timeout=0.5):
                    try:
                        closed = key.fileobj.recv(1024) == b""
                    except ConnectionError:
                        closed = True
                    if closed:
                        watch.unregister(key.fileobj)
                        open_.discard(key.fileobj)
        assert not open_, f"{len(open_)} of 500 half-sent connections still open after 10 s"
        assert http(f"{served.url}/models", key=KEY)[0] == 200
    finally:
        for sock in socks:
            sock.close()


def test_schemathesis_finds_no_request_that_crashes_it(served):
    """Every operation of the published OpenAPI schema, fuzzed within a bounded budget."""
    import hypothesis
    import schemathesis
    from schemathesis.specs.openapi.checks import status_code_conformance

    auth = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_url(served.url.removesuffix("/v1") + "/openapi.json", headers=auth)
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(headers=auth, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500 or response.status_code in (502, 503), case.as_curl_command()
            case.validate_response(response, checks=[status_code_conformance])
            if response.status_code >= 400:
                assert set(response.json()) == {"error"}, response.text

        fuzz()
    assert sum(seen.values()) >= 100 and 400 in seen and 200 in seen


def test_the_magic_starts_reports_and_stops_it_without_showing_the_key(served, capfd, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "byzer_magic")
    monkeypatch.setenv("GW_MAGIC_KEY", "gw-magic-secret-abcdef0123")
    port = free_port()

    def run(cell: str) -> str:
        shell.run_cell(cell)
        out, err = capfd.readouterr()
        return out + err

    try:
        text = run(f"%byzer_serve --port {port} --api_key ${{GW_MAGIC_KEY}}")
        assert f"running at http://127.0.0.1:{port}/v1 (API key required)" in text
        assert "gw-magic-secret" not in text
        assert http(f"http://127.0.0.1:{port}/v1/models", key="gw-magic-secret-abcdef0123")[0] == 200
        for line, needle in (("%byzer_serve --prot 9", "Did you mean --port?"),
                             ("%byzer_serve --port 99999", "from 1 to 65535"),
                             ("%byzer_serve --api_key ${NOT_SET_ANYWHERE}", "NOT_SET_ANYWHERE is not set")):
            text = run(line)
            assert needle in text and "Traceback" not in text, line
        assert "OpenAI-compatible" in run("%byzer_serve?")
        assert "stopped" in run("%byzer_serve --stop")
        assert "no OpenAI endpoint is running" in run("%byzer_serve --stop")
    finally:
        gateway.start(served.host, served.port, KEY)


# Structured output, tools and /v1/responses, through clients nobody here wrote (tests/support/clients.py).


@pytest.mark.parametrize("name", ["ep_llama", "ep_tools"])
def test_fifty_schema_answers_all_parse_and_validate(served, name):
    """llama.cpp's grammar and the provider's json_schema make a random model's answers valid, every one."""
    sync, _ = clients.clients(served.url, KEY)
    values = clients.schema_replies(sync, name, 50)
    assert len(values) == 50 and len({json.dumps(v, sort_keys=True) for v in values}) > 1


@pytest.mark.parametrize("name", ["ep_saas", "ep_llama"])
def test_openai_and_langchain_clients_get_the_same_answer_and_counts(served, name):
    counts = clients.text_everywhere(served.url, KEY, name)
    usage = counts["openai"]
    if usage is None:
        assert counts["responses"] is None and counts["langchain"] is None
    else:
        assert (counts["responses"].input_tokens, counts["responses"].output_tokens) == \
            (usage.prompt_tokens, usage.completion_tokens)
        assert counts["langchain"]["input_tokens"] == usage.prompt_tokens


@pytest.mark.parametrize("name", ["ep_tools", "ep_llama_tools"])
def test_tool_calls_come_whole_and_streamed_as_openai_sends_them(served, name):
    clients.tool_calls_everywhere(served.url, KEY, name)


def test_langchain_structured_output_validates(served):
    assert set(clients.structured_through_langchain(served.url, KEY, "ep_llama")) == {"colour", "name", "ok"}


def test_llama_cpp_without_a_tool_format_refuses_tools_plainly(client):
    with pytest.raises(openai.BadRequestError, match="chat_format=chatml-function-calling"):
        client.chat.completions.create(model="ep_llama", messages=HELLO, tools=[clients.WEATHER])


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools", "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": ["city"]}}]},
     "tools", "must be a JSON object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}},
     "response_format", "must be a JSON object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
     "response_format", "not a valid JSON Schema"),
    ({"tools": [clients.WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools sent"),
])
def test_bad_tools_and_schemas_are_400_naming_the_field_and_reach_nothing(served, clean_server, extra, param, words):
    before = clean_server.stats()["requests"]
    status, body = http(f"{served.url}/chat/completions", {"model": "ep_tools", "messages": HELLO, **extra}, KEY)
    assert status == 400 and body["error"]["param"] == param and words in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    assert clean_server.stats()["requests"] == before
    assert deploy.status("ep_tools").state == "ready"


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "tools"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": [{"type": "input_image", "image_url": "http://x/y.png"}]}, "input"),
])
def test_responses_refuse_what_they_cannot_carry_by_name(served, extra, param):
    status, body = http(f"{served.url}/responses", {"model": "ep_saas", "input": "hi", **extra}, KEY)
    assert status == 400 and body["error"]["param"].startswith(param), body


def test_responses_carry_a_json_schema_text_format(served):
    sync, _ = clients.clients(served.url, KEY)
    fmt = {"type": "json_schema", "name": "pick", "schema": clients.SCHEMA, "strict": True}
    reply = sync.responses.create(model="ep_llama", input="pick", text={"format": fmt}, max_output_tokens=80)
    jsonschema.validate(json.loads(reply.output_text), clients.SCHEMA)
