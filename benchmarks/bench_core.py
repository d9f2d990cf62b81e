"""Deploy time, added chat latency and worker scaling, each against a baseline of the same run.

    python benchmarks/bench_core.py [--requests 200] [--delay 0.1] [--rounds 5] [--only deploy,latency,cell,throughput]

1. deploy -> ready for a 2-worker SaaS deployment on a running cluster,
   beside the time Ray takes to start one bare actor and answer a ping;
2. latency a chat through the deployment adds over calling the same
   llama.cpp server directly with the openai client (median, p99), both
   streamed, from async code on the client loop and from sync code;
   then a streamed `%%byzer_chat NAME -o r` cell, stage by stage;
3. throughput of 1, 2 and 4 SaaS workers against a server that takes a
   fixed time per request, as a ratio to one worker, and the most requests
   the server ever saw at once.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from byzer_magic.serving import chat

from byzer_magic.serving import deploy  # noqa: E402
from byzer_magic.backends.base import GenParams  # noqa: E402
from byzer_magic.serving.cluster import connect  # noqa: E402
from byzer_magic.spec.deploy_spec import parse_spec  # noqa: E402
from byzer_magic.tinymodel import build  # noqa: E402
from tests.conftest import start_openai_server  # noqa: E402

SHORT = GenParams(temperature=0, max_tokens=1)
MESSAGES = [{"role": "user", "content": "hi"}]


def spec(server, name: str, workers: int, concurrency: int = 1):
    return parse_spec(
        f"--pretrained_model_type saas/openai --infer_params saas.api_key=bench saas.model=tiny "
        f"saas.base_url={server.base_url} --num_workers {workers} --worker_concurrency {concurrency} --model {name}"
    )


@contextlib.contextmanager
def tiny_server() -> Iterator:
    """llama.cpp's server on 127.0.0.1 with the tiny model, and this process on the running cluster."""
    server = start_openai_server(build(ROOT / ".cache" / "tinymodel").gguf)
    try:
        connect()
        yield server
    finally:
        server.proc.terminate()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bare_actor_seconds() -> float:
    import ray

    @ray.remote(num_cpus=0.001)
    class Ping:
        def ping(self) -> int:
            return 1

    start = time.perf_counter()
    actor = Ping.remote()
    ray.get(actor.ping.remote())
    took = time.perf_counter() - start
    ray.kill(actor)
    return took


def _timed(events: list[tuple[float, str]], polls: dict[str, list[float]], module, attr: str, label: str) -> None:
    """Wrap module.attr: its first call's end goes on the timeline; later calls (the wait's polls) are summed."""
    original = getattr(module, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            if label not in polls:
                events.append((time.time(), label))
            polls.setdefault(label, []).append(time.time() - start)

    setattr(module, attr, wrapper)


def _replica_events(name: str, workers: int) -> list[tuple[float, str]]:
    """When Serve started each replica, its process began, and its constructor ran (from the worker's stats)."""
    import psutil
    from ray import serve

    from byzer_magic.serving.raydoor import serve_details

    events = []
    app = serve_details()["applications"][name]
    replicas = app["deployments"]["ByzerWorker"]["replicas"]
    for i, replica in enumerate(replicas):
        events.append((replica["start_time_s"], f"worker {i}: Serve asks Ray for its actor"))
        with contextlib.suppress(psutil.Error, KeyError):
            events.append((psutil.Process(replica["pid"]).create_time(), f"worker {i}: its process starts"))

    async def stats() -> dict:
        return await serve.get_app_handle(name).stats.remote()

    seen: dict = {}
    for _ in range(40):
        found = chat.run_on_client_loop(stats())
        seen[found["pid"]] = found
        if len(seen) == workers:
            break
    pids = [r.get("pid") for r in replicas]
    for pid, stats in seen.items():
        i = pids.index(pid) if pid in pids else "?"
        events.append((stats["init_started_at"], f"worker {i}: Worker.__init__ starts (imports done)"))
        events.append((stats["init_started_at"] + stats["init_s"], f"worker {i}: Worker.__init__ ends (backend ready)"))
    return events


def deploy_timeline(server, name: str, workers: int = 2) -> float:
    """Deploy once with every step's end recorded, print the timeline, undeploy; returns deploy -> ready seconds."""
    events: list[tuple[float, str]] = []
    polls: dict[str, list[float]] = {}
    saved = {attr: getattr(deploy, attr) for attr in ("preflight", "serve_details", "_check_resources", "start_app",
                                                      "app_status") if hasattr(deploy, attr)}
    for attr, label in (("preflight", "preflight checks"), ("serve_details", "Serve's details read"),
                        ("_check_resources", "resources checked"), ("start_app", "app handed to Serve's controller"),
                        ("app_status", "app status read")):
        if hasattr(deploy, attr):
            _timed(events, polls, deploy, attr, label)
    last = [None]

    def progress(current) -> None:
        seen = f"{current.state}, workers {'/'.join(current.workers) or '-'}"
        if seen != last[0]:
            events.append((time.time(), f"status: {seen}"))
            last[0] = seen

    start = time.time()
    try:
        deploy.deploy(spec(server, name, workers), on_progress=progress)
        ready = time.time()
    finally:
        for attr, original in saved.items():
            setattr(deploy, attr, original)
    events += _replica_events(name, workers)
    deploy.undeploy(name)
    print(f"timeline of one deploy ({workers} SaaS workers), seconds from deploy():")
    previous = 0.0
    for when, label in sorted(events):
        at = when - start
        print(f"  {at:6.3f} s (+{(at - previous) * 1e3:4.0f} ms)  {label}")
        previous = max(previous, at)
    print("  calls while waiting: " + "; ".join(f"{label} x{len(took)}, {sum(took) * 1e3:.0f} ms in all"
                                               for label, took in polls.items() if len(took) > 1))
    return ready - start


def bare_serve_app_seconds(workers: int = 2) -> float:
    """A Serve app of `workers` replicas of an empty class, with the same runtime env, deployed to running."""
    from ray import serve

    from byzer_magic.serving.cluster import worker_runtime_env
    from byzer_magic.serving.raydoor import serve_details, start_app

    @serve.deployment(num_replicas=workers, ray_actor_options={"num_cpus": 0.001, "runtime_env": worker_runtime_env()})
    class Bare:
        def __call__(self) -> int:
            return 1

    start = time.perf_counter()
    start_app(Bare.bind(), "bench_bare")
    while serve_details().get("applications", {}).get("bench_bare", {}).get("status") != "RUNNING":
        time.sleep(0.05)
    took = time.perf_counter() - start
    serve.delete("bench_bare")
    return took


@contextlib.contextmanager
def bare_handle() -> Iterator:
    """A one-replica Serve app of an empty class with our workers' runtime env, and its handle: Serve's own floor."""
    from ray import serve

    from byzer_magic.serving.cluster import worker_runtime_env
    from byzer_magic.serving.raydoor import serve_details, start_app

    @serve.deployment(ray_actor_options={"num_cpus": 0.001, "runtime_env": worker_runtime_env()})
    class Floor:
        async def ping(self) -> str:
            return "1"

        async def pieces(self):
            yield "1"  # a one-token answer streams its text, then its end, as a worker's does
            yield ""

    start_app(Floor.bind(), "bench_floor")
    while serve_details().get("applications", {}).get("bench_floor", {}).get("status") != "RUNNING":
        time.sleep(0.05)
    try:
        yield serve.get_app_handle("bench_floor")
    finally:
        serve.delete("bench_floor")


def bench_deploy(server, rounds: int = 5) -> None:
    times, first_answer, bare, app = [], [], [], []
    for i in range(rounds):
        bare.append(bare_actor_seconds())
        app.append(bare_serve_app_seconds())
        start = time.perf_counter()
        deploy.deploy(spec(server, f"bench_deploy{i}", 2))
        times.append(time.perf_counter() - start)
        chat.chat(f"bench_deploy{i}", "hi", SHORT)
        first_answer.append(time.perf_counter() - start)
        deploy.undeploy(f"bench_deploy{i}")
    timeline = deploy_timeline(server, "bench_timeline")
    d, f, b, a = (statistics.median(x) for x in (times, first_answer, bare, app))
    print(f"deploy -> ready (2 SaaS workers), median of {rounds}: {d:.2f} s (goal < 2 s; the timeline's: "
          f"{timeline:.2f} s); to first answer {f:.2f} s; each: {', '.join(f'{t:.2f}' for t in times)}")
    print(f"  baselines: a bare 2-replica Serve app {a:.2f} s (ratio {d / a:.2f}x); one bare Ray actor created and "
          f"pinged {b:.2f} s")


async def _direct_once(client) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                  temperature=0, max_tokens=1)
    async for _ in stream:
        pass
    return time.perf_counter() - start


async def _deployed_once(name: str) -> float:
    start = time.perf_counter()
    async for _ in chat.astream(name, MESSAGES, SHORT):
        pass
    return time.perf_counter() - start


async def _whole_once(name: str) -> float:
    start = time.perf_counter()
    await chat.acomplete(name, MESSAGES, SHORT)
    return time.perf_counter() - start


async def _latency_rounds(server, name: str, n: int) -> tuple[list[float], list[float], list[float]]:
    """Direct, streamed-through and whole-through calls, interleaved so noise hits all three."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="bench", max_retries=0)
    direct, streamed, whole = [], [], []
    for _ in range(20):
        await _direct_once(client)
        await _deployed_once(name)
        await _whole_once(name)
    for _ in range(n):
        direct.append(await _direct_once(client))
        streamed.append(await _deployed_once(name))
        whole.append(await _whole_once(name))
    await client.close()
    return direct, streamed, whole


def _sync_deployed(name: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        for _ in chat.stream(name, MESSAGES, SHORT):
            pass
        out.append(time.perf_counter() - start)
    return out


def report(label: str, base: list[float], ours: list[float]) -> None:
    bm, om = statistics.median(base) * 1e3, statistics.median(ours) * 1e3
    b99, o99 = pct(base, 0.99) * 1e3, pct(ours, 0.99) * 1e3
    print(f"  {label}: median {om:.2f} ms vs direct {bm:.2f} ms -> +{om - bm:.2f} ms ({om / bm:.2f}x); "
          f"p99 {o99:.2f} vs {b99:.2f} ms -> +{o99 - b99:.2f} ms")


def bench_latency(server, n: int) -> None:
    server.control(delay=0, short_circuit=False)
    deploy.deploy(spec(server, "bench_latency", 1))
    try:
        direct, streamed, whole = chat.run_on_client_loop(_latency_rounds(server, "bench_latency", n))
        print(f"latency added by a deployment, {n} short chats each (1 token), interleaved; direct = openai client streaming:")
        report("async streamed, on the client loop", direct, streamed)
        report("async whole answer (acomplete), on the client loop", direct, whole)
        sync = _sync_deployed("bench_latency", n)
        report("sync (magic / script path)", direct, sync)
    finally:
        deploy.undeploy("bench_latency")


FLOOR_STREAM = "Serve alone: a streamed handle call to an empty replica, two pieces"
FLOOR_WHOLE = "Serve alone: a handle call to an empty replica"


def _cell_rounds(server, name: str, floor, n: int) -> dict[str, list[float]]:
    """A streamed `%%byzer_chat NAME -o r` cell, each stage under it, and the provider called directly, interleaved.

    The stages nest: the cell = its parsing + the sync stream printed (echo);
    echo = the async stream on the client loop + the hop to the caller's
    thread; the async stream = the provider + Serve's handle and the worker.
    Serve's own floor, the same calls to an empty replica (no provider, no
    worker), is what no path through a Serve replica can go under.
    """
    import io
    from contextlib import redirect_stdout

    import openai
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "byzer_magic")
    client = openai.OpenAI(base_url=server.base_url, api_key="bench", max_retries=0)
    sink = io.StringIO()

    def direct() -> None:
        for _ in client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, temperature=0,
                                                max_tokens=1):
            pass

    def cell() -> None:
        with redirect_stdout(sink):
            shell.run_cell_magic("byzer_chat", f"{name} -o r --temperature 0 --max_tokens 1", "hi")

    front = shell.find_magic("byzer_chat").__self__

    def parse() -> None:
        front.chat_request(f"{name} -o r --temperature 0 --max_tokens 1", "hi")

    def echo() -> None:
        chat.echo(name, MESSAGES, SHORT, out=sink)

    def astream() -> None:
        chat.run_on_client_loop(_deployed_once(name))

    def whole() -> None:
        chat.chat(name, MESSAGES, SHORT)

    async def floor_pieces() -> None:
        async for _ in floor.options(stream=True).pieces.remote():
            pass

    def floor_stream() -> None:
        chat.run_on_client_loop(floor_pieces())

    async def floor_ping() -> None:
        await floor.ping.remote()

    def floor_whole() -> None:
        chat.run_on_client_loop(floor_ping())

    stages = {"direct (sync openai client)": direct, "cell %%byzer_chat -o r": cell, "  parsing the cell": parse,
              "  echo (sync stream, printed)": echo, "  async stream on the client loop": astream,
              "whole answer (chat.chat)": whole, FLOOR_STREAM: floor_stream, FLOOR_WHOLE: floor_whole}
    out: dict[str, list[float]] = {label: [] for label in stages}
    for i in range(20 + n):
        for label, call in stages.items():
            start = time.perf_counter()
            call()
            if i >= 20:
                out[label].append(time.perf_counter() - start)
        sink.seek(0)
        sink.truncate()
    client.close()
    return out


def bench_cell(server, n: int) -> None:
    server.control(delay=0, short_circuit=False)
    deploy.deploy(spec(server, "bench_cell", 1))
    try:
        with bare_handle() as floor:
            found = _cell_rounds(server, "bench_cell", floor, n)
    finally:
        deploy.undeploy("bench_cell")
    base = found.pop("direct (sync openai client)")
    print(f"a chat from a cell, {n} short chats each (1 token), interleaved, against the sync openai client "
          f"streaming from the provider directly (median {statistics.median(base) * 1e3:.2f} ms):")
    for label, times in found.items():
        median = statistics.median(times) * 1e3
        if label.strip() == "parsing the cell" or label in (FLOOR_STREAM, FLOOR_WHOLE):
            print(f"  {label}: {median:.2f} ms (p99 {pct(times, 0.99) * 1e3:.2f} ms)")
            continue
        goal = " (goal <= 2 ms)" if label.startswith(("cell", "whole")) else ""
        print(f"  {label}: +{median - statistics.median(base) * 1e3:.2f} ms over direct{goal} "
              f"(median {median:.2f} ms, p99 {pct(times, 0.99) * 1e3:.2f} ms)")


async def load(call: Callable[[], Awaitable], total: int, clients: int) -> float:
    """Requests per second when `clients` callers share `total` calls of `call`."""
    left = [total]

    async def one_client() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return total / (time.perf_counter() - start)


def bench_throughput(server, delay: float) -> None:
    server.control(delay=delay, short_circuit=True)
    results = {}
    for workers in (1, 2, 4):
        name = f"bench_tp{workers}"
        deploy.deploy(spec(server, name, workers))
        try:
            call = functools.partial(chat.acomplete, name, MESSAGES, SHORT)
            chat.run_on_client_loop(load(call, 2 * workers, 2 * workers))
            server.control(reset=True)
            rate = chat.run_on_client_loop(load(call, int(20 * workers), 3 * workers))
            results[workers] = (rate, server.stats()["max_in_flight"])
        finally:
            deploy.undeploy(name)
    one = results[1][0]
    print(f"throughput, server taking {delay * 1e3:.0f} ms per request, 3 clients per worker:")
    for workers, (rate, peak) in results.items():
        print(f"  {workers} workers: {rate:.2f} req/s = {rate / one:.2f}x one worker "
              f"(goal >= {0.9 * workers:.1f}x); most at once on the server: {peak} (limit {workers})")
    server.control(delay=0, short_circuit=False)


PARTS = ("deploy", "latency", "cell", "throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5, help="deploys to take the median of")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts among {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = args.only.split(",")
    with tiny_server() as server:
        if "deploy" in parts:
            bench_deploy(server, args.rounds)
        if "latency" in parts:
            bench_latency(server, args.requests)
        if "cell" in parts:
            bench_cell(server, args.requests)
        if "throughput" in parts:
            bench_throughput(server, args.delay)


if __name__ == "__main__":
    main()
