"""The dependency arrow points one way: the proxy needs nothing of the load generator.

* No module of ``blockproxy`` imports ``loadgen`` at module level, and only the demo and
  the benchmarks import it at all (lazily, inside the functions that need it).
* No module of ``loadgen`` imports ``blockproxy`` or looks it up (the emulator is the
  proxy's independent ground truth; it reads the profiles from its own package data).
* ``blockproxy serve`` imports no ``loadgen`` module, and serves requests where
  ``loadgen`` cannot be imported at all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import blockproxy
import loadgen
from blockproxy.routing.lengths import HINT_HEADER
from loadgen import headers
from loadgen.procs import ChildProcess, free_ports, wait_healthy_blocking
from tests.procs import Emulator, complete, write_backends

BLOCKPROXY = Path(blockproxy.__file__).parent
LOADGEN = Path(loadgen.__file__).parent
#: the only blockproxy modules allowed to use the load generator (lazily)
USES_LOADGEN = {"demo.py", "bench/__init__.py", "bench/overhead.py", "bench/routers.py"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, imported inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def test_blockproxy_imports_loadgen_only_lazily_in_demo_and_benchmarks() -> None:
    offending = []
    for path in sorted(BLOCKPROXY.rglob("*.py")):
        rel = path.relative_to(BLOCKPROXY).as_posix()
        for module, lazy in _imports(path):
            if _top(module) == "loadgen" and (rel not in USES_LOADGEN or not lazy):
                offending.append(f"{rel}: {module}")
    assert offending == []


def test_loadgen_never_imports_or_looks_up_blockproxy() -> None:
    offending = []
    for path in sorted(LOADGEN.rglob("*.py")):
        rel = path.relative_to(LOADGEN).as_posix()
        offending += [f"{rel}: {m}" for m, _ in _imports(path) if _top(m) == "blockproxy"]
        if "find_spec" in path.read_text():
            offending.append(f"{rel}: find_spec")
    assert offending == []


def test_both_packages_name_the_hint_header_alike() -> None:
    assert headers.HINT_HEADER == HINT_HEADER


def test_the_serving_path_loads_no_loadgen_module() -> None:
    serving = sorted(
        "blockproxy." + p.relative_to(BLOCKPROXY).with_suffix("").as_posix().replace("/", ".")
        .removesuffix(".__init__")
        for p in BLOCKPROXY.rglob("*.py")
        if p.relative_to(BLOCKPROXY).as_posix() not in USES_LOADGEN | {"__main__.py"})
    code = ("import importlib, json, sys\n"
            f"for name in {serving!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'loadgen')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert "blockproxy.serve" in serving and "blockproxy.front.app" in serving


def test_serve_works_where_loadgen_cannot_be_imported(tmp_path: Path) -> None:
    # sys.modules[name] = None makes every import of it fail, as if it were uninstalled.
    port = free_ports(1)[0]
    launcher = ("import sys\n"
                "sys.modules['loadgen'] = None\n"
                "from blockproxy.cli import main\n"
                "sys.exit(main(sys.argv[1:]))\n")
    with Emulator(tmp_path, instances=1) as emu:
        backends = write_backends(tmp_path / "backends.yaml",
                                  [{"url": emu.urls[0], "name": "i0"}])
        with ChildProcess([sys.executable, "-c", launcher, "serve", "--backends", str(backends),
                           "--port", str(port)], "proxy-no-loadgen", tmp_path) as proxy:
            url = f"http://127.0.0.1:{port}"
            wait_healthy_blocking([url], [proxy], timeout=20)
            assert complete(url)["usage"]["completion_tokens"] == 4
            assert "No module named 'loadgen'" not in proxy.output()
