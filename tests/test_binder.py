"""binder/ installs what the quickstart needs: a fresh venv built from it alone runs it."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from .conftest import ROOT


@pytest.mark.timeout(2400)  # a machine without llama.cpp's wheel in pip's cache builds it: about 6.5 min
def test_a_fresh_venv_from_binder_files_runs_the_quickstart(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    # No cluster to join: the notebook starts Ray inside its kernel, as on Binder.
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bzb", dir="/tmp")  # Ray socket paths must stay short

    def sh(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    sh(str(python), "-m", "pip", "install", "-q", "-r", "binder/requirements.txt")
    sh("bash", "binder/postBuild")
    out = tmp_path / "quickstart.ipynb"
    sh(str(python), "-c", (
        "import sys, nbformat\n"
        "from nbclient import NotebookClient\n"
        "import byzer_magic\n"
        "nb = nbformat.read('examples/01_quickstart.ipynb', as_version=4)\n"
        f"NotebookClient(nb, timeout=600, kernel_name='python3', resources={{'metadata': {{'path': {str(tmp_path)!r}}}}}).execute()\n"
        f"nbformat.write(nb, {str(out)!r})\n"
    ), timeout=900)
    import nbformat

    cells = nbformat.read(out, as_version=4).cells
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    chat = next(c for c in cells if c.source.startswith("%byzer_chat"))
    assert "".join(o.get("text", "") for o in chat.outputs).strip()
    assert "tiny_chat undeployed" in "".join(o.get("text", "") for o in cells[-1].outputs)
