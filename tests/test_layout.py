"""The project's shape: imports go one way, and runtime/traces need no simulator packages."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[str]:
    out = set()
    for f in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module.split(".")[0])
    return out


def test_imports_go_one_way():
    assert not {"runtime", "sim", "experiments"} & _imports("traces")
    assert not {"sim", "experiments"} & _imports("runtime")
    assert not {"runtime", "experiments"} & _imports("sim")


def test_traces_and_runtime_import_without_simulator_packages():
    code = ("import sys\n"
            "for m in ('simpy', 'pyomo', 'highspy'): sys.modules[m] = None\n"
            "import pkgutil, importlib, traces, runtime\n"
            "for pkg in (traces, runtime):\n"
            "    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(mod.name)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
