"""The tutorial notebooks in examples/, run top to bottom in a real Jupyter kernel.

Each runs as committed (nbclient, the kernel of this environment) against the
test cluster; the checks read what a user would look at: the answer, the
card's widget state, and the cluster afterwards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from byzer_magic.serving import deploy

from .conftest import ROOT, alive_replicas

EXAMPLES = sorted((ROOT / "examples").glob("*.ipynb"))


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            raise AssertionError(f"cell failed: {out['ename']}: {out['evalue']}\n{cell.source}")
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def card_html(client: NotebookClient) -> str:
    """Every HTML widget's current value: what the cards show right now."""
    return json.dumps([state.get("value", "") for state in client.widget_state.values()])


def run_cells(path: Path, workdir: Path, after: dict[int, callable] | None = None) -> tuple:
    notebook = nbformat.read(path, as_version=4)
    shutil.copy(path, workdir / path.name)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
            text_of(cell)
            if after and index in after:
                after[index](client, cell)
    return notebook, client


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stale outputs"


def test_quickstart_runs_and_its_card_reaches_ready(ray_head, tmp_path):
    seen = {}

    def after_deploy(client, cell):
        seen["deployed"] = card_html(client)

    def after_scale(client, cell):
        seen["scaled"] = text_of(cell)

    path = ROOT / "examples" / "01_quickstart.ipynb"
    cells = nbformat.read(path, as_version=4).cells
    deploy_at = next(i for i, c in enumerate(cells) if c.source.startswith("%%byzer_deploy"))
    scale_at = next(i for i, c in enumerate(cells) if c.source.startswith("%byzer_scale"))
    notebook, client = run_cells(path, tmp_path, {deploy_at: after_deploy, scale_at: after_scale})

    assert "tiny_chat" in seen["deployed"] and "ready" in seen["deployed"] and "2 ready / 2 wanted" in seen["deployed"]
    chat_at = next(i for i, c in enumerate(cells) if c.source.startswith("%byzer_chat"))
    answer = text_of(notebook.cells[chat_at]).strip()
    assert answer and text_of(notebook.cells[chat_at + 1]).strip().endswith("length")
    assert "3/3 workers" in seen["scaled"]
    history = text_of(next(c for c in notebook.cells if c.source.startswith("%byzer_history")))
    assert "[2] user: What is my name?" in history and "['user', 'assistant', 'user', 'assistant']" in history
    bench = next(c for c in notebook.cells if c.source.startswith("%byzer_bench"))
    assert "requests_per_s" in text_of(bench) and any("image/png" in o.get("data", {}) for o in bench.outputs)
    assert "tiny_chat undeployed" in text_of(notebook.cells[-1])
    assert deploy.status("tiny_chat").state == "stopped" and alive_replicas("tiny_chat") == []


def test_saas_notebook_runs_without_a_key_against_a_local_server(ray_head, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = ROOT / "examples" / "02_saas_and_openai_endpoint.ipynb"
    notebook, client = run_cells(path, tmp_path)
    everything = "\n".join(text_of(c) for c in notebook.cells if c.cell_type == "code") + card_html(client)
    assert "provider: http://127.0.0.1:" in everything
    assert "running at http://127.0.0.1:8765/v1 (API key required)" in everything
    assert "['my_chat']" in everything or "'my_chat'" in everything
    serve_at = next(i for i, c in enumerate(notebook.cells) if "client.chat.completions.create" in c.source)
    assert text_of(notebook.cells[serve_at]).strip().splitlines()[-1]
    assert "sk-local-server-needs-no-key" not in everything
    assert deploy.status("my_chat").state == "stopped" and alive_replicas("my_chat") == []


LOCAL_NOTEBOOKS = {
    "03_transformers_chat_and_embeddings": (["hf_chat", "tiny_emb"], ["((64,), 1.0", "array([[1.  , 1.  ,"]),
    "04_vllm": (["vllm_chat", "llama_chat"], ["16 answers, 1024 tokens",
                                             "bench figure: vllm_chat (handle), llama_chat (handle)"]),
    "05_deepspeed": (["ds_chat"], ["' length"]),
}


@pytest.mark.parametrize("stem", LOCAL_NOTEBOOKS)
def test_local_backend_notebooks_run_and_their_cards_reach_ready(ray_head, tmp_path, stem):
    names, needles = LOCAL_NOTEBOOKS[stem]
    path = ROOT / "examples" / f"{stem}.ipynb"
    cells = nbformat.read(path, as_version=4).cells
    deploys = [i for i, c in enumerate(cells) if c.source.startswith("%%byzer_deploy")]
    cards: list[str] = []
    notebook, client = run_cells(path, tmp_path, {i: lambda client, cell: cards.append(card_html(client)) for i in deploys})

    assert len(cards) == len(names)
    for name, card in zip(names, cards):
        assert name in card and "1 ready / 1 wanted" in card, card
    chat_at = next(i for i, c in enumerate(cells) if c.source.startswith("%byzer_chat"))
    assert text_of(notebook.cells[chat_at]).strip(), "no answer arrived"
    everything = "\n".join(text_of(c) for c in notebook.cells if c.cell_type == "code")
    for needle in needles:
        assert needle in everything, needle
    for name in names:
        assert deploy.status(name).state == "stopped" and alive_replicas(name) == []
