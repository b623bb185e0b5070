"""One run of an experiment: ``python -m megamt.experiments.worker RUN_DIR`` (the same under
``deepspeed --module``, srun, or ``slurm/train.sbatch`` with ``MEGAMT_MODULE``).

Every rank runs it. It trains ``RUN_DIR/config.yaml`` with :class:`MultitaskTrainer` --
resuming from ``RUN_DIR/checkpoints`` when an earlier launch left one -- evaluates the final
weights where they are (``MultitaskTrainer.evaluate_trained``: partitioned under ZeRO-3, no
full copy; ``megamt.eval.api.evaluate`` on the config's ``eval`` section),
and rank 0 writes ``RUN_DIR/run_summary.json`` last (its presence means: finished)::

    {"status": "complete" | "pruned", "steps", "max_steps", "train_seconds", "eval_seconds",
     "peak_memory_gib" (max over ranks), "parameters", "world_size", "final_train_loss",
     "eval_loss": {task: loss}, "eval": {evaluate()'s results}, "stopped_at_step"}

``RUN_DIR/run.json`` carries what the config does not: ``{"name": ..., "hpo": {...}}``; with
``hpo`` the worker reports the objective to the Optuna trial at every validation and stops
the run cleanly when the pruner says so (``status: pruned``, no final evaluation, no
checkpoint; see megamt.experiments.hpo). A run stopped by a signal (SLURM's time limit)
checkpoints and exits 0 without a summary: the next launch resumes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

CONFIG = "config.yaml"
META = "run.json"
SUMMARY = "run_summary.json"


def read_summary(run_dir: str | Path) -> Optional[dict]:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class ValidationRecorder:
    """The trainer's ``on_validation`` callback: keeps the last metrics (so the final
    validation's metrics are not computed twice) and, for an HPO trial, asks the pruner."""

    def __init__(self, reporter=None):
        self.reporter = reporter
        self.last_step = -1
        self.last_results: Optional[dict] = None
        self.last_losses: Optional[dict] = None

    def __call__(self, trainer, losses: dict, results: Optional[dict]) -> bool:
        self.last_step, self.last_losses, self.last_results = trainer.step, losses, results
        if self.reporter is None:
            return False
        return self.reporter(trainer, losses, results)


def run(run_dir: str | Path) -> int:
    from megamt import comm
    from megamt.config import load_config
    from megamt.metrics_log import peak_memory_gib
    from megamt.trainer import MultitaskTrainer

    run_dir = Path(run_dir).resolve()
    cfg = load_config(run_dir / CONFIG)
    meta = json.loads((run_dir / META).read_text()) if (run_dir / META).is_file() else {}
    reporter = None
    if meta.get("hpo"):
        from megamt.experiments.hpo import TrialReporter

        reporter = TrialReporter(meta["hpo"], cfg, run_dir)
    trainer = MultitaskTrainer(None, cfg, resume=None)  # resumes from RUN_DIR/checkpoints when there is one
    recorder = ValidationRecorder(reporter)
    trainer.on_validation = recorder
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
    t0 = time.perf_counter()
    summary = trainer.train()
    train_s = time.perf_counter() - t0
    if summary.get("stopped") and not summary.get("stopped_by_callback"):
        return 0  # a signal: checkpointed, unfinished; the next launch resumes
    peak = comm.reduce_values([peak_memory_gib()], "max")[0]
    pruned = bool(summary.get("stopped_by_callback"))
    t1 = time.perf_counter()
    if pruned:
        results = recorder.last_results
    elif recorder.last_step == trainer.step and recorder.last_results is not None:
        results = recorder.last_results  # eval.during_training: the final validation computed them
    else:
        results = trainer.evaluate_trained(out_dir=run_dir / "eval" / "final", progress=False)  # partitioned
    eval_s = time.perf_counter() - t1
    if trainer.rank == 0:
        write_json_atomic(run_dir / SUMMARY, {
            "status": "pruned" if pruned else "complete", "name": meta.get("name", run_dir.name),
            "steps": trainer.step, "max_steps": cfg.train.max_steps, "stopped_at_step": trainer.step if pruned else None,
            "train_seconds": train_s, "eval_seconds": eval_s, "peak_memory_gib": float(peak),
            "parameters": int(n_params), "world_size": trainer.world_size, "final_train_loss": summary.get("loss"),
            "eval_loss": summary.get("eval_loss") or recorder.last_losses, "eval": results})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megamt.experiments.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="the run's folder (config.yaml, run.json)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rc = run(args.run_dir)
    from megamt import comm

    comm.leave()  # every rank together, so that no rank aborts at exit (see comm.leave)
    return rc


if __name__ == "__main__":
    from megamt import comm as _comm

    _comm.exit_process(main())  # a launched rank: see comm.exit_process
