"""`megamt experiment run --slurm`: one job array over the unfinished runs, each task running
slurm/train.sbatch on its run folder with MEGAMT_MODULE=megamt.experiments.worker.

Stand-ins on PATH (no cluster here; no training): ``sbatch`` (runs the array's tasks one
after another with SLURM_ARRAY_TASK_ID / SLURM_JOB_ID set, as SLURM would on free nodes),
``scontrol`` and ``srun`` (tests/integration/test_slurm_script.py's), and ``deepspeed``
(records its arguments and writes the run_summary.json a finished worker writes)."""

import csv
import json
import os
import re
import sys

import pytest
import yaml
from test_slurm_script import SCONTROL, SRUN

pytestmark = pytest.mark.integration

SBATCH = """#!{python}
import os, re, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write("sbatch " + " ".join(args) + "\\n")
script = args[-1]
last = int(re.search(r"#SBATCH --array=0-(\\d+)", open(script).read()).group(1))
rc = 0
for i in range(last + 1):
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_JOB_ID="99", SLURM_JOB_ID=str(100 + i),
               SLURM_JOB_NODELIST="node-a", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=os.getcwd())
    with open("task-%d.out" % i, "w") as out:  # SLURM writes a task's output to its --output file
        rc |= subprocess.run(["bash", script], env=env, stdout=out, stderr=subprocess.STDOUT).returncode
print("99")
sys.exit(rc if "--wait" in args else 0)
"""

DEEPSPEED = """#!{python}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write("deepspeed " + " ".join(sys.argv[1:]) + "\\n")
run_dir = sys.argv[-1]
json.dump({{"status": "complete", "steps": 3, "max_steps": 3, "peak_memory_gib": 0.5,
           "eval": {{"tasks": {{"a": {{"task_type": "classification", "metrics": {{"accuracy": 42.0}}}}}}}}}},
          open(os.path.join(run_dir, "run_summary.json"), "w"))
"""


def write_spec(root, **fields):
    """A spec over a one-task base config (its data files are never read: nothing trains)."""
    base = {"tasks": {"a": {"task_type": "classification", "inputs": {"train": {"path": "a.tsv"}}}},
            "model": {"from_config": {"model_type": "llama"}}, "train": {"max_steps": 3}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    (root / "exp.yaml").write_text(yaml.safe_dump({"base": "base.yaml", **fields}, sort_keys=False))
    return root / "exp.yaml"


def test_slurm_array_over_unfinished_runs(tmp_path, monkeypatch, capsys):
    from megamt.experiments.runner import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scontrol", SCONTROL), ("srun", SRUN), ("deepspeed", DEEPSPEED)):
        (bin_dir / name).write_text(text.format(python=sys.executable) if name != "scontrol" else text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("# stand-in\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("MEGAMT_VENV", str(tmp_path / "venv"))
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "stub.log"))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, grid={"train.lr": [0.1, 0.01, 0.001]}, out="out",
                      slurm={"sbatch_args": ["--partition=cpu", "--time=00:10:00"], "max_parallel": 2})
    finished = tmp_path / "out" / "runs" / "lr=0.1"
    assert main([str(spec), "--dry-run"]) == 0
    # a run finished before: not in the array
    from megamt.experiments.runner import PlannedRun, prepare_run
    from megamt.experiments.spec import ExperimentSpec, load_spec

    prepare_run(load_spec(ExperimentSpec, spec), PlannedRun("lr=0.1", ["train.lr=0.1"]), tmp_path / "out")
    (finished / "run_summary.json").write_text(json.dumps({"status": "complete", "peak_memory_gib": 0.25, "eval": {}}))

    assert main([str(spec), "--slurm"]) == 0
    out = tmp_path / "out"
    batch = (out / "slurm" / "array.sbatch").read_text()
    assert "#SBATCH --array=0-1%2" in batch and "#SBATCH --partition=cpu" in batch and "#SBATCH --requeue" in batch
    runs = (out / "slurm" / "runs.txt").read_text().split()
    assert runs == [str(out / "runs" / "lr=0.01"), str(out / "runs" / "lr=0.001")]
    log = (tmp_path / "stub.log").read_text().splitlines()
    assert log[0] == f"sbatch --parsable --wait {out / 'slurm' / 'array.sbatch'}"
    # each array task: train.sbatch's deepspeed line with the worker module, its own port, its run folder
    hostfiles = [tmp_path / "logs" / f"hostfile-{100 + i}" for i in range(2)]
    # (train.sbatch's srun line, with its explicit --cpus-per-task, comes first in each task)
    assert [line.split()[0] for line in log[1:]] == ["srun", "deepspeed"] * 2, log
    assert all("--cpus-per-task=" in line for line in log[1:] if line.startswith("srun "))
    ds = [re.sub(r" --bind_cores_to_rank --bind_core_list \S+", "", line) for line in log[1:]
          if line.startswith("deepspeed ")]  # core binding where numactl exists (test_slurm_script tests it)
    assert ds == [f"deepspeed --hostfile {hostfiles[i]} --no_ssh --node_rank 0 --master_addr node-a "
                  f"--master_port {20000 + 100 + i} --module megamt.experiments.worker {runs[i]}" for i in range(2)]
    table = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert [table[n]["status"] for n in ("lr=0.1", "lr=0.01", "lr=0.001")] == ["complete"] * 3
    assert table["lr=0.01"]["a/accuracy"] == "42.0"
    events = [json.loads(line) for line in (out / "experiment_log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["skip", "submitted"]
    assert events[1]["job_id"] == "99" and events[1]["runs"] == ["lr=0.01", "lr=0.001"]
    # everything finished: a second call submits nothing
    assert main([str(spec), "--slurm"]) == 0
    assert len((tmp_path / "stub.log").read_text().splitlines()) == 5
    assert "nothing to submit" in capsys.readouterr().out
