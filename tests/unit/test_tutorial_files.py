"""The tutorials as stored: notebooks with the outputs of a complete run and a first cell that
says how to run them at scale; example scripts that answer --help at once. (Executing them is
tests/integration/test_tutorials.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXAMPLES = ["multitask_classification.py", "multitask_qa_summarization.py", "zero_shot_transfer.py"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed(path):
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and "At scale on GPUs" in first
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom in one run: {counts}"
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no plot stored"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--steps", "--out", "--model", "--data"):
        assert option in proc.stdout
    assert "deepspeed --num_gpus 2" in (REPO / "examples" / name).read_text()
