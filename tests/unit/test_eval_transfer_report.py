"""Transfer report from run summaries: differences, zero-shot ratios, resources, cosine heatmap."""

import json
import math

import pytest

from megamt.experiments.transfer import aggregate, markdown_report, plan_runs, write_experiment_report


def _summary(out, name, tasks, params, seconds, peak, steps):
    d = out / "runs" / name
    d.mkdir(parents=True)
    (d / "run_summary.json").write_text(json.dumps({
        "train_seconds": seconds, "peak_memory_gib": peak, "parameters": params, "steps": steps, "world_size": 2,
        "eval": {"tasks": {t: {"task_type": tt, "n_examples": 10, "metrics": m} for t, (tt, m) in tasks.items()}}}))
    return d


def test_aggregate_diff_ratio_resources_and_cosines(tmp_path):
    spec = {"spec_path": "exp.yaml", "base": "base.yaml", "tasks": ["a", "b"], "held_out": ["c"],
            "steps_per_task": 5, "multitask": {"mix": []}, "out": str(tmp_path), "launcher": "python"}
    runs = plan_runs(spec)
    assert [r["name"] for r in runs] == ["single-a", "single-b", "single-c", "multitask-mix"]
    assert runs[-1]["max_steps"] == 10 and runs[-1]["train_tasks"] == ["a", "b"]
    assert runs[-1]["eval_tasks"] == ["a", "b", "c"]
    _summary(tmp_path, "single-a", {"a": ("classification", {"accuracy": 80.0, "macro_f1": 70.0})}, 100, 10.0, 1.0, 5)
    _summary(tmp_path, "single-b", {"b": ("extractive_qa", {"f1": 50.0, "exact_match": 40.0})}, 100, 12.0, 1.5, 5)
    _summary(tmp_path, "single-c", {"c": ("summarization", {"rougeL": 20.0})}, 100, 11.0, 1.2, 5)
    d = _summary(tmp_path, "multitask-mix", {"a": ("classification", {"accuracy": 85.0, "macro_f1": 75.0}),
                                             "b": ("extractive_qa", {"f1": 45.0, "exact_match": 30.0}),
                                             "c": ("summarization", {"rougeL": 5.0})}, 120, 25.0, 2.0, 10)
    (d / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "train/loss/a": 1.0, "train/loss/b": 2.0, "grad/cos/a/b": -0.2},
        {"step": 2, "train/loss/a": 0.8, "train/loss/b": 1.5, "grad/cos/a/b": 0.4}]) + "\n")
    rep = aggregate(spec, runs)
    rows = {r["task"]: r for r in rep["tasks"]}
    assert rows["a"]["diff"]["mix"] == pytest.approx(5.0) and rows["b"]["diff"]["mix"] == pytest.approx(-5.0)
    assert rows["b"]["metric"] == "f1"
    assert rows["c"]["held_out"] and rows["c"]["ratio"]["mix"] == pytest.approx(0.25)
    res = {r["configuration"]: r for r in rep["resources"]}
    assert res["single-task"] == {"configuration": "single-task", "models": 3, "steps": 15, "train_seconds": 33.0,
                                  "peak_memory_gib": 1.5, "parameters_stored": 300, "world_size": 2}
    assert res["multitask (mix)"]["models"] == 1 and res["multitask (mix)"]["parameters_stored"] == 120
    assert rep["cosines"]["mix"] == [[1.0, pytest.approx(0.1)], [pytest.approx(0.1), 1.0]]  # mean of -0.2, 0.4
    assert rep["curves"]["multitask-mix"]["b"] == [(1, 2.0), (2, 1.5)]
    md = markdown_report(rep)
    assert "| a | accuracy | 10 | 80.00 | 85.00 | +5.00 |" in md
    assert "c (held out: zero-shot)" in md and "c mix 0.250" in md
    write_experiment_report(rep, tmp_path)
    for png in ("scores.png", "loss_curves.png", "grad_cosine.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_missing_run_is_named(tmp_path):
    spec = {"tasks": ["a", "b"], "held_out": [], "steps_per_task": 1, "multitask": {"m": []}, "out": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match="single-a"):
        aggregate(spec, plan_runs(spec))


def test_cosines_read_back_from_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from megamt.experiments.transfer import _read_cosines

    w = SummaryWriter(str(tmp_path / "tensorboard"))
    for step, v in ((1, 0.5), (2, -0.1)):
        w.add_scalar("grad/cos/a/c", v, step)
    w.close()
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "train/loss/a": 1.0}) + "\n")
    mat = _read_cosines(tmp_path, ["a", "b", "c"])
    assert mat[0][2] == pytest.approx(0.2) and mat[2][0] == pytest.approx(0.2)
    assert math.isnan(mat[0][1]) and mat[1][1] == 1.0  # b never measured against a: NaN, not 0
