"""The experiment layer end to end: README.md's "Experiments" command block, run literally on
the demo corpus (a tiny Llama), in a scratch folder holding a copy of examples/experiments/.

- ``megamt experiment pairs``: every run a real ``deepspeed --num_gpus 2`` launch (ZeRO-3,
  CPU ranks). The command is SIGKILLed (its whole process group, as a cancelled job or
  Ctrl-C does) while the pair run trains, then run again: the finished runs are skipped,
  the pair run resumes from its checkpoint, the affinity run follows. ``megamt report`` and
  ``megamt experiment groups`` then read the output.
- ``megamt hpo``: 3 trials, each a separate process; the second (lr 1e-7) is pruned at its
  first validation and its run stops there; the driver is SIGKILLed once the third trial's
  process has started, and the same command finishes that trial: exactly 3 trials.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MEGAMT = str(Path(sys.executable).with_name("megamt"))


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    sec = text[text.index("## Experiments: runner, HPO, task affinity"):]
    start = sec.index("```bash\n") + len("```bash\n")
    return [line for line in sec[start:sec.index("```", start)].splitlines() if line.strip()]


def argv(line: str) -> list[str]:
    args = shlex.split(line)
    assert args[0] == "megamt"
    return [MEGAMT, *args[1:]]


def run(line: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv(line), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def run_killed(line: str, cwd: Path, ready, timeout: float) -> str:
    """Start ``line`` in its own process group; SIGKILL the group once ``ready()``; its output."""
    log_path = cwd / "killed.log"
    proc = subprocess.Popen(argv(line), cwd=cwd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{line}: exited ({proc.returncode}) before the kill point:\n{log_path.read_text()[-3000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{line}: no kill point within {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return log_path.read_text()


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    shutil.copytree(REPO / "examples" / "experiments", root / "examples" / "experiments")
    cmds = readme_commands()
    assert [c.split()[1] for c in cmds] == ["demo-corpus", "build-shards", "experiment", "report", "experiment", "hpo"]
    run(cmds[0], root)
    run(cmds[1], root)
    return root, cmds


@pytest.fixture(scope="module")
def pairs(readme):
    from megamt.experiments.launch import release_shm

    root, cmds = readme
    out = root / "runs" / "exp" / "pairs"
    pair = out / "runs" / "pair-sentiment+qa"
    singles = [out / "runs" / f"single-{t}" / "run_summary.json" for t in ("sentiment", "qa")]
    # killed once the pair run (the last) has a checkpoint and before it finishes
    first = run_killed(cmds[2], root, lambda: (pair / "checkpoints" / "latest").is_file(), 600)
    killed = {"summary": (pair / "run_summary.json").is_file(),
              "step": int((pair / "checkpoints" / "latest").read_text().strip().split("_")[-1]),
              "singles": [p.stat().st_mtime for p in singles]}
    port = [line for line in (pair / "log.txt").read_text().splitlines() if line.startswith("$ ")][-1]
    release_shm(int(port.split("--master_port ")[1].split()[0]), 2)  # the killed CPU ranks' /dev/shm buffers
    second = run(cmds[2], root)
    return {"root": root, "cmds": cmds, "out": out, "pair": pair, "killed": killed, "first": first,
            "second": second.stdout}


def test_killed_runner_skips_finished_runs_and_resumes_the_unfinished_one(pairs):
    second, out, pair, killed = pairs["second"], pairs["out"], pairs["pair"], pairs["killed"]
    assert not killed["summary"] and 2 <= killed["step"] < 8
    assert "[1/3] single-sentiment: starting" in pairs["first"] and "[3/3] pair-sentiment+qa: starting" in pairs["first"]
    for i, t in enumerate(("sentiment", "qa")):
        assert f"[{i + 1}/3] single-{t}: finished before, skipped" in second
        # not relaunched: the summary is the one the first command wrote
        assert (out / "runs" / f"single-{t}" / "run_summary.json").stat().st_mtime == killed["singles"][i]
    assert f"[3/3] pair-sentiment+qa: resuming from its checkpoint at step {killed['step']} of 8" in second
    assert f"at step {killed['step']}" in (pair / "log.txt").read_text()  # the trainer: "resumed from ... at step N"
    events = [json.loads(line) for line in (out / "experiment_log.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("run")) for e in events] == [
        ("start", "single-sentiment"), ("done", "single-sentiment"), ("start", "single-qa"), ("done", "single-qa"),
        ("start", "pair-sentiment+qa"), ("skip", "single-sentiment"), ("skip", "single-qa"),
        ("resume", "pair-sentiment+qa"), ("done", "pair-sentiment+qa")], \
        f"{events[-1]}\n--- second command ---\n{second[-2000:]}\n--- {pair / 'log.txt'} ---\n" \
        + (pair / "log.txt").read_text()[-5000:]
    summary = json.loads((pair / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 8 and summary["world_size"] == 2
    logged = {json.loads(line)["step"] for line in (pair / "train_log.jsonl").read_text().splitlines()
              if "train/loss" in line}
    assert logged == set(range(1, 9))  # every step (those after the checkpoint twice)


def test_pairs_matrix_affinity_and_results_table(pairs):
    out = pairs["out"]
    rep = json.loads((out / "pairs.json").read_text())
    assert rep["tasks"] == ["sentiment", "qa"]
    runs = {n: json.loads((out / "runs" / n / "run_summary.json").read_text())
            for n in ("single-sentiment", "single-qa", "pair-sentiment+qa")}
    for i, t in enumerate(rep["tasks"]):
        tr = runs["pair-sentiment+qa"]["eval"]["tasks"][t]
        metric = {"classification": "accuracy", "extractive_qa": "f1"}[tr["task_type"]]
        single = runs[f"single-{t}"]["eval"]["tasks"][t]["metrics"][metric]
        assert rep["single"][t] == single and rep["metric"][t] == metric
        assert rep["gain"][i][1 - i] == pytest.approx(tr["metrics"][metric] - single)
    assert runs["single-qa"]["steps"] == 4 and list(runs["single-qa"]["eval"]["tasks"]) == ["qa"]  # one task only
    # the one-run affinity, measured by the pair run (the run on both tasks) on steps 2, 4, 6, 8 over
    # its two launches: the resumed one kept the killed one's records up to its checkpoint
    aff = json.loads((out / "runs" / "pair-sentiment+qa" / "affinity.json").read_text())
    assert [r["step"] for r in aff["per_step"]] == [2, 4, 6, 8]
    assert aff["lookahead"]["steps"] == 4 and aff["first_order"]["steps"] == 4
    assert rep["affinity"]["lookahead"]["matrix"][0][1] == pytest.approx(aff["lookahead"]["mean"][0][1])
    table = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert {r["status"] for r in table.values()} == {"complete"} and len(table) == 3
    assert table["pair-sentiment+qa"]["steps"] == "8" and int(table["pair-sentiment+qa"]["tokens"]) > 0
    assert float(table["pair-sentiment+qa"]["peak_memory_gib"]) > 0 and float(table["single-qa"]["wall_seconds"]) > 0
    assert (out / "pairs_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sentiment | accuracy |" in (out / "pairs.md").read_text()


def test_report_and_groups_on_the_experiment(pairs):
    root, cmds = pairs["root"], pairs["cmds"]
    run(cmds[3], root)
    res = json.loads((pairs["pair"] / "report" / "report.json").read_text())
    assert res["steps"] == 8 and {"loss_curves.png", "mixture.png", "cosine_over_time.png"} <= set(res["plots"])
    assert sum(r["measured_steps"] for r in res["conflicts"]) == 4  # gradients.monitor_every=2 over 8 steps
    groups = run(cmds[4], root).stdout
    assert "| affinity | {sentiment, qa} |" in groups and "| pairs | {sentiment} / {qa} |" in groups


@pytest.fixture(scope="module")
def study(readme):
    root, cmds = readme
    third = root / "runs" / "exp" / "hpo" / "trials" / "trial_0002"
    first = run_killed(cmds[5], root, lambda: (third / "log.txt").is_file(), 600)  # the third trial has started
    second = run(cmds[5], root)
    return {"root": root, "first": first, "second": second.stdout}


def test_pruned_trial_stops_its_run(study):
    trials = study["root"] / "runs" / "exp" / "hpo" / "trials"
    pruned = json.loads((trials / "trial_0001" / "run_summary.json").read_text())
    # DeepSpeed's warm-up runs the first 2 steps at lr 0, so both trials tie at the validation
    # of step 2; at step 4 the lr-1e-7 trial is worse than the first one: pruned there
    assert pruned["status"] == "pruned" and pruned["steps"] == 4 and pruned["max_steps"] == 6
    steps = [json.loads(line)["step"] for line in (trials / "trial_0001" / "train_log.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3, 4]  # the run really stopped at the validation that pruned it
    reports = [json.loads(line) for line in (trials / "trial_0001" / "intermediate.jsonl").read_text().splitlines()]
    assert [(r["step"], r["pruned"]) for r in reports] == [(2, False), (4, True)]
    assert "trial 1: pruned at step 4 of 6" in study["first"]
    done = json.loads((trials / "trial_0000" / "run_summary.json").read_text())
    assert done["status"] == "complete" and done["steps"] == 6


def test_killed_study_resumes_to_exactly_n_trials(study):
    import optuna

    s = optuna.load_study(study_name="demo", storage=f"sqlite:///{study['root'] / 'runs' / 'exp' / 'hpo.db'}")
    assert [t.state.name for t in s.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [t.params["train.lr"] for t in s.trials] == [0.005, 1e-7, 0.005]
    assert s.trials[2].intermediate_values == s.trials[0].intermediate_values  # same seeds, same numbers
    assert s.trials[2].user_attrs["resumed"] == 1 and "relaunching it" in study["second"]
    assert s.trials[0].intermediate_values.keys() == {2, 4, 6}
    out = study["root"] / "runs" / "exp" / "hpo"
    from megamt.config import load_config

    assert load_config(out / "best.yaml").train.lr == s.best_params["train.lr"]
    assert len((out / "trials.csv").read_text().splitlines()) == 4
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
