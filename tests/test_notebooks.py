"""Every notebook runs top to bottom (nbclient) on small inputs."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, params: str, cwd: Path) -> nbformat.NotebookNode:
    root = str(NOTEBOOKS.parent)  # the kernel imports this checkout even where it is not installed
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = params
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_what_if(tmp_path):
    nb = run_notebook("what_if.ipynb", 'PROFILE = "a100-40gb"\nMODEL = "llada2-mini"\nGEN_LENGTH = 32\n'
                      'GPU_MEM_GB = 16\nKNOB = "pcie"\nKNOB_VALUES = [1.0, 2.0]\nTAUS = (1, 4)\n'
                      'HOST_MEM_GB = [12]\nDRIVE = "gen5"', tmp_path)
    assert _images(nb) >= 4 and "tide tau=1" in _text(nb)
    assert "drive_gb_per_forward" in _text(nb)  # 12 GB of host memory: the rest of mini's experts from the drive


def test_trace_explorer(tmp_path):
    nb = run_notebook("trace_explorer.ipynb", 'TRACE = None\nMODEL = "llada2-mini"\nGEN_LENGTH = 64\n'
                      'GAPS = (1, 2)\nTAUS = (1, 4)\nBUDGETS = (32, 128)', tmp_path)
    assert _images(nb) >= 3 and "top 1/8 of experts carry" in _text(nb)


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_validation(tmp_path, validated, fmt):
    result = validated["result"]
    if fmt == "parquet":  # the same result as Parquet, as --out x.parquet writes it
        import json

        import pandas as pd

        from experiments.validate import write
        d = json.loads(result.read_text())
        result = tmp_path / "v.parquet"
        write(str(result), pd.DataFrame(d["runs"]), pd.DataFrame(d["rounds"]), d["provenance"])
    nb = run_notebook("validation.ipynb", f'RESULT = "{result}"', tmp_path)
    assert _images(nb) >= 2 and "tokens agree for every policy: True" in _text(nb)


def test_validation_with_its_default_input(tmp_path, validated):
    """``RESULT = None`` reads the tiny loop's result in this checkout (``out/loop``). Where it
    is missing, the session's loop (the ``validated`` fixture: the same five steps) is put
    there first, so the suite runs the loop once (the notebook would run it if missing)."""
    import shutil
    loop_dir = NOTEBOOKS.parent / "out" / "loop"
    if not (loop_dir / "validation.json").is_file():
        loop_dir.mkdir(parents=True, exist_ok=True)
        for key, name in (("checkpoint", "tiny"), ("trace", "t.parquet"), ("profile", "box.json"), ("plan", "plan.json"),
                          ("result", "validation.json")):
            src, dst = Path(validated[key]), loop_dir / name
            if not dst.exists():
                shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    nb = run_notebook("validation.ipynb", "RESULT = None", tmp_path)
    assert "out/loop/validation.json" in _text(nb) and "tokens agree for every policy: True" in _text(nb)


def test_serving(tmp_path):
    nb = run_notebook("serving.ipynb", 'PROFILE = "a100-40gb"\nMODEL = "llada2-mini"\nREQUESTS = 4\n'
                      'GEN_LENGTHS = "32"\nPROMPT_LENGTHS = "32:64"\nGPU_EXPERTS = 64\nTAU = 4\n'
                      'BATCH_SIZES = [1, 4]\nRATE_BATCH = 4\nRATES = [0.5, 4.0]\nSEED = 0', tmp_path)
    assert _images(nb) >= 2 and "tide B=64 tau=4" in _text(nb)
