"""A newcomer's install: a fresh clone, a fresh virtualenv, ``pip install`` (not editable).

``blockproxy demo`` run from the clone's root uses the installed package (not the source
tree it stands in), and ``blockproxy serve`` keeps working once ``loadgen`` is removed
from the environment, while ``demo`` then says how to install it.  Slow (a fresh build of
the compiled simulator): deselected by default, run by ``.ci/run`` as ``-m install``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from loadgen.procs import ChildProcess, free_ports, wait_healthy_blocking
from tests.procs import ROOT, Emulator, complete, write_backends

pytestmark = pytest.mark.install


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(clone, venv): ``git clone`` of this checkout, installed with ``.[loadgen]``."""
    base = tmp_path_factory.mktemp("install")
    clone, venv = base / "clone", base / "venv"
    done = _run(["git", "clone", "-q", str(ROOT), str(clone)], base, 120)
    assert done.returncode == 0, done.stderr
    done = _run([sys.executable, "-m", "venv", str(venv)], base, 120)
    assert done.returncode == 0, done.stderr
    done = _run([str(venv / "bin" / "pip"), "install", "-q", ".[loadgen]"], clone, 900)
    assert done.returncode == 0, done.stdout + done.stderr
    return clone, venv


def _site_packages(venv: Path) -> Path:
    done = _run([str(venv / "bin" / "python"), "-c",
                 "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv, 30)
    return Path(done.stdout.strip())


def test_demo_runs_from_the_root_of_a_fresh_clone(fresh: tuple[Path, Path], tmp_path: Path):
    clone, venv = fresh
    out = tmp_path / "demo"
    # the default workload: 4 multi-turn sessions (each of one turn or more)
    done = _run([str(venv / "bin" / "blockproxy"), "demo", "--num-requests", "4",
                 "--instances", "1", "--policies", "block", "--time-scale", "2",
                 "--out", str(out)], clone, 300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p99 TTFT" in done.stdout and (out / "demo.png").is_file()
    metrics = json.loads((out / "demo.json").read_text())["runs"][0]["policies"]["block"]
    assert metrics["metrics"]["completed"] >= 4 and metrics["metrics"]["failed"] == 0
    assert metrics["metrics"]["completed"] == len(metrics["metrics"]["per_request"])
    # The installed package has its compiled simulator (asked from outside the clone:
    # ``python -c`` in the clone's root would import the source tree there).
    done = _run([str(venv / "bin" / "python"), "-c",
                 "import blockproxy.simulator as s, blockproxy; print(s.IMPLEMENTATION, "
                 "blockproxy.__file__)"], tmp_path, 30)
    implementation, where = done.stdout.split()
    assert implementation == "c" and Path(where).is_relative_to(_site_packages(venv))


def test_serve_runs_with_loadgen_uninstalled(fresh: tuple[Path, Path], tmp_path: Path):
    clone, venv = fresh
    shutil.rmtree(_site_packages(venv) / "loadgen")
    done = _run([str(venv / "bin" / "blockproxy"), "demo"], clone, 60)
    assert done.returncode != 0 and "pip install 'blockproxy[loadgen]'" in done.stderr
    port = free_ports(1)[0]
    with Emulator(tmp_path, instances=1) as emu:  # this environment's emulator
        backends = write_backends(tmp_path / "backends.yaml",
                                  [{"url": emu.urls[0], "name": "i0"}])
        with ChildProcess([str(venv / "bin" / "blockproxy"), "serve", "--backends",
                           str(backends), "--port", str(port)], "proxy", tmp_path) as proxy:
            url = f"http://127.0.0.1:{port}"
            wait_healthy_blocking([url], [proxy], timeout=30)
            assert complete(url)["usage"]["completion_tokens"] == 4


def test_this_environment_runs_installed_scripts() -> None:
    # The children of the tests themselves run the console scripts of this environment.
    assert (Path(sysconfig.get_path("scripts")) / "blockproxy").is_file()
