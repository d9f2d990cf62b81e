"""Worker counts, ranges and placement flags as pure rules: no cluster needed.

What Serve does with them is tested on real clusters (test_autoscale.py,
test_several_nodes.py); here, which flags go together, what options they
make, and how a status reads while a scale runs.
"""
from __future__ import annotations

import pytest

from byzer_magic.serving import deploy, scaling, serve_status
from byzer_magic.errors import SpecError
from byzer_magic.spec.deploy_spec import parse_args
from byzer_magic.serving.status import DeploymentStatus
from byzer_magic.frontends.widgets import StatusCard

SAAS = ["--model", "m", "--pretrained_model_type", "saas/openai", "--infer_params", "saas.api_key=sk-x",
        "saas.model=tiny", "saas.base_url=http://127.0.0.1:9/v1", "saas.timeout=20"]


@pytest.mark.parametrize("flags,message", [
    ("--min_workers 3 --max_workers 2", "--min_workers 3 is more than --max_workers 2"),
    ("--max_workers 0", "--max_workers must be from 1 to 256, got 0"),
    ("--min_workers 1 --max_workers 3 --num_workers 2", "--min_workers with --num_workers"),
    ("--min_workers 2", "--min_workers 2 needs --max_workers"),
    ("--downscale_delay_s 5", "--downscale_delay_s applies only to autoscaling"),
    ("--resources GPU=1", "--resources GPU=1: ask for GPUs with --gpus_per_worker 1"),
    ("--resources CPU=2", "ask for CPUs with --cpus_per_worker 2"),
    ("--resources accel=abc", "--resources takes name=amount pairs with a number"),
    ("--resources accel=0", "--resources accel=0: an amount must be more than 0"),
    ("--max_workers_per_node 0", "--max_workers_per_node must be 1 or more, got 0"),
])
def test_bad_scaling_and_placement_flags_are_one_sentence_naming_the_flag(flags, message):
    with pytest.raises(SpecError) as refused:
        parse_args(SAAS + flags.split())
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_range_makes_serves_autoscaling_config_and_a_count_a_fixed_one():
    ranged = deploy.worker_options(parse_args(SAAS + "--min_workers 0 --max_workers 4 --upscale_delay_s 1".split()))
    assert "num_replicas" not in ranged
    assert ranged["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4,
                                            "target_ongoing_requests": 1.0, "upscale_delay_s": 1.0,
                                            "downscale_delay_s": 600.0}
    fixed = deploy.worker_options(parse_args(SAAS + "--num_workers 3 --max_workers_per_node 1 --resources a=1 b=0.5"
                                             .split()))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_replicas_per_node"] == 1
    assert fixed["ray_actor_options"]["resources"] == {"a": 1.0, "b": 0.5}
    # A worker being removed may take as long as its longest request: saas.timeout, and a margin.
    assert fixed["graceful_shutdown_timeout_s"] == 20 + scaling.SHUTDOWN_MARGIN_S


def test_the_target_follows_the_worker_concurrency_unless_given():
    batching = parse_args(SAAS + "--worker_concurrency 10 --min_workers 1 --max_workers 2".split())
    assert scaling.autoscaling_config(batching)["target_ongoing_requests"] == 8
    given = parse_args(SAAS + "--min_workers 1 --max_workers 2 --target_ongoing_requests 3".split())
    assert scaling.autoscaling_config(given)["target_ongoing_requests"] == 3


@pytest.mark.parametrize("text,target", [("3", 3), ("0", 0), ("2..6", (2, 6)), ("0..2", (0, 2))])
def test_a_scale_target_is_a_count_or_a_range(text, target):
    assert scaling.parse_target(text) == target


@pytest.mark.parametrize("text", ["3..2", "1..0", "x", "2..300"])
def test_a_bad_scale_target_says_what_is_valid(text):
    with pytest.raises(SpecError, match="cannot scale to"):
        scaling.parse_target(text)


def _app(dep_status: str, target: int, states: list[str], autoscaling: dict | None = None) -> dict:
    replicas = [{"state": s, "node_id": f"{i:08x}ffff", "node_ip": "10.0.0.1"} for i, s in enumerate(states)]
    config = {"num_replicas": target, "user_config": {"backend": "saas", "model": "tiny"}}
    if autoscaling:
        config["autoscaling_config"] = autoscaling
    return {"status": "RUNNING", "deployments": {"ByzerWorker": {
        "status": dep_status, "target_num_replicas": target, "replicas": replicas, "deployment_config": config}}}


def test_a_scale_under_way_reads_scaling_not_degraded_or_ready():
    up = serve_status.to_status("m", _app("UPSCALING", 3, ["RUNNING", "RUNNING", "STARTING"]))
    assert up.state == "scaling" and up.line() == "m: scaling, 2/3 workers, saas tiny (scaling up to 3 workers)"
    down = serve_status.to_status("m", _app("DOWNSCALING", 1, ["RUNNING", "RUNNING", "RUNNING"]))
    assert down.state == "scaling" and "scaling down to 1 worker)" in down.line()
    dead = serve_status.to_status("m", _app("UNHEALTHY", 3, ["RUNNING", "RUNNING", "STARTING"]))
    assert dead.state == "degraded"


def test_an_autoscaling_status_shows_its_range_and_count_and_the_nodes():
    ranged = serve_status.to_status("m", _app("HEALTHY", 3, ["RUNNING"] * 3, {"min_replicas": 1, "max_replicas": 4}))
    assert ranged.line() == "m: ready, autoscaling 1..4, now 3, saas tiny"
    assert "workers on nodes: 00000000 (10.0.0.1): 1, 00000001 (10.0.0.1): 1" in repr(ranged)


def test_the_cards_buttons_move_an_autoscaling_range():
    calls = []
    status = DeploymentStatus("m", "ready", 3, 3, details={"backend": "saas"}, workers=("running",) * 3,
                              nodes=("aa (h1)", "aa (h1)", "bb (h2)"), min_workers=2, max_workers=4)
    card = StatusCard(status, scale=lambda name, target: calls.append(target) or status)
    assert "autoscaling 2..4, now 3" in card.body.value and "aa (h1): 2, bb (h2): 1" in card.body.value
    assert card._step(+1) == (2, 5) and card._step(-1) == (2, 3)
    low = DeploymentStatus("m", "ready", 1, 1, min_workers=1, max_workers=1)
    card.refresh(low)
    assert card.minus.disabled and card._step(-1) == (0, 0)
    card.refresh(DeploymentStatus("m", "scaling", 2, 3, "scaling up to 3 workers"))
    assert "scaling up to 3 workers" in card.body.value


def test_gpus_per_worker_beyond_any_one_node_is_refused_naming_the_most_one_node_has(monkeypatch):
    """The pure rule behind the several-node test: two nodes of one GPU each cannot hold a worker of two."""
    from byzer_magic.serving import placement
    from byzer_magic.errors import DeployError

    nodes = [{"NodeID": f"n{i}", "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}} for i in range(2)]
    monkeypatch.setattr(placement, "alive_nodes", lambda: nodes)
    with pytest.raises(DeployError, match=r"--gpus_per_worker 2: .* the most GPUs one node of this cluster has is 1;"):
        placement.hosts(1, 2, {})
    assert placement.hosts(1, 1, {}) == nodes
