"""Experiment specs, planning, resume bookkeeping and result tables (no training runs)."""

import csv
import json

import pytest
import yaml

from megamt.config import ConfigError, load_config
from megamt.experiments.runner import (ExperimentError, PlannedRun, plan_runs, prepare_run, read_tokens,
                                       restrict_tasks, run_state, write_results)
from megamt.experiments.spec import ExperimentSpec, HpoSpec, PairsSpec, load_spec, override_text


def write_base(root):
    base = {"tasks": {
        "a": {"task_type": "classification", "inputs": {"train": {"path": "a.tsv"}}},
        "b": {"task_type": "ner", "inputs": {"train": {"path": "b.conll"}}},
        "c": {"task_type": "extractive_qa", "inputs": {"train": {"path": "c.json"}}}},
        "model": {"from_config": {"model_type": "llama"}},
        "mixture": {"phases": [{"start_step": 0, "tasks": ["a"]}, {"start_step": 5, "tasks": ["a", "b"],
                                                                   "weights": {"b": 2.0}}]},
        "gradients": {"static_weights": {"b": 0.5}},
        "train": {"max_steps": 10}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    return root / "base.yaml"


def write_spec(root, **fields):
    write_base(root)
    (root / "exp.yaml").write_text(yaml.safe_dump({"base": "base.yaml", **fields}, sort_keys=False))
    return root / "exp.yaml"


def test_spec_errors_name_every_key(tmp_path):
    path = write_spec(tmp_path, grid={"train.lr": "0.1"}, launch={"launcher": "mpirun", "num_gpus": "two"},
                      runz=[], out=3)
    with pytest.raises(ConfigError) as e:
        load_spec(ExperimentSpec, path)
    text = str(e.value)
    for needle in ("grid.train.lr: expected a list", "launch.launcher: 'mpirun' is not one of",
                   "launch.num_gpus: expected an integer", "runz: unknown config key", "out: expected a string"):
        assert needle in text, (needle, text)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"base": "nope.yaml"}))
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_spec(ExperimentSpec, tmp_path / "bad.yaml")


def test_grid_times_named_runs_with_unique_names(tmp_path):
    spec = load_spec(ExperimentSpec, write_spec(
        tmp_path, overrides=["train.max_steps=3"], grid={"train.lr": [0.001, 0.0003], "gradients.method": ["none", "pcgrad"]},
        runs=[{"name": "t2", "overrides": ["mixture.temperature=2"]}, {"overrides": ["mixture.temperature=4"]}]))
    runs = plan_runs(spec)
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].name == "t2_lr=0.001_method=none"
    assert runs[0].overrides == ["mixture.temperature=2", "train.lr=0.001", "gradients.method=none"]
    assert runs[4].name == "temperature=4_lr=0.001_method=none"
    assert spec.out == str(tmp_path / "experiment_out") and spec.base == str(tmp_path / "base.yaml")
    # every override parses back to the value it came from
    for key, value in (("train.lr", 3e-4), ("train.betas", [0.9, 0.99]), ("gradients.method", "pcgrad"),
                       ("train.prefetch", False)):
        cfg = load_config(tmp_path / "base.yaml", [override_text(key, value)])
        section, attr = key.split(".")
        assert getattr(getattr(cfg, section), attr) == value


def test_restrict_tasks_cuts_phases_weights_and_marks_zero_shot(tmp_path):
    cfg = load_config(write_base(tmp_path))
    one = restrict_tasks(cfg, ["a"])
    assert list(one.tasks) == ["a"] and [p.tasks for p in one.mixture.phases] == [["a"]]
    assert one.gradients.static_weights == {}
    two = restrict_tasks(cfg, ["a", "b"], eval_tasks=["c"])
    assert list(two.tasks) == ["a", "b", "c"] and two.tasks["c"].zero_shot and not two.tasks["b"].zero_shot
    assert two.mixture.phases[1].weights == {"b": 2.0}
    with pytest.raises(ConfigError, match="not in the base config"):
        restrict_tasks(cfg, ["zzz"])


def test_prepare_run_refuses_a_changed_config_and_states(tmp_path):
    spec = load_spec(ExperimentSpec, write_spec(tmp_path))
    out = tmp_path / "out"
    d = prepare_run(spec, PlannedRun("r", ["train.lr=0.01"], tasks=["a", "b"]), out)
    assert load_config(d / "config.yaml").train.run_dir == str(d)
    assert json.loads((d / "run.json").read_text())["tasks"] == ["a", "b"]
    assert run_state(d) == "new"
    prepare_run(spec, PlannedRun("r", ["train.lr=0.01"], tasks=["a", "b"]), out)  # same: fine
    with pytest.raises(ExperimentError, match="differs from what the spec resolves to"):
        prepare_run(spec, PlannedRun("r", ["train.lr=0.02"], tasks=["a", "b"]), out)
    # written by an older megamt: a section added since is absent from the file (its defaults)
    import yaml

    on_disk = yaml.safe_load((d / "config.yaml").read_text())
    del on_disk["meta"]
    (d / "config.yaml").write_text(yaml.safe_dump(on_disk, sort_keys=False))
    prepare_run(spec, PlannedRun("r", ["train.lr=0.01"], tasks=["a", "b"]), out)  # not a change
    with pytest.raises(ExperimentError, match=r"(?s)differs from what the spec.*\+  lr: 0\.02"):
        prepare_run(spec, PlannedRun("r", ["train.lr=0.02"], tasks=["a", "b"]), out)
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "latest").write_text("step_00000004")
    assert run_state(d) == "partial"
    (d / "run_summary.json").write_text("{}")
    assert run_state(d) == "done"


def test_tokens_count_a_replayed_step_once(tmp_path):
    recs = [{"step": 1, "train/loss": 1.0, "perf/tokens_per_s": 100.0, "perf/step_time_s": 2.0},
            {"step": 2, "train/loss": 1.0, "perf/tokens_per_s": 50.0, "perf/step_time_s": 2.0},
            {"step": 2, "eval": {"a": 1.0}},
            {"step": 2, "train/loss": 1.0, "perf/tokens_per_s": 60.0, "perf/step_time_s": 2.0}]  # resumed: step 2 again
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert read_tokens(tmp_path) == (320, 2)


def test_results_table_csv_and_markdown(tmp_path):
    rows = [{"run": "x", "status": "complete", "overrides": "train.lr=0.1", "steps": 4, "tokens": 1000,
             "wall_seconds": 12.5, "peak_memory_gib": 1.25, "metrics": {"a/accuracy": 50.0, "b/entity_f1": 10.0}},
            {"run": "y", "status": "failed", "overrides": "", "steps": 1, "tokens": 10, "wall_seconds": 3.0,
             "peak_memory_gib": None, "metrics": {}}]
    csv_path, md_path = write_results(rows, tmp_path)
    table = list(csv.DictReader(csv_path.open()))
    assert table[0]["a/accuracy"] == "50.0" and table[1]["a/accuracy"] == "" and table[1]["status"] == "failed"
    md = md_path.read_text()
    assert "| x | complete | `train.lr=0.1` | 50.00 | 10.00 | 1000 | 4 | 12.50 | 1.25 |" in md
    assert "| y | failed | – | – | – | 10 | 1 | 3.00 | – |" in md


def test_hpo_spec_checks_space_objective_and_pruner(tmp_path):
    from megamt.experiments.hpo import check_spec

    path = write_spec(tmp_path, overrides=["train.eval_every=0"], hpo={
        "space": {"data.seq_len": {"type": "int", "low": 4, "high": 64},
                  "train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                  "gradients.method": {"type": "categorical", "choices": ["pcgrad", "nosuch"]},
                  "train.nope": {"type": "float", "low": 0, "high": 1}},
        "objective": {"metric": "rougeL", "tasks": ["a", "zz"]}, "enqueue": [{"train.lr": 1e-3, "train.x": 1}]})
    with pytest.raises(ConfigError, match=r"hpo.enqueue.0.train.x: not a key of hpo.space"):
        load_spec(HpoSpec, path)
    raw = yaml.safe_load(path.read_text())
    raw["hpo"]["enqueue"] = []
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(HpoSpec, path)
    with pytest.raises(ConfigError) as e:
        check_spec(spec)
    text = str(e.value)
    for needle in ("hpo.space.data.seq_len=4: data.seq_len: must be >= 8", "hpo.space.gradients.method='nosuch'",
                   "hpo.space.train.nope=0.0: train.nope: unknown config key", "'zz' is not a training task",
                   "task 'a' (classification) has no metric 'rougeL'", "set train.eval_every"):
        assert needle in text, (needle, text)
    bad = write_spec(tmp_path, hpo={"space": {"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}})
    with pytest.raises(ConfigError, match="low: must be > 0 with log: true"):
        load_spec(HpoSpec, bad)


def test_objective_value_mean_worst_and_missing():
    from megamt.experiments.hpo import ObjectiveError, objective_value

    results = {"tasks": {"a": {"task_type": "classification", "metrics": {"accuracy": 80.0, "macro_f1": 70.0}},
                         "b": {"task_type": "ner", "metrics": {"entity_f1": 40.0}}}}
    prim = {"metric": "primary", "reduce": "mean", "direction": "maximize"}
    assert objective_value(prim, ["a", "b"], None, results) == 60.0
    assert objective_value({**prim, "reduce": "worst"}, ["a", "b"], None, results) == 40.0
    loss = {"metric": "loss", "reduce": "worst", "direction": "minimize"}
    assert objective_value(loss, ["a", "b"], {"a": 1.0, "b": 2.5}, None) == 2.5
    with pytest.raises(ObjectiveError, match="task 'b' has no metric 'macro_f1'"):
        objective_value({**prim, "metric": "macro_f1"}, ["a", "b"], None, results)
    with pytest.raises(ObjectiveError, match="eval.during_training"):
        objective_value(prim, ["a"], {"a": 1.0}, None)


def test_pairs_plan_same_budget_per_task(tmp_path):
    from megamt.experiments.pairs import AFFINITY_RUN, pairs_tasks, plan_pairs

    spec = load_spec(PairsSpec, write_spec(tmp_path, tasks=["a", "b", "c"], steps_per_task=5, affinity_every=2))
    runs = plan_pairs(spec, pairs_tasks(spec))
    names = [r.name for r in runs]
    assert names == ["single-a", "single-b", "single-c", "pair-a+b", "pair-a+c", "pair-b+c", AFFINITY_RUN]
    assert runs[0].overrides == ["train.max_steps=5"] and runs[3].overrides == ["train.max_steps=10"]
    assert runs[-1].overrides == ["train.max_steps=15", "gradients.affinity_every=2"]
    two = plan_pairs(spec, ["a", "b"])  # two tasks: the pair run is the all-task run and measures the affinity
    assert [r.name for r in two] == ["single-a", "single-b", "pair-a+b"]
    assert two[-1].overrides == ["train.max_steps=10", "gradients.affinity_every=2"]
    bad = load_spec(PairsSpec, write_spec(tmp_path, tasks=["a", "zz"]))
    with pytest.raises(ConfigError, match="unknown: \\['zz'\\]"):
        pairs_tasks(bad)


@pytest.mark.parametrize("name,cls", [("pairs_demo.yaml", PairsSpec), ("hpo_demo.yaml", HpoSpec),
                                      ("grid_demo.yaml", ExperimentSpec)])
def test_example_specs_are_valid(name, cls, tmp_path):
    """examples/experiments/*.yaml (their base, runs/exp/spec.yaml, is made by the README's commands:
    a stand-in base at the same relative place here)."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "examples" / "experiments").mkdir(parents=True)
    shutil.copy(repo / "examples" / "experiments" / name, tmp_path / "examples" / "experiments" / name)
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    base = yaml.safe_load(write_base(tmp_path).read_text())
    base["tasks"] = {"sentiment": base["tasks"]["a"], "qa": base["tasks"]["c"]}
    base["mixture"], base["gradients"] = {}, {}
    (tmp_path / "runs" / "exp" / "spec.yaml").write_text(yaml.safe_dump(base))
    spec = load_spec(cls, tmp_path / "examples" / "experiments" / name)
    assert spec.out.startswith(str(tmp_path / "runs" / "exp"))
    if cls is HpoSpec:
        from megamt.experiments.hpo import check_spec

        check_spec(spec)
    elif cls is ExperimentSpec:
        assert len(plan_runs(spec)) == 4
