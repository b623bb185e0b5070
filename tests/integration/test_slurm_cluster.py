"""slurm/train.sbatch on a real one-node SLURM cluster (slurmctld + slurmd + munged, Debian's
slurm-wlm and munge; `.ci/run` installs them): submitted with command-line overrides for its
`# EDIT` lines, preempted with `scancel --signal=USR1 --batch`, requeued, restarted, resumed,
and finished with the per-task losses of an uninterrupted run.

The fixture installs nothing: it starts the cluster in a temporary directory (its own munge key
and socket, its own ports, `SLURM_CONF` pointing at its slurm.conf) when the binaries are
present and the tests run as root (slurmd starts the job's processes), and stops the daemons it
started by their pids. Skipped otherwise.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_runs import STEPS, TRAIN, assert_losses_match, free_port, reference_run
from test_train_deepspeed import records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train.sbatch"
SBIN_PATH = os.environ["PATH"] + ":/usr/sbin:/sbin"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


class Cluster:
    """A running one-node cluster; ``run`` calls a client command against it."""

    def __init__(self, root: Path, env: dict, partition: str, node: str):
        self.root, self.env, self.partition, self.node = root, env, partition, node

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol -o show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "-o", "show", "job", job_id, check=False)))


def _slurm_conf(root: Path, node_line: str, ports: tuple[int, int]) -> str:
    host = socket.gethostname()
    return f"""\
ClusterName=megamttest
SlurmctldHost={host}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
FirstJobId={1000 + secrets.randbelow(8000)}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{node_line}
PartitionName=megamt Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path, timeout: float = 20) -> None:
    """SIGTERM the daemon whose pid file we wrote, and wait for it (SIGKILL past timeout)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        t0 = time.time()
        while time.time() - t0 < wait:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.2)


def start_cluster(root: Path) -> Cluster:
    root.chmod(0o755)
    for d in ("state", "spool"):
        (root / d).mkdir()
    key = root / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    subprocess.run([_which("munged"), f"--key-file={key}", f"--socket={root}/munge.sock",
                    f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                    f"--seed-file={root}/munged.seed", "--force"], check=True, timeout=30)
    # the node as slurmd sees it (CPUs, sockets, memory): a configured node larger than the
    # machine would be drained at registration
    node_line = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True,
                               timeout=30).stdout.splitlines()[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node_line, (free_port(), free_port())))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SBIN_PATH}
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([_which(daemon)], env=env, check=True, timeout=30)
    cluster = Cluster(root, env, "megamt", node_line.split()[0].split("=", 1)[1])
    t0 = time.time()
    while "idle" not in cluster.run("sinfo", "-h", "-o", "%T", check=False):
        if time.time() - t0 > 60:
            logs = "".join((root / f).read_text(errors="replace")[-2000:] for f in ("slurmctld.log", "slurmd.log")
                           if (root / f).exists())
            raise RuntimeError(f"the SLURM node did not come up within 60 s:\n{logs}")
        time.sleep(0.5)
    return cluster


def stop_cluster(root: Path, env: dict) -> None:
    """Cancel every job of this cluster (its steps and ranks end with them), then stop the
    daemons this fixture started, by their pid files."""
    if (root / "slurmctld.pid").exists():
        subprocess.run([_which("scancel"), "--partition=megamt"], env=env, capture_output=True, timeout=60)
        t0 = time.time()
        while time.time() - t0 < 60:
            out = subprocess.run([_which("squeue"), "-h"], env=env, capture_output=True, text=True, timeout=60)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
        _stop(root / f"{name}.pid")


@pytest.fixture(scope="module")
def cluster():
    missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("a one-node SLURM cluster needs root (slurmd starts the job's processes)")
    root = Path(tempfile.mkdtemp(prefix="megamt-slurm-"))  # short: the munge socket path has a limit
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PATH": SBIN_PATH}
    try:
        yield start_cluster(root)
    finally:
        stop_cluster(root, env)
        shutil.rmtree(root, ignore_errors=True)


def _wait(what: str, cond, timeout: float, log: Path):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no job output yet)"
    pytest.fail(f"{what}: not within {timeout} s; job output:\n{tail}")


@pytest.fixture(scope="module")
def preempted_job(cluster, tmp_path_factory):
    """Submit train.sbatch, preempt it with SIGUSR1 at step >= 3, skip the requeue delay, and
    wait for the restarted job to finish. Returns what the tests inspect."""
    config, reference = reference_run(tmp_path_factory)
    work = tmp_path_factory.mktemp("slurm_job")
    run_dir = work / "run"
    out = work / "job.out"
    from torch.utils.cpp_extension import get_default_build_root

    env = {**cluster.env, "MEGAMT_VENV": str(Path(sys.executable).parents[1]),
           # the DeepSpeed ops the reference run built (CPU shared-memory all-reduce): not again
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the script sets them from the allocation
        env.pop(var, None)
    t0 = time.time()
    # the `# EDIT` lines, overridden on the command line; submitted from `work` (SLURM_SUBMIT_DIR:
    # the script writes logs/hostfile-<job> there)
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--job-name=megamt-test", f"--partition={cluster.partition}", "--account=test",
         "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=60", f"--output={out}", f"--chdir={work}",
         str(SCRIPT), str(config), f"train.run_dir={run_dir}", *TRAIN],
        env=env, cwd=work, capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(";")[0]

    def step_reached():
        steps = [r["step"] for r in records(run_dir) if "train/loss" in r]
        return steps and max(steps) >= 3

    _wait("step 3 of the first start", step_reached, 300, out)
    phases = {"submit_to_step3": time.time() - t0}
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)  # what --signal=B:USR1@600 sends before the limit
    # the script requeues the job; SLURM holds a requeued job back (BeginTime ~2 min): skip that
    _wait("the requeued job pending", lambda: cluster.job(job_id).get("Restarts") == "1"
          and cluster.job(job_id).get("JobState") == "PENDING", 120, out)
    phases["usr1_to_requeued"] = time.time() - t0 - phases["submit_to_step3"]
    stopped = {"latest": (run_dir / "checkpoints" / "latest").read_text().strip(),
               "steps": sorted(r["step"] for r in records(run_dir) if "train/loss" in r)}
    # slurmd revokes the job's credential when the first start is killed and refuses a launch
    # whose credential was made in the same second ("Job credential revoked", the job FAILED
    # with exit 1 and no output): SLURM's own requeue delay never hits that, our skip must wait
    # for the next second
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    final = _wait("the restarted job finished", lambda: (lambda j: j if j.get("JobState") in (
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None)(cluster.job(job_id)),
                  300, out)
    phases["restart_to_completed"] = time.time() - t0 - sum(phases.values())
    # what the daemons said about this job (in the assertion message when it did not complete)
    daemons = "".join(f"--- {f} (lines naming job {job_id}) ---\n" + "\n".join(
        line for line in (cluster.root / f).read_text(errors="replace").splitlines() if job_id in line)[-3000:] + "\n"
        for f in ("slurmctld.log", "slurmd.log") if (cluster.root / f).exists())
    return {"job_id": job_id, "phases": phases, "final": final, "stopped": stopped, "out": out.read_text(errors="replace"),
            "daemons": daemons,
            "run_dir": run_dir, "reference": reference, "node": cluster.node, "seconds": time.time() - t0}


def test_preempted_job_checkpoints_requeues_resumes_and_matches_the_uninterrupted_run(preempted_job):
    job, text = preempted_job, preempted_job["out"]
    print(f"SLURM job: submit to completion {job['seconds']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in job["phases"].items()) + ")")
    assert job["final"]["JobState"] == "COMPLETED" and job["final"]["ExitCode"] == "0:0", \
        f"{job['final']}\n--- job output ---\n{text[-3000:]}\n{job['daemons']}"
    assert job["final"]["Restarts"] == "1"
    # first start: the allocation's 2 CPUs give 2 ranks of 1 thread (not 8), a per-job port
    port = 20000 + int(job["job_id"]) % 10000
    assert (f"megamt: job {job['job_id']} restart 0; 1 nodes x 2 ranks (0 GPUs, 2 CPUs, 1 threads per rank); "
            f"master {job['node']}:{port}") in text
    if shutil.which("numactl"):  # task/affinity gave the step the job's 2 cores: one per rank
        m = re.search(r"megamt: node 0: 2 ranks bound to 1 cores each of (\S+)", text)
        assert m and len(m.group(1).split(",")) == 2, text[-4000:]
        bound = re.findall(r"spawned with command: \['numactl', (?:'-m', '[\d,]+', )?'-C', '(\d+)'", text)
        assert sorted(bound[:2]) == sorted(m.group(1).split(",")), bound
    else:
        assert "megamt: node 0: ranks not bound to cores (MEGAMT_BIND_CORES=1, numactl: none, 2 cores for 2 ranks)" in text
    # the stop: forwarded, checkpointed at the step reached, requeued
    m = re.search(r"stop signal received: checkpointing at step (\d+)", text)
    assert "USR1 received, forwarding to the training step" in text and m, text[-4000:]
    k = int(m.group(1))
    print(f"SLURM job: stopped and checkpointed at step {k} of {STEPS}")
    assert 3 <= k < STEPS, "the signal came too late to test a resume"
    assert job["stopped"]["latest"] == f"step_{k:08d}" and max(job["stopped"]["steps"]) == k
    assert f"requeueing job {job['job_id']} to resume" in text
    # the restart: same job, restart count 1, resumed from that checkpoint, to the end
    assert f"megamt: job {job['job_id']} restart 1;" in text
    assert f"resumed from {job['run_dir'] / 'checkpoints'}/step_{k:08d} at step {k}" in text
    assert (job["run_dir"] / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert_losses_match(job["run_dir"], job["reference"])
