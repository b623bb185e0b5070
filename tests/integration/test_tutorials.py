"""The tutorials run: every notebook top to bottom (nbclient, a fresh kernel, a copy in a scratch
folder) and every example script with its smallest settings as README.md's Tutorials block
gives them, literally (one of them under the real ``deepspeed --num_gpus 2`` launcher).
Running them must leave the checkout as it was."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _checkout_state() -> tuple[dict, set]:
    """The tutorial sources' hashes and what exists under the default output folders."""
    sources = _digest(NOTEBOOKS + sorted((REPO / "examples").glob("*.py")))
    outputs = {str(p) for d in ("runs/tutorials", "runs/examples") for p in (REPO / d).rglob("*")}
    return sources, outputs


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "tools" / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_multitask_basics.ipynb", "02_task_interference_analysis.ipynb",
                                           "03_zero_shot_evaluation.ipynb"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(notebook, tmp_path):
    """A cell error raises (nbclient's CellExecutionError names the cell); the executed copy
    has every code cell's outputs, its plots among them; the checkout is unchanged."""
    before = _checkout_state()
    nb = _runner().execute(notebook, tmp_path / "work", timeout_s=600)
    assert _checkout_state() == before
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= 1, f"{notebook.name}: expected its plots, got none"
    assert (tmp_path / "work" / "out").is_dir()  # everything it wrote went to the scratch folder


@pytest.fixture(scope="module")
def readme_examples(tmp_path_factory):
    """The README's Tutorials block, run literally by ``bash -e`` from a scratch folder that
    sees the checkout's ``examples/`` (outputs under its ``runs/examples/``): one 2-rank
    ``deepspeed`` launch and two single-process runs, at the scripts' smallest settings."""
    from launching import run_tree, user_shell_env
    from test_readme import fenced_blocks

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Tutorials"):]
    block = next(b for b in fenced_blocks(section) if b["lang"] == "bash")
    assert "run literally by tests/integration/test_tutorials.py" in (block["skip"] or "")
    work = tmp_path_factory.mktemp("tutorials")
    (work / "examples").symlink_to(REPO / "examples")
    before = _checkout_state()
    rc, out = run_tree(["bash", "-e", "-o", "pipefail", "-c", block["body"]], 900, cwd=work,
                       env=user_shell_env(work / ".bin"))
    assert rc == 0, f"README.md Tutorials block failed ({rc}):\n{block['body']}\n{out[-6000:]}"
    assert _checkout_state() == before
    return work / "runs" / "examples", out


def test_classification_example_under_deepspeed(readme_examples):
    """Two CPU ranks through the real launcher: rank 0 builds tokenizer and shards, both train
    (ZeRO-3), rank 0 exports, both reload it and score their halves of the examples."""
    runs, out = readme_examples
    folder = runs / "classification"
    assert "validation after 3 steps on 2 rank(s)" in out
    report = json.loads((folder / "eval" / "eval.json").read_text())
    assert report["world_size"] == 2 and len(report["tasks"]) == 2
    for entry in report["tasks"].values():
        assert entry["task_type"] == "classification" and entry["n_examples"] == 6
        assert 0 <= entry["metrics"]["accuracy"] <= 100
    pair_task = [n for n, e in report["tasks"].items() if e["template"].startswith("pair_")]
    assert len(pair_task) == 1  # the sentence-pair task is scored with a pair template
    assert (folder / "export" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (folder / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 3


def test_qa_summarization_example_single_process(readme_examples, tmp_path):
    from megamt.config import load_config

    runs, out = readme_examples
    folder = runs / "qa_summarization"
    assert "validation after 3 steps on 1 rank(s)" in out
    cfg = load_config(folder / "spec.yaml")  # the CLI-equivalent spec: what `megamt train` reads
    types = {n: t.task_type for n, t in cfg.tasks.items()}
    assert sorted(types.values()) == ["extractive_qa", "summarization"]
    report = json.loads((folder / "eval" / "eval.json").read_text())
    assert set(report["tasks"]) == set(types)
    metrics = {n: set(e["metrics"]) for n, e in report["tasks"].items()}
    qa, summ = (next(n for n, t in types.items() if t == k) for k in ("extractive_qa", "summarization"))
    assert {"exact_match", "f1"} <= metrics[qa] and "rougeL" in metrics[summ]
    assert all(e["n_examples"] == 6 for e in report["tasks"].values())
    from megamt.eval.evaluate import load_eval_spec

    assert load_eval_spec(folder / "eval.yaml")["max_examples"] == 6  # what `megamt eval` would read
    printed = subprocess.run([sys.executable, str(REPO / "examples" / "multitask_qa_summarization.py"), "--out",
                              str(tmp_path), "--print-spec"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert "megamt build-shards OUT/spec.yaml" in printed.stdout and "tasks:" in printed.stdout


def test_zero_shot_example_single_process(readme_examples):
    runs, out = readme_examples
    folder = runs / "zero_shot"
    assert "usage: zero_shot_transfer.py" in out  # the block's --help
    assert "zero-shot / supervised" in out
    report = json.loads((folder / "multitask" / "eval" / "eval.json").read_text())
    (name, entry), = report["tasks"].items()
    assert name in ("rte", "nli") and entry["zero_shot"] is True
    assert len(entry["per_template"]) >= 2 and "accuracy" in entry["template_spread"]
    supervised = json.loads((folder / "supervised" / "eval" / "eval.json").read_text())["tasks"][name]
    assert supervised["zero_shot"] is False
    assert entry["supervised"]["accuracy"] == supervised["metrics"]["accuracy"]
    if supervised["metrics"]["accuracy"]:
        assert entry["ratio"]["accuracy"] == pytest.approx(entry["metrics"]["accuracy"] / supervised["metrics"]["accuracy"])
    # the multitask model never trained on the held-out task: its shards do not hold it
    trained = json.loads((folder / "multitask" / "shards" / "manifest.json").read_text())["tasks"]
    assert name not in trained
