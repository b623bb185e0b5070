"""slurm/train.sbatch under stand-ins for SLURM's commands: the launch line each node runs, the
hostfile's slots from the allocation (GPUs, or CPUs when none), the threads and core binding
per rank, the per-job port, the node-local DeepSpeed build directory and its stale locks,
SIGUSR1 forwarded to the ranks, requeue only after a clean stop, and the exit code passed
through. (test_slurm_cluster.py runs the script on a real SLURM cluster where one can start.)

Stand-ins on PATH: ``scontrol`` (hostnames of SLURM_JOB_NODELIST; ``requeue`` recorded),
``srun`` (records its options, runs its command as node 0 and forwards SIGUSR1/SIGTERM to it,
as slurmstepd does), ``deepspeed`` (records its arguments and the environment the ranks would
get; with STUB_WAIT it waits for SIGUSR1 like a rank, which checkpoints and exits 0) and, where
a test asks, ``numactl`` (only its presence matters: deepspeed would call it).
"""

import fcntl
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
opts = []
while args and args[0].startswith("--"):
    opts.append(args.pop(0))
with open(os.environ["STUB_LOG"], "a") as f:
    f.write("srun " + " ".join(opts) + "\\n")
child = subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": "0"}})
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: child.send_signal(s))
sys.exit(child.wait())
"""

DEEPSPEED = """#!{python}
import os, signal, sys, time
with open(os.environ["STUB_LOG"], "a") as f:
    f.write("deepspeed " + " ".join(sys.argv[1:]) + "\\n")
    f.write("env " + " ".join(f"{{k}}={{os.environ.get(k, '')}}" for k in
                                ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_EXTENSIONS_DIR")) + "\\n")
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

CORES = ",".join(map(str, sorted(os.sched_getaffinity(0))))


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMT_", "OMP_", "MKL_"))
           and k not in ("TORCH_EXTENSIONS_DIR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "MEGAMT_VENV": str(tmp_path / "venv"),
                "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NNODES": "2",
                "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "16", "SLURM_SUBMIT_DIR": str(tmp_path),
                "TMPDIR": str(tmp_path / "node-tmp"), "MEGAMT_BIND_CORES": "0",
                "STUB_LOG": str(tmp_path / "stub.log"), "STUB_READY": str(tmp_path / "ready")})
    (tmp_path / "node-tmp").mkdir()
    return tmp_path, env


def _log(tmp_path):
    return (tmp_path / "stub.log").read_text().splitlines()


def _run(tmp_path, env, *args):
    proc = subprocess.run(["bash", str(SCRIPT), "cfg.yaml", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _entries(tmp_path, kind):
    return [line.split(" ", 1)[1] for line in _log(tmp_path) if line.startswith(kind + " ")]


def test_gpu_allocation_launch_line_hostfile_port_and_threads(stubs):
    tmp_path, env = stubs
    proc = _run(tmp_path, env, "train.max_steps=7", "data.seq_len=64")
    hostfile = tmp_path / "logs" / "hostfile-42"
    assert hostfile.read_text().splitlines() == ["gpu-a slots=4", "gpu-b slots=4"]
    # the CPUs go to the step explicitly (Slurm 22.05-23.02 do not pass --cpus-per-task on)
    assert _entries(tmp_path, "srun") == ["--kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=16"]
    # a port derived from the job id, not 29500 for every job on the node
    assert _entries(tmp_path, "deepspeed") == [
        f"--hostfile {hostfile} --no_ssh --node_rank 0 --master_addr gpu-a --master_port 20042 "
        "--module megamt.train cfg.yaml train.max_steps=7 data.seq_len=64"]
    ext = tmp_path / "node-tmp" / f"megamt-torch-extensions-{_user()}"
    assert _entries(tmp_path, "env") == [f"OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 TORCH_EXTENSIONS_DIR={ext}"]
    assert "2 nodes x 4 ranks (4 GPUs, 16 CPUs, 4 threads per rank); master gpu-a:20042" in proc.stdout
    assert "ranks not bound to cores (MEGAMT_BIND_CORES=0" in proc.stdout


def _user():
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.parametrize("extra, slots, threads", [
    ({}, 2, 1),                                   # one rank per CPU of the task, never a fixed 8
    ({"MEGAMT_CPUS_PER_RANK": "2"}, 1, 2),
    ({"MEGAMT_RANKS_PER_NODE": "1"}, 1, 2),
])
def test_cpu_only_allocation_takes_ranks_from_its_cpus(stubs, extra, slots, threads):
    tmp_path, env = stubs
    env = {k: v for k, v in env.items() if k != "SLURM_GPUS_ON_NODE"}
    env.update({"SLURM_CPUS_PER_TASK": "2", "MASTER_PORT": "31111", **extra})
    proc = _run(tmp_path, env)
    assert (tmp_path / "logs" / "hostfile-42").read_text().splitlines() == [f"gpu-a slots={slots}",
                                                                          f"gpu-b slots={slots}"]
    assert _entries(tmp_path, "srun")[0].endswith("--cpus-per-task=2")
    assert "--master_port 31111" in _entries(tmp_path, "deepspeed")[0]
    assert _entries(tmp_path, "env")[0].startswith(f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} ")
    assert f"2 nodes x {slots} ranks (0 GPUs, 2 CPUs, {threads} threads per rank)" in proc.stdout


def test_ranks_bound_to_the_tasks_cores_where_numactl_exists(stubs):
    """deepspeed's --bind_cores_to_rank splits the task's CPU set (what SLURM's task/affinity or
    task/cgroup plugin gives the step; here this process's affinity) into one block per rank."""
    tmp_path, env = stubs
    numactl = tmp_path / "bin" / "numactl"
    numactl.write_text("#!/bin/sh\nexec \"$@\"\n")
    numactl.chmod(0o755)
    n = len(CORES.split(","))
    env = {k: v for k, v in env.items() if k not in ("SLURM_GPUS_ON_NODE", "MEGAMT_BIND_CORES")}
    env["SLURM_CPUS_PER_TASK"] = str(n)
    proc = _run(tmp_path, env)
    assert f"--node_rank 0 --bind_cores_to_rank --bind_core_list {CORES} --master_addr" in _entries(tmp_path, "deepspeed")[0]
    assert f"megamt: node 0: {n} ranks bound to 1 cores each of {CORES}" in proc.stdout


def test_node_local_build_dir_drops_stale_locks_only_when_no_job_holds_it(stubs):
    tmp_path, env = stubs
    ext = tmp_path / "ext"
    env["TORCH_EXTENSIONS_DIR"] = str(ext)
    lock = ext / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    (ext / ".in-use").touch()
    with open(ext / ".in-use") as held:  # another job on this node holds the directory: maybe building
        fcntl.flock(held, fcntl.LOCK_SH)
        proc = _run(tmp_path, env)
    assert lock.exists() and "stale build lock" not in proc.stdout
    assert _entries(tmp_path, "env")[0].endswith(f"TORCH_EXTENSIONS_DIR={ext}")  # a prebuilt directory is kept
    proc = _run(tmp_path, env)  # nobody holds it: a lock left there is an interrupted build's
    assert not lock.exists() and f"megamt: removed the stale build lock {lock}" in proc.stdout


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
    assert [line for line in _log(tmp_path) if not line.startswith(("srun ", "deepspeed ", "env "))] == [
        "rank: SIGUSR1, checkpoint written", "requeue 42"]
    assert "USR1 received, forwarding" in out and "requeueing job 42" in out
