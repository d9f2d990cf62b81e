"""The quickstart in JupyterLab, in Debian's headless Chromium driven by Playwright.

A user's path: open the notebook, run it down to the first answer, click `+`
on the card and watch the workers rise, click `Stop` and see the deployment
gone from the cluster. Screenshots of the card are kept in
tests/artifacts/ (ignored by git).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from byzer_magic import deploy

from .conftest import ROOT, alive_replicas, free_port, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "browser-test-token"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it",
)


@pytest.fixture
def lab(ray_head, tmp_path):
    """JupyterLab on 127.0.0.1 with a copy of the quickstart; kernels join the test cluster."""
    shutil.copy(ROOT / "examples" / "01_quickstart.ipynb", tmp_path)
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.allow_root=True",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", timeout=2)
            return True
        except OSError:
            return False

    try:
        wait_until(up, 120, "JupyterLab")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_quickstart_in_a_real_browser_plus_then_stop(lab):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)

    ARTIFACTS.mkdir(exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(f"{lab}/lab/tree/01_quickstart.ipynb?token={TOKEN}")
            cells = page.locator(".jp-Notebook .jp-Cell")
            expect(cells.first).to_be_visible()
            expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelStatus").first).to_be_visible()
            time.sleep(2)
            dialog = page.locator(".jp-Dialog")
            if dialog.count():
                raise AssertionError(f"JupyterLab asked: {dialog.inner_text()}")
            page.locator(".jp-Notebook .jp-Cell").first.click()
            chat_cell = page.locator(".jp-CodeCell", has_text="%byzer_chat").first
            # Shift+Enter queues cells faster than they run: press it exactly as often as there
            # are cells up to the chat, so the scale and undeploy cells below never run.
            import nbformat

            source = nbformat.read(ROOT / "examples" / "01_quickstart.ipynb", as_version=4).cells
            upto = next(i for i, c in enumerate(source) if c.source.startswith("%byzer_chat"))
            for _ in range(upto + 1):
                page.keyboard.press("Shift+Enter")
                time.sleep(0.3)
            card = page.locator(".widget-vbox", has=page.locator("button", has_text="Stop")).first
            expect(card).to_contain_text("2 ready / 2 wanted", timeout=180_000)
            expect(card.locator(".widget-html").first).to_contain_text("ready", timeout=60_000)
            expect(chat_cell.locator(".jp-OutputArea-output").first).not_to_be_empty(timeout=120_000)
            card.scroll_into_view_if_needed()
            card.screenshot(path=str(ARTIFACTS / "card_ready.png"))

            clicked = time.monotonic()
            card.locator("button", has_text="+").click()
            wait_until(lambda: deploy.status("tiny_chat").workers_ready == 3, 120, "a third worker")
            expect(card).to_contain_text("3 ready / 3 wanted", timeout=60_000)
            print(f"\n+ clicked -> third worker ready on the card: {time.monotonic() - clicked:.1f} s")
            card.screenshot(path=str(ARTIFACTS / "card_scaled.png"))
            assert len(alive_replicas("tiny_chat")) == 3

            card.locator("button", has_text="Stop").click()
            expect(card).to_contain_text("stopped", timeout=120_000)
            card.screenshot(path=str(ARTIFACTS / "card_stopped.png"))
            assert deploy.status("tiny_chat").state == "stopped"
            wait_until(lambda: alive_replicas("tiny_chat") == [], 60, "the workers to go")
            for button in ("+", "-", "Stop"):
                expect(card.locator("button", has_text=button).first).to_be_disabled()
        finally:
            browser.close()
            if deploy.status("tiny_chat").state != "stopped":
                deploy.undeploy("tiny_chat")
