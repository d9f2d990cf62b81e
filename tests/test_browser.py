"""The quickstart in JupyterLab, in Debian's headless Chromium driven by Playwright.

A user's path: open the notebook, run it down to the first answer, click `+`
on the card and watch the workers rise, click `Stop` and see the deployment
gone from the cluster. Screenshots of the card are kept in
tests/artifacts/ (ignored by git).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from byzer_magic.serving import deploy

from .conftest import ROOT, alive_replicas, free_port, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "browser-test-token"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it",
)


def _jupyter(app: str, tmp_path: Path, theme: str | None = None):
    """A Jupyter server app on 127.0.0.1 with a copy of the quickstart; kernels join the test cluster."""
    shutil.copy(ROOT / "examples" / "01_quickstart.ipynb", tmp_path)
    port = free_port()
    settings = tmp_path / "settings"
    if theme:
        themes = settings / "@jupyterlab" / "apputils-extension"
        themes.mkdir(parents=True)
        (themes / "themes.jupyterlab-settings").write_text(f'{{"theme": "{theme}"}}')
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    proc = subprocess.Popen(
        [sys.executable, "-m", app, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
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
        wait_until(up, 120, app)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def lab(ray_head, tmp_path):
    yield from _jupyter("jupyterlab", tmp_path)


@pytest.fixture
def notebook7_dark(ray_head, tmp_path):
    yield from _jupyter("notebook", tmp_path, theme="JupyterLab Dark")


FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def run_quickstart_until(page, url: str, magic: str) -> None:
    """Open the quickstart and press Shift+Enter once per cell down to the first cell starting with `magic`.

    Shift+Enter queues cells faster than they run, so it is pressed exactly
    that often and the cells below never run.
    """
    import nbformat
    from playwright.sync_api import expect

    page.goto(url)
    cells = page.locator(".jp-Notebook .jp-Cell")
    expect(cells.first).to_be_visible()
    expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelStatus, .jp-KernelStatus").first
           ).to_be_attached()
    time.sleep(2)
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        raise AssertionError(f"Jupyter asked: {dialog.inner_text()}")
    cells.first.click()
    source = nbformat.read(ROOT / "examples" / "01_quickstart.ipynb", as_version=4).cells
    upto = next(i for i, c in enumerate(source) if c.source.startswith(magic))
    for _ in range(upto + 1):
        page.keyboard.press("Shift+Enter")
        time.sleep(0.3)


@contextlib.contextmanager
def quickstart_page(width: int, height: int) -> Iterator:
    """A headless Chromium page; afterwards the browser is closed and the quickstart's deployment is gone."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(120_000)
            yield page
        finally:
            browser.close()
            if deploy.status("tiny_chat").state != "stopped":
                deploy.undeploy("tiny_chat")


def test_quickstart_in_a_real_browser_plus_then_stop(lab):
    from playwright.sync_api import expect

    with quickstart_page(1400, 1000) as page:
        run_quickstart_until(page, f"{lab}/lab/tree/01_quickstart.ipynb?token={TOKEN}", "%byzer_chat")
        chat_cell = page.locator(".jp-CodeCell", has_text="%byzer_chat").first
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


def _luminance(css: str) -> float:
    r, g, b = (int(x) / 255 for x in css[css.index("(") + 1:css.index(")")].split(",")[:3])
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_the_card_in_classic_notebook_7_with_the_dark_theme(notebook7_dark):
    """Notebook 7's own UI, dark theme: the card must be readable and work.

    Readable is WCAG's contrast against the notebook's background: 4.5 for
    text, 3 for the coloured state (large, bold text's threshold).
    """
    from playwright.sync_api import expect

    with quickstart_page(1200, 900) as page:
        run_quickstart_until(page, f"{notebook7_dark}/notebooks/01_quickstart.ipynb?token={TOKEN}", "%%byzer_deploy")
        assert page.locator("body").get_attribute("data-jp-theme-light") == "false", "the dark theme is not on"
        card = page.locator(".widget-vbox", has=page.locator("button", has_text="Stop")).first
        expect(card).to_contain_text("2 ready / 2 wanted", timeout=180_000)
        card.scroll_into_view_if_needed()
        card.screenshot(path=str(ARTIFACTS / "card_notebook7_dark.png"))
        background = page.locator(".jp-Notebook").first.evaluate("e => getComputedStyle(e).backgroundColor")
        for what, element, least in (("text", card.locator(".widget-html").nth(1), 4.5),
                                     ("state", card.locator("span", has_text="ready").first, 3.0)):
            color = element.evaluate("e => getComputedStyle(e).color")
            light, dark = sorted((_luminance(color), _luminance(background)), reverse=True)
            contrast = (light + 0.05) / (dark + 0.05)
            assert contrast >= least, f"card {what} {color} on {background}: contrast {contrast:.1f}"
        card.locator("button", has_text="Stop").click()
        expect(card).to_contain_text("stopped", timeout=120_000)
        assert deploy.status("tiny_chat").state == "stopped"
