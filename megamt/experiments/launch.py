"""Start one run of an experiment (a real launcher process), watch its progress, stop it.

A run is a folder ``RUN_DIR`` holding ``config.yaml`` (the resolved training config) and
``run.json`` (what the worker needs besides: the run's name, an HPO trial's address). The
command that trains and evaluates it is the same everywhere::

    deepspeed --num_gpus N --master_port P --module megamt.experiments.worker RUN_DIR
    python -m megamt.experiments.worker RUN_DIR                       # a world of one
    sbatch slurm/train.sbatch RUN_DIR   (MEGAMT_MODULE=megamt.experiments.worker)

The launcher process stays in the experiment's process group: stopping the experiment
(Ctrl-C, ``kill -- -PGID``, a SLURM cancel) stops its runs too. A run past its time limit
is killed with its whole process tree; CPU ranks' shared-memory buffers are removed then.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

WORKER_MODULE = "megamt.experiments.worker"
# variables a launcher sets for its ranks: a run started from inside a launched process
# (a test, a notebook under torchrun) must not inherit them
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class LaunchResult:
    """How one launch of a run ended."""

    returncode: int
    seconds: float
    timed_out: bool
    log: Path
    command: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_executable() -> str:
    exe = Path(sys.executable).parent / "deepspeed"
    return str(exe) if exe.is_file() else "deepspeed"


def worker_command(launcher: str, num_gpus: int, run_dir: Path, port: int) -> list[str]:
    if launcher == "deepspeed":
        return [deepspeed_executable(), "--num_gpus", str(num_gpus), "--master_port", str(port),
                "--module", WORKER_MODULE, str(run_dir)]
    if launcher == "python":
        return [sys.executable, "-m", WORKER_MODULE, str(run_dir)]
    raise ValueError(f"launcher {launcher!r}: expected deepspeed or python (inprocess runs no command)")


def leave_inprocess_run() -> None:
    """After a run trained in this process: transformers' global ZeRO-3 config is dropped
    (models built afterwards would come out partitioned). The process group stays for the
    next in-process run (DeepSpeed caches its groups)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


class ProgressReader:
    """Follows a run's ``train_log.jsonl`` (appended by the trainer's rank 0) for progress lines."""

    def __init__(self, run_dir: Path, max_steps: int):
        self.path = Path(run_dir) / "train_log.jsonl"
        self.max_steps = max_steps
        self.offset = 0
        self.last: Optional[dict] = None
        self.step_times: list[float] = []
        self.last_eval: Optional[dict] = None

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind("\n")
        if end < 0:
            return
        self.offset += len(chunk[:end + 1].encode())
        for line in chunk[:end + 1].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train/loss" in rec:
                self.last = rec
                if rec.get("perf/step_time_s") is not None:
                    self.step_times = (self.step_times + [rec["perf/step_time_s"]])[-50:]
            elif "eval" in rec:
                self.last_eval = rec

    def line(self) -> Optional[str]:
        if self.last is None:
            return None
        step = self.last["step"]
        parts = [f"step {step}/{self.max_steps} ({100 * step / max(1, self.max_steps):.0f}%)",
                 f"loss {self.last['train/loss']:.4f}"]
        if self.step_times:
            per = sum(self.step_times) / len(self.step_times)
            parts.append(f"{per:.2f} s/step, ETA {format_seconds(per * max(0, self.max_steps - step))}")
        if self.last_eval is not None:
            parts.append("eval " + " ".join(f"{t}={v:.3f}" for t, v in self.last_eval["eval"].items()))
        return ", ".join(parts)


def format_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (the deepspeed launcher's ranks included)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs[:-1], timeout=30)  # the parent is the caller's child: its wait() reaps it


def release_shm(port: int, world: int) -> None:
    """Killed CPU ranks cannot remove DeepSpeed's shared-memory all-reduce buffers: do it for them."""
    from megamt.trainer import cpu_shm_buffer

    for rank in range(world):
        cpu_shm_buffer(rank, "127.0.0.1", port).unlink(missing_ok=True)


def launch_run(run_dir: Path, *, launcher: str, num_gpus: int = 1, timeout_s: float = 0, max_steps: int = 0,
               progress_every_s: float = 30.0, env: Optional[dict[str, str]] = None,
               log: Callable[[str], None] = print, label: str = "") -> LaunchResult:
    """Run the worker on ``run_dir`` to its end; its output is appended to ``RUN_DIR/log.txt``."""
    run_dir = Path(run_dir)
    log_path = run_dir / "log.txt"
    t0 = time.perf_counter()
    if launcher == "inprocess":
        from megamt.experiments import worker

        try:
            rc = worker.run(run_dir)
        except Exception as e:  # noqa: BLE001 -- a failed run is recorded, the experiment goes on
            import traceback

            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
            log(f"{label}: failed in process: {type(e).__name__}: {e}")
            rc = 1
        finally:
            leave_inprocess_run()
        return LaunchResult(rc, time.perf_counter() - t0, False, log_path, ["inprocess", str(run_dir)])
    port = free_port()
    cmd = worker_command(launcher, num_gpus, run_dir, port)
    progress = ProgressReader(run_dir, max_steps)
    with open(log_path, "a") as out:
        out.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(env), cwd=os.getcwd())
        timed_out = False
        last_print = time.perf_counter()
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.perf_counter()
            if timeout_s and now - t0 > timeout_s:
                timed_out = True
                kill_tree(proc.pid)
                rc = proc.wait() or -signal.SIGKILL
                if launcher == "deepspeed":
                    release_shm(port, num_gpus)
                break
            if now - last_print >= progress_every_s:
                progress.poll()
                text = progress.line()
                if text:
                    log(f"{label}: {text}")
                last_print = now
    return LaunchResult(rc, time.perf_counter() - t0, timed_out, log_path, cmd)


def log_tail(path: Path, lines: int = 25) -> str:
    if not Path(path).is_file():
        return ""
    return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-lines:])
