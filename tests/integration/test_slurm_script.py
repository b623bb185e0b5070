"""slurm/train.sbatch under stand-ins for SLURM's commands (no cluster here): the launch
line each node runs, the hostfile, SIGUSR1 forwarded to the ranks, requeue only after a
clean stop, and the exit code passed through.

Stand-ins on PATH: ``scontrol`` (hostnames of SLURM_JOB_NODELIST; ``requeue`` recorded),
``srun`` (runs its command as node 0 and forwards SIGUSR1/SIGTERM to it, as slurmstepd
does) and ``deepspeed`` (records its arguments; with STUB_WAIT it waits for SIGUSR1 like a
rank, which checkpoints and exits 0).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"

SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then tr ',' '\\n' <<< "$3"; exit 0; fi
if [[ "$1" == "requeue" ]]; then echo "requeue $2" >> "$STUB_LOG"; exit 0; fi
exit 1
"""

SRUN = """#!{python}
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
child = subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": "0"}})
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: child.send_signal(s))
sys.exit(child.wait())
"""

DEEPSPEED = """#!{python}
import os, signal, sys, time
with open(os.environ["STUB_LOG"], "a") as f:
    f.write("deepspeed " + " ".join(sys.argv[1:]) + "\\n")
if os.environ.get("STUB_WAIT"):
    def stop(s, frame):
        with open(os.environ["STUB_LOG"], "a") as f:
            f.write("rank: SIGUSR1, checkpoint written\\n")
        sys.exit(0)
    signal.signal(signal.SIGUSR1, stop)  # the ranks install their handler (the launcher line ignores USR1)
    open(os.environ["STUB_READY"], "w").close()
    time.sleep(60)
    sys.exit(3)
sys.exit(int(os.environ.get("STUB_RC", "0")))
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("deepspeed", DEEPSPEED)):
        p = bin_dir / name
        p.write_text(text.format(python=sys.executable) if name != "scontrol" else text)
        p.chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("# stand-in\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MEGAMT_VENV": str(tmp_path / "venv"),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(tmp_path), "STUB_LOG": str(tmp_path / "stub.log"),
           "STUB_READY": str(tmp_path / "ready")}
    return tmp_path, env


def _log(tmp_path):
    return (tmp_path / "stub.log").read_text().splitlines()


def test_launch_line_and_hostfile(stubs):
    tmp_path, env = stubs
    proc = subprocess.run(["bash", str(SCRIPT), "cfg.yaml", "train.max_steps=7", "data.seq_len=64"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    hostfile = tmp_path / "logs" / "hostfile-42"
    assert hostfile.read_text().splitlines() == ["gpu-a slots=4", "gpu-b slots=4"]
    assert _log(tmp_path) == [f"deepspeed --hostfile {hostfile} --no_ssh --node_rank 0 --master_addr gpu-a "
                              "--master_port 29500 --module megamt.train cfg.yaml train.max_steps=7 data.seq_len=64"]
    assert "2 nodes x 4 GPUs; master gpu-a:29500" in proc.stdout


def test_failure_exit_code_passes_through_without_requeue(stubs):
    tmp_path, env = stubs
    proc = subprocess.run(["bash", str(SCRIPT), "cfg.yaml"], env={**env, "STUB_RC": "5"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5
    assert not any(line.startswith("requeue") for line in _log(tmp_path))


def test_usr1_is_forwarded_then_the_job_requeues(stubs):
    tmp_path, env = stubs
    proc = subprocess.Popen(["bash", str(SCRIPT), "cfg.yaml"], env={**env, "STUB_WAIT": "1"}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends 600 s before the time limit (B: to the batch shell)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _log(tmp_path)[1:] == ["rank: SIGUSR1, checkpoint written", "requeue 42"]
    assert "USR1 received, forwarding" in out and "requeueing job 42" in out
