"""The HPO driver (megamt.experiments.hpo) on a real Optuna sqlite study with stand-in launches
(each writes the run_summary.json a worker would): trial bookkeeping, failures, a killed
driver's trial resumed, outputs; and the worker-side reporter that asks the pruner."""

import json
import math
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

optuna = pytest.importorskip("optuna")

from megamt.config import load_config  # noqa: E402
from megamt.experiments.hpo import TrialReporter, run_study, write_outputs  # noqa: E402
from megamt.experiments.launch import LaunchResult  # noqa: E402
from megamt.experiments.spec import HpoSpec, load_spec  # noqa: E402

from test_experiments_spec import write_spec  # noqa: E402


def spec_file(tmp_path, **hpo):
    return write_spec(tmp_path, overrides=["train.eval_every=2", "train.max_steps=6"], out="hpo_out", launch={
        "launcher": "python"}, hpo={"space": {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                                              "mixture.temperature": {"type": "float", "low": 1.0, "high": 5.0}},
                                    "objective": {"metric": "loss", "tasks": ["a", "b"], "reduce": "worst"},
                                    "sampler": "random", "seed": 3, **hpo})


class FakeLaunch:
    """Stands in for a worker process: objective = (log10(lr) + 3)^2 (+ 1 for task b)."""

    def __init__(self, fail=(), crash=None):
        self.calls, self.fail, self.crash = [], set(fail), crash

    def __call__(self, spec, run_dir, label, log):
        self.calls.append(run_dir.name)
        n = int(run_dir.name.split("_")[1])
        if self.crash == len(self.calls):
            raise KeyboardInterrupt  # the driver dies mid-trial
        if n in self.fail:
            return LaunchResult(1, 0.5, False, run_dir / "log.txt", ["fake"])
        cfg = load_config(run_dir / "config.yaml")
        loss = (math.log10(cfg.train.lr) + 3) ** 2
        (run_dir / "run_summary.json").write_text(json.dumps({
            "status": "complete", "steps": 6, "max_steps": 6, "eval_loss": {"a": loss, "b": loss + 1}, "eval": None}))
        return LaunchResult(0, 1.0, False, run_dir / "log.txt", ["fake"])


def test_study_runs_exactly_n_trials_and_records_failures(tmp_path):
    spec = load_spec(HpoSpec, spec_file(tmp_path, enqueue=[{"train.lr": 1e-3}]))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    fake = FakeLaunch(fail={1})
    study = run_study(spec, 5, "s", storage, launch=fake, log=lambda *_: None)
    states = [t.state.name for t in study.trials]
    assert len(states) == 5 and states.count("FAIL") == 1 and states[1] == "FAIL"
    assert study.trials[0].params["train.lr"] == 1e-3 and study.trials[0].value == pytest.approx(1.0)  # enqueued first
    assert study.trials[1].user_attrs["error"] == "exit status 1"
    # a re-run with the same N does nothing; a larger N continues the same study
    assert run_study(spec, 5, "s", storage, launch=fake, log=lambda *_: None) and len(fake.calls) == 5
    study = run_study(spec, 7, "s", storage, launch=fake, log=lambda *_: None)
    assert len(study.trials) == 7 and len(fake.calls) == 7
    summary = write_outputs(study, spec, tmp_path / "hpo_out", 7)
    out = tmp_path / "hpo_out"
    best = load_config(out / "best.yaml")  # ready for megamt train
    assert best.train.lr == study.best_params["train.lr"] and best.train.run_dir == str(out / "best_run")
    assert summary["best_trial"] == study.best_trial.number and summary["failed"] == 1
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 8 and rows[0].startswith("trial,state,value,param:train.lr,param:mixture.temperature")
    for png in ("history.png", "importances.png", "parallel_coordinate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", summary["plots"]
    assert "| 1 | FAIL | – |" in (out / "trials.md").read_text()


def test_a_killed_driver_is_continued_to_exactly_n_trials(tmp_path):
    spec = load_spec(HpoSpec, spec_file(tmp_path))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, 4, "s", storage, launch=FakeLaunch(crash=3), log=lambda *_: None)
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    # the driver of trial 2 is gone (a process that has exited)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    study._storage.set_trial_user_attr(study.trials[2]._trial_id, "driver",
                                       {"host": socket.gethostname(), "pid": int(dead.stdout), "started": 0.0})
    fake = FakeLaunch()
    study = run_study(spec, 4, "s", storage, launch=fake, log=lambda *_: None)
    assert fake.calls == ["trial_0002", "trial_0003"]  # trial 2 relaunched on its own folder, then one new trial
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert study.trials[2].user_attrs["resumed"] == 1


def test_a_running_trial_of_a_live_driver_is_left_alone(tmp_path):
    spec = load_spec(HpoSpec, spec_file(tmp_path))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, 3, "s", storage, launch=FakeLaunch(crash=1), log=lambda *_: None)
    fake = FakeLaunch()  # this process (the "other driver") is alive: its RUNNING trial counts, is not relaunched
    study = run_study(spec, 3, "s", storage, launch=fake, log=lambda *_: None)
    assert fake.calls == ["trial_0001", "trial_0002"]
    assert [t.state.name for t in study.trials] == ["RUNNING", "COMPLETE", "COMPLETE"]


def test_reporter_reports_each_validation_and_prunes_a_worse_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(study_name="r", storage=storage, direction="minimize")
    objective = {"metric": "loss", "tasks": ["a"], "reduce": "mean", "direction": "minimize"}
    pruner = {"kind": "median", "startup_trials": 1, "warmup_steps": 0, "min_resource": 2, "max_resource": 6}
    cfg = SimpleNamespace(train=SimpleNamespace(max_steps=6))

    def reporter(trial, run_dir):
        run_dir.mkdir()
        return TrialReporter({"study": "r", "storage": storage, "objective": objective, "pruner": pruner,
                              "trial_id": trial._trial_id, "trial_number": trial.number}, cfg, run_dir)

    good = study.ask()
    r0 = reporter(good, tmp_path / "t0")
    for step, loss in ((0, 9.0), (2, 1.0), (4, 0.5)):
        assert r0(SimpleNamespace(step=step, rank=0), {"a": loss}, None) is False
    study.tell(good, 0.5)
    bad = study.ask()
    r1 = reporter(bad, tmp_path / "t1")
    assert r1(SimpleNamespace(step=2, rank=0), {"a": 3.0}, None) is True  # worse than the median at step 2
    frozen = optuna.load_study(study_name="r", storage=storage).trials
    assert frozen[0].intermediate_values == {2: 1.0, 4: 0.5} and frozen[1].intermediate_values == {2: 3.0}
    recs = [json.loads(line) for line in (tmp_path / "t1" / "intermediate.jsonl").read_text().splitlines()]
    assert recs == [{"step": 2, "value": 3.0, "pruned": True}]
    # the last validation (step == max_steps) is reported but never prunes: the run is done anyway
    assert r1(SimpleNamespace(step=6, rank=0), {"a": 3.0}, None) is False


def test_reporter_with_hyperband(tmp_path):
    """Hyperband's brackets are a function of the study and the trial number: the reporter's
    own pruner (built in the trial's process from run.json) decides like the driver's."""
    storage = f"sqlite:///{tmp_path / 'h.db'}"
    study = optuna.create_study(study_name="h", storage=storage, direction="minimize")
    pruner = {"kind": "hyperband", "startup_trials": 0, "warmup_steps": 0, "min_resource": 2, "max_resource": 12}
    objective = {"metric": "loss", "tasks": ["a"], "reduce": "mean", "direction": "minimize"}
    decisions = []
    for n, losses in enumerate(([3.0, 2.0, 1.0], [3.0, 2.5, 2.4], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0])):
        trial = study.ask()
        (tmp_path / f"t{n}").mkdir()
        rep = TrialReporter({"study": "h", "storage": storage, "objective": objective, "pruner": pruner,
                             "trial_id": trial._trial_id, "trial_number": trial.number},
                            SimpleNamespace(train=SimpleNamespace(max_steps=12)), tmp_path / f"t{n}")
        for step, loss in zip((2, 4, 8), losses):
            stop = rep(SimpleNamespace(step=step, rank=0), {"a": loss}, None)
            assert isinstance(stop, bool)
            if stop:
                break
        decisions.append(stop)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if stop else study.tell(trial, losses[-1])
    assert not decisions[0]  # nothing to compare the first trial with
    assert decisions[2] or decisions[3]  # the clearly worse trials are stopped
