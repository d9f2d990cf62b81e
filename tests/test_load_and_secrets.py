"""Sustained load answered exactly once within worker limits; a key found nowhere it should not be."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import psutil
from IPython.core.interactiveshell import InteractiveShell

from byzer_magic.serving import chat, deploy, raydoor
from byzer_magic.backends.base import GenParams
from byzer_magic.spec.deploy_spec import parse_args
from byzer_magic.frontends.widgets import StatusCard

from .conftest import alive_replicas
from .test_deploy_saas import saas_spec

SHORT = GenParams(temperature=0, max_tokens=2)


def rss_mb(pids: list[int]) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


async def _clients(name: str, total: int, clients: int) -> list[str]:
    pending = list(range(total))
    answers: list[str] = []

    async def client() -> None:
        while pending:
            pending.pop()
            deltas = await chat.acomplete(name, [{"role": "user", "content": "hi"}], SHORT)
            answers.append("".join(d.text for d in deltas))

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


def test_1000_chats_from_64_clients_on_4_workers(ray_head, clean_server, capsys):
    deploy.deploy(saas_spec(clean_server, "loaded", 4))
    try:
        clean_server.control(short_circuit=True, delay=0.01)
        chat.run_on_client_loop(_clients("loaded", 64, 64))
        workers = [a.pid for a in alive_replicas("loaded")]
        before = (rss_mb([os.getpid()]), rss_mb(workers))
        clean_server.control(reset=True)
        answers = chat.run_on_client_loop(_clients("loaded", 1000, 64))
        after = (rss_mb([os.getpid()]), rss_mb(workers))
        seen = clean_server.stats()
        assert len(answers) == 1000 and all(a == "ok" for a in answers)
        assert seen["requests"] == 1000, "each chat reached the provider exactly once"
        assert seen["max_in_flight"] <= 4, "never more than 4 workers x 1 request"
        assert after[0] - before[0] < 64 and after[1] - before[1] < 64, (before, after)
        with capsys.disabled():
            print(f"\n1000 chats / 64 clients / 4 workers: driver RSS {before[0]:.0f} -> {after[0]:.0f} MiB, "
                  f"workers {before[1]:.0f} -> {after[1]:.0f} MiB, most at once {seen['max_in_flight']}")
    finally:
        clean_server.control(short_circuit=False, delay=0)
        deploy.undeploy("loaded")


def test_a_key_given_three_ways_appears_nowhere(ray_head, clean_server, tmp_path, capfd):
    """Flag, ${VAR} and YAML: grep output, reprs, errors, cards, Serve's state, actors and the cluster's logs."""
    from ray.util.state import list_actors

    keys = {"flag": "sk-flag-3f9a1c7e5b2d4e6f", "env": "sk-env-8b1d3a5c7e9f0a2b", "yaml": "sk-yaml-4c6e8a0b2d4f6a8c"}
    os.environ["SECRET_FROM_ENV"] = keys["env"]
    (tmp_path / "s.yaml").write_text(json.dumps({"infer_params": {"saas.api_key": keys["yaml"]}}))
    common = ["--pretrained_model_type", "saas/openai", "--infer_params", "saas.model=tiny",
              f"saas.base_url={clean_server.base_url}"]
    specs = {
        "flag": parse_args(["--model", "key_flag", *common, f"saas.api_key={keys['flag']}"]),
        "env": parse_args(["--model", "key_env", *common, "saas.api_key=${SECRET_FROM_ENV}"]),
        "yaml": parse_args(["--model", "key_yaml", "--file", str(tmp_path / "s.yaml"), *common]),
    }
    texts = []
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "byzer_magic")
    try:
        for how, spec in specs.items():
            assert spec.params.api_key.get_secret_value() == keys[how]
            texts += [repr(spec), str(spec), str(spec.describe()), repr(deploy.deploy(spec))]
            texts.append(chat.chat(spec.name, "hi", SHORT).text)
        clean_server.control(fail_next=3, fail_status=401)
        for spec in specs.values():
            try:
                chat.chat(spec.name, "hi", SHORT)
            except Exception as exc:  # noqa: BLE001 - the text of whatever is raised is what is checked
                texts += [str(exc), repr(exc)]
        ip.run_cell("%byzer_list")
        ip.run_cell("%byzer_status key_env")
        ip.run_cell(f"%%byzer_deploy\n--model key_bad --infer_params saas.api_key={keys['flag']} saas.modle=x "
                    "--pretrained_model_type saas/openai")
        texts.append("".join(capfd.readouterr()))
        for spec in specs.values():
            card = StatusCard(deploy.status(spec.name))
            texts.append(json.dumps([w.get_state() for w in (card.title, card.body, card.error)], default=str))
        texts.append(json.dumps(raydoor.serve_details(), default=str))
        texts.append(repr(list_actors(detail=True, limit=10000)))
    finally:
        clean_server.control(fail_next=0)
        for spec in specs.values():
            deploy.undeploy(spec.name)
    logs = [p for p in Path(ray_head.temp_dir).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt")]
    assert logs, "the cluster's logs were found"
    everything = "\n".join(texts)
    for key in keys.values():
        assert key not in everything
        assert key[3:15] not in everything
        for log in logs:
            assert key.encode() not in log.read_bytes(), log


def test_a_key_on_the_command_line_leaves_ps_and_the_job_table(ray_head):
    """The shell expands ${KEY} before byzer-magic starts; once it runs, `ps` and Ray's job table show *** instead."""
    import subprocess
    import sys
    import time

    from ray.util.state import list_jobs

    from byzer_magic.openai import gateway

    from .conftest import ROOT, free_port

    key = "sk-cmdline-7d2f9b4e1a6c3e8f"
    proc = subprocess.Popen([sys.executable, "-m", "byzer_magic.frontends.cli", "serve", "--port", str(free_port()),
                             "--api_key", key], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while proc.poll() is None:
        try:
            seen.append(Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    try:
        assert proc.returncode == 0, err
        hidden = [i for i, line in enumerate(seen) if "***" in line]
        assert hidden, f"the command line was never rewritten: {seen[-1:]}"
        assert all(key not in line for line in seen[hidden[0]:])
        jobs = repr(list_jobs(detail=True, limit=10000))
        assert "byzer_magic.frontends.cli" in jobs or "byzer-magic" in jobs, "the CLI's driver is in the job table"
        assert key not in jobs and key not in out + err
    finally:
        gateway.stop()
