"""Ray's private parts behind one door.

Everything byzer_magic needs from Ray that is not public API lives here and
nowhere else, so a Ray release that moves one breaks this module alone, with
one sentence that names the Ray version and the API, not an ImportError deep
in a deploy. Public API is used wherever Ray has one.

Serve's state is read one way: the controller's instance details (the public
`serve.status()` carries neither replica ids nor user_config, which the cards
need), from sync code and from a replica's loop alike.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import re
from typing import Any

from ..errors import DeployError

OLDEST_RAY = (2, 48, 0)
NEWEST_RAY = (2, 60, 0)
"""The Ray releases CI runs the Ray-facing tests on; pyproject.toml declares the same range."""

KV_NAMESPACE = "byzer_magic"


class RayAPIError(DeployError):
    """A private Ray API this package uses is not where it was: the installed Ray moved it."""


def ray_version() -> tuple[int, ...]:
    """The installed Ray's version as numbers (a dev build's suffix dropped)."""
    import ray

    return tuple(int(part) for part in re.findall(r"\d+", ray.__version__)[:3])


def _tested() -> str:
    return f"{'.'.join(map(str, OLDEST_RAY))} to {'.'.join(map(str, NEWEST_RAY))}"


def _private(module: str, name: str) -> Any:
    """One private attribute of Ray, or the one sentence that says it moved."""
    import ray

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise RayAPIError(
            f"Ray {ray.__version__} has no {module}.{name}, which byzer_magic uses; "
            f"install ray[serve] {_tested()} (the releases byzer_magic is tested with)"
        ) from None


def check_version() -> None:
    """Refuse a Ray older than the oldest release the package works with."""
    import ray

    if ray_version() < OLDEST_RAY:
        raise RayAPIError(f"byzer_magic needs Ray {_tested()}; this is Ray {ray.__version__}")
    _check_protobuf()


def _check_protobuf() -> None:
    """Refuse protobuf 7 beside a Serve that still reads FieldDescriptor.label, which protobuf 7 removed.

    Ray 2.48's Serve controller failed every deploy that way ("'FieldDescriptor'
    object has no attribute 'label'"), deep in a remote traceback.
    """
    import google.protobuf
    import ray

    if int(google.protobuf.__version__.split(".")[0]) < 7:
        return
    reader = _private("ray.serve._private.config", "_proto_to_dict")
    if ".label" in inspect.getsource(reader):
        raise RayAPIError(
            f"Ray {ray.__version__}'s Serve cannot read its config with protobuf {google.protobuf.__version__} "
            f"(FieldDescriptor.label is gone in protobuf 7): pip install 'protobuf<7'"
        )


def address_from_environment() -> str | None:
    """The address `ray start` recorded on this machine (it may be stale), or None."""
    find = _private("ray._private.services", "get_ray_address_from_environment")
    try:
        return find(None, None) or None
    except (ConnectionError, ValueError, OSError):
        return None


def use_token_if_present() -> None:
    """Send this machine's Ray token when joining a cluster.

    Ray 2.60 clusters require a token by default, but a driver joining one
    only sends it in token mode; Ray's own helper switches to it when a token
    exists. Rays before 2.60 that lack the helper have no default token to send.
    """
    module = "ray._private.authentication.authentication_token_setup"
    if ray_version() < NEWEST_RAY and importlib.util.find_spec("ray._private.authentication") is None:
        return
    enable = _private(module, "maybe_enable_token_auth_if_token_available")
    quiet = logging.getLogger(module)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        enable(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def quiet_failure_signal_handler() -> None:
    """Keep Ray's SIGTERM stack dump out of this driver's stderr (a notebook's cell).

    Ray reads `RAY_DISABLE_FAILURE_SIGNAL_HANDLER` into a constant when it is
    first imported, and installs the handler at `ray.init` from that constant:
    setting the variable after a user's `import ray` changes nothing, so the
    constant is set too. A user's own value of the variable wins.
    """
    import os

    if os.environ.get("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1") in ("0", "false", "False"):
        return
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    constants = importlib.import_module("ray._private.ray_constants")
    if hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):  # Ray 2.48 has no such constant to set
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


CLUSTER_MESSAGES = logging.getLogger("byzer_magic.ray")
"""Where the cluster's messages to this driver go (a node marked dead, a worker killed): INFO, unseen by default."""


def quiet_cluster_messages() -> None:
    """Send what the cluster tells this driver to `CLUSTER_MESSAGES`, not to stdout (a notebook's cell).

    Ray's driver prints each such message as a `(raylet) ...` line on stdout
    whatever `log_to_driver` says, from a thread it starts in `ray.init`; the
    status card and the one-paragraph errors already say what a user needs
    (a worker died, the deployment is degraded). Set before `ray.init`.
    """
    module = importlib.import_module("ray._private.worker")
    printer = _private("ray._private.worker", "print_to_stdstream")
    if getattr(printer, "quiet", False):
        return

    def to_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for line in data.get("lines", ()):
            CLUSTER_MESSAGES.info("%s", line)

    to_log.quiet = True  # type: ignore[attr-defined]
    module.print_to_stdstream = to_log


def quiet_ray_client() -> None:
    """Keep Ray Client's complaints about a reply to a call this driver gave up on out of stderr (a cell).

    When such a reply arrives, Ray Client's data thread finds the call's
    future cancelled, logs "Callback error" with a traceback, and on shutdown
    dies with an uncaught InvalidStateError. Nothing was lost: the caller had
    already stopped waiting. Both go to `CLUSTER_MESSAGES`.
    """
    import concurrent.futures
    import threading

    logging.getLogger("ray.util.client.dataclient").setLevel(logging.CRITICAL)
    previous = threading.excepthook
    if getattr(previous, "quiet", False):
        return

    def hook(args: Any) -> None:
        thread = getattr(args.thread, "name", "") or ""
        if thread.startswith("ray_client") and isinstance(args.exc_value, concurrent.futures.InvalidStateError):
            CLUSTER_MESSAGES.info("Ray Client: %s", args.exc_value)
            return
        previous(args)

    hook.quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


HEAD_NODE_RESOURCE = "node:__internal_head__"
"""The custom resource Ray gives the head node alone: where the OpenAI endpoint runs for a Ray Client driver."""


def over_ray_client() -> bool:
    """Whether this process reaches its cluster through Ray Client (`ray://`), which cannot stream from Serve."""
    from ray.util.client import ray as client

    return client.is_connected()


def in_replica() -> bool:
    """Inside a Serve replica (the OpenAI endpoint) Ray and Serve are already there."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


def _controller() -> Any:
    return _private("ray.serve.context", "_get_global_client")()._controller


def serve_details() -> dict[str, Any]:
    """Serve's details of every application, deployment and replica."""
    import ray

    return ray.get(_controller().get_serve_instance_details.remote())


async def serve_details_async() -> dict[str, Any]:
    """The same details, awaited on a running loop (the endpoint's replica)."""
    return await _controller().get_serve_instance_details.remote()


def app_status(name: str) -> str:
    """One application's status alone: RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, DELETING or NOT_STARTED.

    Serve's own wait (`serve.run`) asks this; the controller answers it from
    memory, while the whole details (serve_details) rebuild every
    application's description and read the config checkpoint each time. A
    deploy polls this instead, so its polling costs the controller that is
    starting its workers almost nothing.
    """
    import ray

    proto = _private("ray.serve.generated.serve_pb2", "StatusOverview")
    statuses = _private("ray.serve.generated.serve_pb2", "ApplicationStatus")
    raw = ray.get(_controller().get_serve_status.remote(name))
    if raw is None:
        return "NOT_STARTED"
    return statuses.Name(proto.FromString(raw).app_status.status).removeprefix("APPLICATION_STATUS_")


def setup_hook_env(function: str) -> dict[str, str]:
    """The env var that makes a fresh worker process call `function` ("module.name") when it starts.

    Ray's own `worker_process_setup_hook` takes effect only in a job's
    runtime env (ray.init), where Ray turns it into this variable; in an
    actor's runtime env the variable itself does it. Empty where the job has
    a hook of its own, which ours must not replace.
    """
    import ray

    name = _private("ray._private.ray_constants", "WORKER_PROCESS_SETUP_HOOK_ENV_VAR")
    job = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    return {} if name in job else {name: function}


def can_scale_in_place() -> bool:
    """Whether this Serve takes a new worker count without a redeploy (its external scaler, Ray 2.53 on)."""
    from ray import serve

    return "external_scaler_enabled" in inspect.signature(serve.RunTarget).parameters


def deployment_options(options: dict[str, Any]) -> dict[str, Any]:
    """Serve's deployment options less those this Ray's Serve does not take.

    Only tuning is left out: Ray 2.48 has no `max_constructor_retry_count`
    (a worker whose constructor fails is retried Serve's default 3 times, so a
    failed deploy takes longer to report) and Rays before 2.48 no
    `request_router_config` (how fast a caller retries a full worker).
    """
    from ray import serve

    known = inspect.signature(serve.Deployment.options).parameters
    return {key: value for key, value in options.items() if key in known}


def start_app(app: Any, name: str, *, scalable: bool = False) -> None:
    """Start or update a Serve application and return at once, without waiting for it to run.

    `serve.run(blocking=False)` still waits until the application runs, which
    would hide a deploy's progress and its failure reason; `serve.run_many`
    (Serve's developer API) can return before.
    """
    from ray import serve

    extra = {"external_scaler_enabled": True} if scalable and can_scale_in_place() else {}
    target = serve.RunTarget(app, name=name, route_prefix=None, **extra)
    serve.run_many([target], wait_for_applications_running=False)


def set_workers(app: str, deployment: str, workers: int) -> None:
    """Change a deployment's replica count in place; requests keep flowing."""
    import ray

    if not can_scale_in_place():
        raise DeployError(
            f"scaling in place needs Ray 2.53 or newer (Serve's external scaler); this is Ray {ray.__version__}: "
            f"redeploy with --force and --num_workers {workers} instead"
        )
    deployment_id = _private("ray.serve._private.common", "DeploymentID")(deployment, app)
    ray.get(_controller().update_deployment_replicas.remote(deployment_id, workers))


def deployed(app: str, deployment: str) -> tuple[tuple, str, dict[str, Any]]:
    """What a deployment runs with now: its constructor's arguments, its code version and its actor options.

    Redeploying with the same version and actor options changes only what
    differs (a worker count, an autoscaling range) without restarting a
    worker, from any process: the spec is read back from the cluster, so a
    kernel that did not deploy it can rescale it.
    """
    import ray

    route_class = _private("ray.serve.generated.serve_pb2", "DeploymentRoute")
    info_class = _private("ray.serve._private.deployment_info", "DeploymentInfo")
    raw = ray.get(_controller().get_deployment_info.remote(deployment, app))
    info = info_class.from_proto(route_class.FromString(raw).deployment_info)
    replica = info.replica_config
    return tuple(replica.init_args), info.version, dict(replica.ray_actor_options or {})


def pinned(deployment: Any, version: str) -> Any:
    """The deployment with its code version fixed, so Serve sees a redeploy as a change of options only.

    Serve took `version` out of its public `options` (it still reads `_version` when deploying).
    """
    from ray import serve

    internal = {"_internal": True} if "_internal" in inspect.signature(serve.Deployment.options).parameters else {}
    return deployment.options(version=version, **internal)


def _kv(name: str) -> Any:
    """One of the GCS key-value store's functions, which Ray names as private."""
    return _private("ray.experimental.internal_kv", f"_internal_kv_{name}")


_NODE_START_TIMED_OUT = "timed out during startup"
"""What `ray.init` says when the node it started never registered (Ray 2.48-2.60: a bare Exception)."""


def node_start_timed_out(exc: BaseException) -> bool:
    """Whether a local `ray.init` failed because its node's raylet never came up, which trying again can cure."""
    return _NODE_START_TIMED_OUT in str(exc)


def kv_put(key: str, value: str) -> None:
    """Store a value in the GCS key-value store, where any process on the cluster can read it."""
    _kv("put")(key, value, overwrite=True, namespace=KV_NAMESPACE)


def kv_claim(key: str, value: str) -> bool:
    """Store a value only where the key is free; whether this call stored it (one winner among all drivers)."""
    return not _kv("put")(key, value, overwrite=False, namespace=KV_NAMESPACE)


def kv_get(key: str | bytes) -> bytes | None:
    """A stored value, or None."""
    return _kv("get")(key, namespace=KV_NAMESPACE)


def kv_del(key: str) -> None:
    """Remove a stored value (a missing one is no error)."""
    _kv("del")(key, namespace=KV_NAMESPACE)


def kv_keys(prefix: str) -> list[bytes]:
    """Every stored key that starts with the prefix."""
    return list(_kv("list")(prefix, namespace=KV_NAMESPACE))


_ERROR_LINE = re.compile(r"(?:byzer_magic\.errors\.)?(?:BackendError|DeployError|ByzerError): (.+)")


def reason_in(message: str) -> str:
    """The readable cause inside a Serve status message.

    Serve puts a failed constructor's whole traceback in the message, as text;
    its format is Serve's, not a contract, so reading it lives here.
    """
    found = _ERROR_LINE.findall(message)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
