"""Metrics: TensorBoard scalars, a progress bar and plain log lines, from rank 0 only.

Tags are namespaced and constant (see ``TAGS``); ``<task>`` is a task name:

    train/loss  train/loss/<task>  train/tokens/<task>  mix/prob/<task>  train/lr
    train/grad_norm  perf/tokens_per_s  perf/step_time_s  perf/mfu (GPU)  mem/peak_gib
    perf/step_time_s_min  perf/step_time_s_max  (over ranks: each rank's time to finish its
    share of the step; a slow node shows as max >> min)  perf/data_wait_s_max (the longest
    any rank waited for its micro-batches)  eval/loss/<task>

Every step's numbers also go, one JSON object per line, to ``<run_dir>/train_log.jsonl``
(what tests and the demo read back); a plain text line every ``log_every`` steps goes to
stdout for batch jobs (SLURM logs), and a tqdm bar with ETA when stdout is a terminal.

A run resumed at step k holds each step once: the lines of steps after k (logged by the run
that crashed or was stopped after its checkpoint) are cut from ``train_log.jsonl`` and moved
to ``train_log.discarded.jsonl``, and the new TensorBoard event file starts with a purge at
step k + 1 (``SummaryWriter(purge_step=...)``: TensorBoard hides the old files' events from
that step on). A run started at step 0 over an old log starts both over the same way.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

TAGS = ("train/loss", "train/loss/<task>", "train/tokens/<task>", "mix/prob/<task>", "train/lr", "train/grad_norm",
        "perf/tokens_per_s", "perf/step_time_s", "perf/step_time_s_min", "perf/step_time_s_max",
        "perf/data_wait_s_max", "perf/mfu", "mem/peak_gib", "eval/loss/<task>")

# dense bf16 peak FLOP/s by device-name fragment (for MFU on GPUs)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_memory_gib() -> float:
    """Peak memory of this process: device memory on CUDA, max resident set size on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def estimate_mfu(n_params: int, tokens_per_s_per_device: float) -> float | None:
    """Model FLOPs utilisation: 6 * N FLOPs per token (forward + backward), vs the device peak."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else 6 * n_params * tokens_per_s_per_device / peak


class MetricsLogger:
    """Rank 0 writes; other ranks hold an inert logger (same calls, no output)."""

    def __init__(self, run_dir: str | Path, rank: int, max_steps: int, *, log_every: int = 10,
                 progress_bar: bool = True, start_step: int = 0):
        self.enabled = rank == 0
        self.log_every = max(1, log_every)
        self.max_steps = max_steps
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb_dir = run_dir / "tensorboard"
        # resumed at step k: steps after k are logged again; from step 0: everything is
        keep_through = start_step if start_step > 0 else -1
        self.discarded = cut_log(run_dir / "train_log.jsonl", keep_through, run_dir / "train_log.discarded.jsonl")
        old_events = any(self.tb_dir.glob("events.out.tfevents.*")) if self.tb_dir.is_dir() else False
        self.writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=keep_through + 1 if old_events else None)
        self.jsonl = open(run_dir / "train_log.jsonl", "a")
        if self.discarded:
            self.print(f"train_log.jsonl: {self.discarded} line(s) of steps after {max(keep_through, 0)} (logged "
                       f"before the restart) moved to train_log.discarded.jsonl; TensorBoard purges them too")
        if progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log_step(self, step: int, scalars: dict[str, float], *, line: bool | None = None) -> None:
        """One optimizer step's scalars (already reduced over ranks), under their TensorBoard tags."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.4f}",
                                 lr=f"{scalars.get('train/lr', 0):.2e}")
        if line if line is not None else (step % self.log_every == 0 or step == self.max_steps):
            self.print(format_line(step, self.max_steps, scalars))

    def log_eval(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        for task, value in losses.items():
            self.writer.add_scalar(f"eval/loss/{task}", value, step)
        self.jsonl.write(json.dumps({"step": step, "eval": losses}) + "\n")
        self.jsonl.flush()
        self.print(f"eval step {step}: " + "  ".join(f"{t}={v:.4f}" for t, v in losses.items()))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def cut_log(path: Path, keep_through: int, discarded: Path) -> int:
    """Keep the lines of ``path`` with ``step <= keep_through``; append the others to
    ``discarded``. Atomic (temp file + rename). Returns how many lines were cut."""
    if not path.is_file():
        return 0
    keep, cut = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = int(json.loads(line).get("step", -1))
        except (ValueError, AttributeError, TypeError):
            step = keep_through + 1  # a torn last line of a killed run
        (keep if step <= keep_through else cut).append(line)
    if cut:
        with open(discarded, "a") as f:
            f.write("\n".join(cut) + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(cut)


def format_line(step: int, max_steps: int, s: dict[str, Any]) -> str:
    """A plain log line for batch jobs."""
    parts = [f"step {step}/{max_steps}", f"loss {s.get('train/loss', float('nan')):.4f}"]
    if s.get("train/lr") is not None:
        parts.append(f"lr {s['train/lr']:.2e}")
    if s.get("train/grad_norm") is not None:
        parts.append(f"gnorm {s['train/grad_norm']:.3f}")
    if s.get("perf/tokens_per_s") is not None:
        parts.append(f"{s['perf/tokens_per_s']:.0f} tok/s")
    if s.get("perf/step_time_s") is not None:
        parts.append(f"{s['perf/step_time_s']:.2f} s/step")
    lo, hi = s.get("perf/step_time_s_min"), s.get("perf/step_time_s_max")
    if lo is not None and hi is not None and hi > 1.2 * lo + 0.05:  # only when the ranks disagree
        parts.append(f"ranks {lo:.2f}-{hi:.2f} s")
    if s.get("mem/peak_gib") is not None:
        parts.append(f"peak {s['mem/peak_gib']:.2f} GiB")
    tasks = {k.split("/", 2)[2]: v for k, v in s.items() if k.startswith("train/loss/")}
    if tasks:
        parts.append("tasks " + " ".join(f"{t}={v:.3f}" for t, v in tasks.items()))
    return " | ".join(parts)


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``tb_dir`` as TensorBoard shows it: its EventAccumulator over
    the whole folder, event files in order, a restart's purge applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
