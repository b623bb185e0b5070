"""launch_run's process handling with a stand-in worker command (no training): progress lines
from the run's train_log.jsonl while it runs, and a time limit that kills the whole tree."""

import json
import sys
import time

import psutil

from megamt.experiments import launch

FAKE_WORKER = """
import json, subprocess, sys, time
run_dir = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # like a launcher's rank
open(run_dir + "/child.pid", "w").write(str(child.pid))
with open(run_dir + "/train_log.jsonl", "a") as f:
    for step in (1, 2):
        f.write(json.dumps({"step": step, "train/loss": 1.0 / step, "perf/step_time_s": 0.5}) + "\\n")
        f.flush()
        time.sleep(0.3)
time.sleep(float(sys.argv[2]))
"""


def fake(monkeypatch, tmp_path, sleep):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(launch, "worker_command", lambda launcher, n, run_dir, port: [
        sys.executable, str(script), str(run_dir), str(sleep)])


def test_progress_lines_and_exit(monkeypatch, tmp_path):
    fake(monkeypatch, tmp_path, 1.0)
    lines = []
    res = launch.launch_run(tmp_path, launcher="python", max_steps=4, progress_every_s=0.5, log=lines.append,
                            label="[1/1] r")
    assert res.returncode == 0 and not res.timed_out
    assert any(line.startswith("[1/1] r: step 2/4 (50%), loss 0.5000, 0.50 s/step, ETA 1 s") for line in lines), lines
    assert "$ " in (tmp_path / "log.txt").read_text()  # the command, then the worker's output


def test_timeout_kills_the_process_tree(monkeypatch, tmp_path):
    fake(monkeypatch, tmp_path, 60)
    t0 = time.time()
    res = launch.launch_run(tmp_path, launcher="python", max_steps=4, timeout_s=2, log=lambda *_: None)
    assert res.timed_out and res.returncode != 0 and time.time() - t0 < 30
    child = int((tmp_path / "child.pid").read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_child_env_drops_the_launchers_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "1234")
    env = launch.child_env({"NCCL_DEBUG": "INFO"})
    assert "RANK" not in env and "MASTER_PORT" not in env and env["NCCL_DEBUG"] == "INFO"
    assert json.dumps(env)  # plain strings
