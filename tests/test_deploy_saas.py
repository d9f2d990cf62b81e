"""SaaS deployments on a real Ray cluster against llama.cpp's real OpenAI server."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from byzer_magic.serving import chat, deploy, raydoor
from byzer_magic.backends.base import GenParams
from byzer_magic.errors import BackendError, DeployError, NotDeployedError
from byzer_magic.spec.deploy_spec import parse_spec

from .conftest import alive_replicas, wait_until

GREEDY = GenParams(temperature=0, max_tokens=8)
IN_PLACE = pytest.mark.skipif(not raydoor.can_scale_in_place(), reason="Serve has no external scaler before Ray 2.53")


def saas_spec(server, name: str, workers: int = 2, extra: str = "", model: str = "tiny"):
    key = server.api_key or "sk-unused-by-the-local-server"
    return parse_spec(
        f"--pretrained_model_type saas/openai --infer_params saas.api_key={key} saas.model={model} "
        f"saas.base_url={server.base_url} {extra} --num_workers {workers} --cpus_per_worker 0.001 "
        f"--gpus_per_worker 0 --model {name}"
    )


@pytest.fixture
def deployed(ray_head, clean_server, request):
    """A fresh 2-worker SaaS deployment, removed (and checked gone) afterwards."""
    name = request.node.name.replace("[", "_").replace("]", "")[:60]
    status = deploy.deploy(saas_spec(clean_server, name))
    assert status.state == "ready" and status.workers_ready == 2
    yield name
    if deploy.status(name).state != "stopped":
        deploy.undeploy(name)
    assert alive_replicas(name) == []


def test_chat_streamed_and_whole_give_the_same_greedy_answer(deployed):
    whole = chat.chat(deployed, "Hello there", GREEDY)
    pieces = [d.text for d in chat.stream(deployed, chat.messages_for("Hello there"), GREEDY)]
    assert whole.text and len(pieces) > 1
    assert "".join(pieces) == whole.text
    assert whole.finish_reason == "length"


def test_eight_concurrent_chats_are_all_answered(deployed, clean_server):
    clean_server.control(delay=0.2)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: chat.chat(deployed, f"question {i}", GREEDY), range(8)))
    assert all(a.text for a in answers)
    assert clean_server.stats()["requests"] == 8


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_saas_worker_never_holds_two_requests(ray_head, clean_server, workers):
    name = f"conc{workers}"
    deploy.deploy(saas_spec(clean_server, name, workers))
    try:
        clean_server.control(delay=0.3, reset=True)
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda i: chat.chat(name, "hi", GREEDY), range(12)))
        seen = clean_server.stats()
        assert seen["requests"] == 12
        assert seen["max_in_flight"] == workers, "workers should be used in parallel, one request each"
    finally:
        deploy.undeploy(name)


@IN_PLACE
def test_scale_up_and_down_while_requests_run_loses_none(deployed, clean_server):
    clean_server.control(delay=0.05)
    answers: list = []
    errors: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                answers.append(chat.chat(deployed, "keep going", GREEDY).text)
            except Exception as exc:  # noqa: BLE001 - any failure is what this test counts
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        up = deploy.scale(deployed, 3)
        assert up.workers_ready == 3 and len(alive_replicas(deployed)) == 3
        down = deploy.scale(deployed, 1)
        assert down.workers_ready == 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert len(answers) > 10 and all(answers)
    assert clean_server.stats()["requests"] == len(answers)


@pytest.mark.skipif(raydoor.can_scale_in_place(), reason="this Ray scales in place")
def test_scale_on_a_ray_without_an_external_scaler_says_how_to_redeploy(deployed):
    with pytest.raises(DeployError, match="needs Ray 2.53 or newer.*--force and --num_workers 3"):
        deploy.scale(deployed, 3)
    assert deploy.status(deployed).workers_wanted == 2


@IN_PLACE
def test_scale_to_zero_gives_the_workers_back_and_one_brings_a_worker_again(ray_head, clean_server):
    deploy.deploy(saas_spec(clean_server, "napping", 1))
    try:
        down = deploy.scale("napping", 0)
        assert (down.state, down.workers_ready, down.workers_wanted) == ("ready", 0, 0)
        assert alive_replicas("napping") == []
        assert "napping" in [row.name for row in deploy.list_deployments().rows]
        up = deploy.scale("napping", 1)
        assert up.workers_ready == 1 and len(alive_replicas("napping")) == 1
        assert chat.chat("napping", "hi", GREEDY).text
    finally:
        deploy.undeploy("napping")


def test_a_serve_app_byzer_magic_did_not_deploy_is_never_replaced(ray_head, clean_server):
    from ray import serve

    @serve.deployment(name="Theirs")
    class Theirs:
        def __call__(self) -> str:
            return "theirs"

    serve.run(Theirs.bind(), name="someone_elses", route_prefix=None)
    try:
        for force in ("", "--force"):
            with pytest.raises(DeployError, match="was not deployed by byzer_magic; it is left alone"):
                deploy.deploy(saas_spec(clean_server, "someone_elses", 1, extra=force))
        assert serve.status().applications["someone_elses"].status == "RUNNING"
    finally:
        serve.delete("someone_elses")


def test_a_full_queue_refuses_at_once_instead_of_waiting(ray_head, clean_server):
    import time

    deploy.deploy(saas_spec(clean_server, "short_queue", 1, extra="--max_queued_requests 2"))
    try:
        clean_server.control(delay=1.0, reset=True)
        outcomes: list = []

        def ask() -> None:
            started = time.monotonic()
            try:
                chat.chat("short_queue", "hi", GREEDY)
                outcomes.append(("answered", time.monotonic() - started))
            except BackendError as exc:
                outcomes.append((str(exc), time.monotonic() - started))

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: ask(), range(6)))
        refused = [took for what, took in outcomes if "full queue" in what and "503" in what]
        assert len(refused) >= 2 and max(refused) < 0.9, outcomes
        assert sum(what == "answered" for what, _ in outcomes) + len(refused) == 6
    finally:
        clean_server.control(delay=0.0)
        deploy.undeploy("short_queue")


@IN_PLACE
def test_a_scale_the_memory_cannot_hold_is_refused_and_one_that_times_out_goes_back(ray_head, clean_server):
    deploy.deploy(saas_spec(clean_server, "too_many", 1))
    try:
        wait_until(lambda: deploy.status("too_many", with_metrics=True).metrics.get("largest_worker_bytes"), 30,
                   "the worker's memory figure")
        with pytest.raises(DeployError, match=r"more workers of about \d+ MiB each need .* GiB of memory free"):
            deploy.scale("too_many", 256)
        assert deploy.status("too_many").workers_wanted == 1
        with pytest.raises(DeployError, match="scaled back to 1 workers") as slow:
            deploy.scale("too_many", 2, timeout=0.01)
        assert "byzer_magic.serving.deploy.scale(..., timeout=SECONDS) waits longer than 0.01 s" in str(slow.value)
        assert "scale timeout" not in str(slow.value)
        wait_until(lambda: len(alive_replicas("too_many")) == 1 and deploy.status("too_many").workers_wanted == 1,
                   60, "the scale to go back")
    finally:
        deploy.undeploy("too_many")


def test_undeploy_removes_every_actor_and_the_name(ray_head, clean_server):
    deploy.deploy(saas_spec(clean_server, "gone_soon", 2))
    assert len(alive_replicas("gone_soon")) == 2
    deploy.undeploy("gone_soon")
    assert alive_replicas("gone_soon") == []
    assert "gone_soon" not in [row.name for row in deploy.list_deployments().rows]
    with pytest.raises(NotDeployedError, match="gone_soon"):
        deploy.undeploy("gone_soon")


def test_two_deploys_of_one_name_at_once_leave_exactly_one(ray_head, clean_server):
    """Two cells deploying one name together: one deploys, the other is refused in one sentence, and the refused
    one's clean-up does not delete what the first started."""
    results: list[tuple[str, str]] = []

    def one() -> None:
        try:
            results.append(("ok", deploy.deploy(saas_spec(clean_server, "twice", workers=1)).line()))
        except DeployError as exc:
            results.append(("refused", str(exc)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    try:
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert sorted(kind for kind, _ in results) == ["ok", "refused"], results
        refused = next(text for kind, text in results if kind == "refused")
        assert "another deploy of 'twice' is under way" in refused or "already exists" in refused, refused
        assert "\n" not in refused
        assert deploy.status("twice").line().startswith("twice: ready, 1/1 workers")
        assert raydoor.kv_get("deploying/twice") is None, "the claim ends with its deploy"
    finally:
        deploy.undeploy("twice")


def test_deploying_a_taken_name_says_so_and_force_replaces_it(deployed, clean_server):
    with pytest.raises(DeployError, match=f"%byzer_undeploy {deployed}"):
        deploy.deploy(saas_spec(clean_server, deployed, 1))
    assert deploy.status(deployed).workers_wanted == 2
    replaced = deploy.deploy(saas_spec(clean_server, deployed, 1, extra="--force"))
    assert replaced.workers_ready == 1 == len(alive_replicas(deployed))


def test_list_shows_backend_and_model_but_never_the_key(deployed):
    row = next(r for r in deploy.list_deployments().rows if r.name == deployed)
    assert (row.backend, row.model, row.state) == ("saas", "tiny", "ready")
    assert row.details["infer_params"]["saas.api_key"] == "***"
    assert "sk-unused" not in repr(deploy.list_deployments()) + str(row.details)


def test_a_bad_key_fails_the_deploy_readably_and_leaves_nothing(ray_head, tiny_model):
    from .conftest import start_openai_server

    server = start_openai_server(tiny_model.gguf, api_key="the-right-key")
    try:
        spec = parse_spec(
            f"--pretrained_model_type saas/openai --infer_params saas.api_key=sk-wrong-key-0123456789 "
            f"saas.model=tiny saas.base_url={server.base_url} --num_workers 2 --model badkey"
        )
        with pytest.raises(DeployError) as info:
            deploy.deploy(spec)
        assert "401" in str(info.value)
        assert "sk-wrong-key-0123456789" not in str(info.value)
        assert deploy.status("badkey").state == "stopped"
        assert alive_replicas("badkey") == []
    finally:
        server.proc.terminate()


def test_provider_errors_reach_the_caller_with_status_and_message(deployed, clean_server):
    clean_server.control(fail_next=100, fail_status=400)
    with pytest.raises(BackendError) as info:
        chat.chat(deployed, "hi", GREEDY)
    assert info.value.status_code == 400
    assert "injected failure 400" in str(info.value)
    clean_server.control(fail_next=0)
    assert chat.chat(deployed, "hi", GREEDY).text


def test_chat_with_an_unknown_name_is_a_clear_error(ray_head):
    with pytest.raises(NotDeployedError, match="no_such_model"):
        chat.chat("no_such_model", "hi")


def test_a_worker_can_take_its_key_from_its_own_nodes_environment(ray_head, clean_server):
    """node-env:NAME travels as that text; the worker reads NAME on its node, so the key is nowhere in Serve."""
    from byzer_magic.serving import raydoor

    spec = parse_spec(f"--pretrained_model_type saas/openai --infer_params saas.api_key=node-env:BYZER_TEST_NODE_KEY "
                      f"saas.model=tiny saas.base_url={clean_server.base_url} --model node_key")
    deploy.deploy(spec)
    try:
        assert chat.chat("node_key", "hi", GREEDY).text
        assert "sk-node-5e1f7a3c9b2d4f60" not in repr(raydoor.serve_details())
    finally:
        deploy.undeploy("node_key")
    missing = parse_spec(f"--pretrained_model_type saas/openai --infer_params saas.api_key=node-env:NOT_ON_ANY_NODE "
                         f"saas.model=tiny saas.base_url={clean_server.base_url} --model node_key_missing")
    with pytest.raises(DeployError, match="NOT_ON_ANY_NODE is not set where this worker runs"):
        deploy.deploy(missing)
    assert alive_replicas("node_key_missing") == []
