"""``megamt experiment run EXPERIMENT.yaml``: a base config and a list or grid of overrides,
one training run each, resumable, with one results table.

Spec (see megamt.experiments.spec.ExperimentSpec)::

    base: ../train.yaml
    overrides: [train.max_steps=500, train.save_every=100, eval.max_examples=500]
    grid:                                   # one run per combination
      train.lr: [1.0e-4, 3.0e-4]
      gradients.method: [none, pcgrad]
    runs:                                   # and/or named override lists
      - {name: no-temperature, overrides: [mixture.strategy=proportional]}
    launch: {launcher: deepspeed, num_gpus: 8}
    out: runs/lr_x_method

Every run gets ``OUT/runs/<name>/`` (``config.yaml``: the resolved training config;
``run.json``; ``log.txt``: the launcher's output; the trainer's checkpoints, TensorBoard and
``train_log.jsonl``; ``run_summary.json`` once finished). Runs execute one after another
through the real launcher (``deepspeed --module megamt.experiments.worker RUN_DIR``), or all at
once as a SLURM job array with ``--slurm``.

Resume: a run with ``run_summary.json`` is finished and skipped; a run with a checkpoint
resumes from it (the trainer finds it in its run directory); a run whose resolved config no
longer matches the spec is an error naming it (delete its folder, or restore the spec). So a
killed experiment is continued by running the same command again.

Outputs: ``OUT/results.csv`` and ``OUT/results.md`` (run, status, overrides, per-task metrics,
tokens, steps, wall time, peak memory), ``OUT/experiment_log.jsonl`` (one JSON object per
event: start, skip, resume, done, failed, submitted, with times).
"""

from __future__ import annotations

import argparse
import copy
import csv
import fcntl
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megamt.experiments.launch import format_seconds, launch_run, log_tail
from megamt.experiments.spec import ExperimentSpec, grid_points, run_name
from megamt.experiments.worker import CONFIG, META, read_summary, write_json_atomic

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SBATCH = REPO / "slurm" / "train.sbatch"


@dataclass
class PlannedRun:
    """One run of an experiment before it is written to disk."""

    name: str
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides after the spec's common ones."""
    tasks: Optional[list[str]] = None
    """Train only these tasks (the others are dropped from the config); None = the base's."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra fields for ``run.json`` (e.g. the pairs experiment's task pair)."""


# --------------------------------------------------------------------------- planning


def plan_runs(spec: ExperimentSpec) -> list[PlannedRun]:
    """The spec's runs: each named run times each grid point (either list may be absent)."""
    points = grid_points(spec.grid) if spec.grid else [[]]
    named = spec.runs or [None]
    runs: list[PlannedRun] = []
    for entry in named:
        for point in points:
            overrides = (list(entry.overrides) if entry else []) + point
            if entry is not None and entry.name:
                name = entry.name + (f"_{run_name(point)}" if point else "")
            else:
                name = run_name(overrides)
            runs.append(PlannedRun(name, overrides))
    seen: dict[str, int] = {}
    for r in runs:  # names must be unique folders
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}-{seen[r.name]}"
    return runs


def restrict_tasks(cfg, train_tasks: list[str], eval_tasks: Optional[list[str]] = None):
    """A copy of ``cfg`` with only ``train_tasks`` (trained) and ``eval_tasks`` (zero-shot,
    evaluated only); phases, static weights and eval lists cut to them. Validated."""
    from megamt.config import validate

    eval_tasks = list(eval_tasks or [])
    cfg = copy.deepcopy(cfg)
    keep = list(train_tasks) + [t for t in eval_tasks if t not in train_tasks]
    missing = [t for t in keep if t not in cfg.tasks]
    if missing:
        from megamt.config import ConfigError

        raise ConfigError([f"tasks: {missing} not in the base config (tasks: {list(cfg.tasks)})"])
    cfg.tasks = {name: copy.deepcopy(cfg.tasks[name]) for name in keep}
    for name, task in cfg.tasks.items():
        task.zero_shot = name not in train_tasks
    cfg.mixture.phases = [p for p in cfg.mixture.phases if set(p.tasks) <= set(cfg.tasks)]
    for p in cfg.mixture.phases:
        p.weights = {k: v for k, v in p.weights.items() if k in cfg.tasks}
    cfg.gradients.static_weights = {k: v for k, v in cfg.gradients.static_weights.items() if k in cfg.tasks}
    cfg.eval.tasks = [t for t in cfg.eval.tasks if t in cfg.tasks]
    cfg.eval.metrics = {k: v for k, v in cfg.eval.metrics.items() if k in cfg.tasks}
    return validate(cfg)


def resolve_run(spec, run: PlannedRun, run_dir: Path):
    """The run's validated training config (spec overrides, run overrides, its run_dir)."""
    from megamt.config import load_config

    cfg = load_config(spec.base, list(spec.overrides) + list(run.overrides) + [f"train.run_dir={run_dir}"])
    if run.tasks is not None:
        cfg = restrict_tasks(cfg, run.tasks)
    return cfg


class ExperimentError(RuntimeError):
    """An experiment that cannot go on as asked; the message names the run and what to do."""


def _resolved_on_disk(path: Path) -> str:
    """A run's ``config.yaml`` as this version resolves it: a file written by an older megamt
    lacks the sections added since, which mean their defaults (not a changed run)."""
    from megamt.config import ConfigError, load_config

    try:
        return load_config(path).to_yaml()
    except ConfigError as e:  # a key this version no longer has: shown in the diff as it is
        return path.read_text() + f"# (not valid for this megamt: {e})\n"


def prepare_run(spec, run: PlannedRun, out: Path, extra_meta: Optional[dict] = None) -> Path:
    """Write ``config.yaml`` and ``run.json`` of a run (new) or check them (existing)."""
    run_dir = out / "runs" / run.name
    cfg = resolve_run(spec, run, run_dir)
    text = cfg.to_yaml()
    path = run_dir / CONFIG
    on_disk = _resolved_on_disk(path) if path.is_file() else text
    if on_disk != text:
        import difflib

        diff = "".join(list(difflib.unified_diff(on_disk.splitlines(keepends=True),
                                                 text.splitlines(keepends=True), "on disk", "from the spec", n=0))[:20])
        raise ExperimentError(f"run {run.name}: {path} differs from what the spec resolves to now; the run was started "
                              f"with another config. Delete {run_dir} to rerun it, or restore the spec.\n{diff}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text(text)
    meta = {"name": run.name, "overrides": run.overrides, "tasks": run.tasks, **run.meta, **(extra_meta or {})}
    write_json_atomic(run_dir / META, meta)
    return run_dir


def run_state(run_dir: Path) -> str:
    """done (run_summary.json), partial (a complete checkpoint), new."""
    if read_summary(run_dir) is not None:
        return "done"
    if (run_dir / "checkpoints" / "latest").is_file():
        return "partial"
    return "new"


def checkpoint_step(run_dir: Path) -> Optional[int]:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    try:
        return int(tag.rsplit("_", 1)[-1])
    except ValueError:
        return None


# --------------------------------------------------------------------------- the event log


class EventLog:
    """``OUT/experiment_log.jsonl``: one JSON object per event, appended and flushed at once."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, event: str, run: Optional[str] = None, **fields) -> None:
        rec = {"time": time.time(), "event": event, **({"run": run} if run else {}), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def hold_lock(out: Path):
    """One experiment process per output folder: a second one on the same folder would launch
    the same runs twice. Returns the open lock file (held until the process exits)."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".experiment.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ExperimentError(f"{out}: another megamt experiment is running on this folder (it holds "
                              f"{out / '.experiment.lock'}); wait for it or stop it first") from None
    return f


# --------------------------------------------------------------------------- running


def execute(spec, planned: list[PlannedRun], out: Path, *, log: Callable[[str], None] = print,
            slurm: bool = False, collect: bool = False, extra_meta: Optional[dict] = None) -> list[dict]:
    """Prepare every run, launch the unfinished ones (one after another, or one SLURM array),
    return one row per run for the results table. Failed runs are recorded, not raised."""
    out.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(out)
    events = EventLog(out / "experiment_log.jsonl")
    try:
        run_dirs = [prepare_run(spec, r, out, extra_meta) for r in planned]
        todo = []
        for i, (r, d) in enumerate(zip(planned, run_dirs)):
            state = run_state(d)
            tag = f"[{i + 1}/{len(planned)}] {r.name}"
            if state == "done":
                log(f"{tag}: finished before, skipped ({read_summary(d).get('status')})")
                events("skip", r.name, reason="finished")
            elif not collect:
                todo.append((i, r, d, state))
        if collect:
            log("--collect: nothing launched")
        elif slurm:
            submit_array(spec, [d for _, _, d, _ in todo], out, events, log)
        else:
            for i, r, d, state in todo:
                run_one(spec, r, d, f"[{i + 1}/{len(planned)}] {r.name}", state, events, log)
        return [result_row(r, d, events) for r, d in zip(planned, run_dirs)]
    finally:
        lock.close()


def run_one(spec, run: PlannedRun, run_dir: Path, tag: str, state: str, events: EventLog,
            log: Callable[[str], None]) -> bool:
    from megamt.config import load_config

    cfg = load_config(run_dir / CONFIG)
    launch = spec.launch
    if state == "partial":
        step = checkpoint_step(run_dir)
        log(f"{tag}: resuming from its checkpoint at step {step} of {cfg.train.max_steps}")
        events("resume", run.name, step=step)
    else:
        log(f"{tag}: starting ({cfg.train.max_steps} steps; {' '.join(run.overrides) or 'base config'})")
        events("start", run.name, overrides=run.overrides)
    res = launch_run(run_dir, launcher=launch.launcher, num_gpus=launch.num_gpus, timeout_s=launch.timeout_s,
                     max_steps=cfg.train.max_steps, progress_every_s=launch.progress_every_s, env=launch.env,
                     log=log, label=tag)
    summary = read_summary(run_dir)
    if res.returncode == 0 and summary is not None:
        events("done", run.name, seconds=res.seconds, status=summary.get("status"))
        log(f"{tag}: {summary.get('status')} in {format_seconds(res.seconds)}: {metrics_text(summary)}")
        return True
    why = ("timed out after %s" % format_seconds(res.seconds) if res.timed_out else
           f"exit status {res.returncode}" if res.returncode else "no run_summary.json (stopped by a signal?)")
    events("failed", run.name, seconds=res.seconds, returncode=res.returncode, timed_out=res.timed_out, reason=why)
    log(f"{tag}: FAILED ({why}); log {res.log}:\n{log_tail(res.log)}")
    return False


def metrics_text(summary: dict) -> str:
    tasks = ((summary.get("eval") or {}).get("tasks") or {})
    from megamt.eval.metrics import primary_metric

    parts = []
    for t, r in tasks.items():
        m = primary_metric(r["task_type"]) if "task_type" in r else next(iter(r.get("metrics", {})), None)
        if m and m in r.get("metrics", {}):
            parts.append(f"{t} {m} {r['metrics'][m]:.2f}")
    return ", ".join(parts) or "no metrics"


# --------------------------------------------------------------------------- SLURM


def submit_array(spec, run_dirs: list[Path], out: Path, events: EventLog, log: Callable[[str], None]) -> Optional[str]:
    """One SLURM job array over ``run_dirs``: task i runs the per-run batch script on line i+1
    of ``OUT/slurm/runs.txt``. With ``slurm.wait`` it blocks until the array is done."""
    if not run_dirs:
        log("nothing to submit: every run is finished")
        return None
    s = spec.slurm
    script = Path(s.script) if s.script else DEFAULT_SBATCH
    if not script.is_file():
        raise ExperimentError(f"slurm.script: {script} not found (set slurm.script in the spec to your batch script)")
    sdir = out / "slurm"
    sdir.mkdir(parents=True, exist_ok=True)
    listing = sdir / "runs.txt"
    listing.write_text("".join(f"{d}\n" for d in run_dirs))
    array = f"0-{len(run_dirs) - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    lines = ["#!/bin/bash",
             "# written by `megamt experiment run --slurm`: task i of the array runs the run on line i+1 of runs.txt",
             "#SBATCH --job-name=megamt-experiment", f"#SBATCH --array={array}",
             f"#SBATCH --output={sdir}/%x-%A_%a.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
             "#SBATCH --signal=B:USR1@600"]
    lines += [f"#SBATCH {a}" for a in s.sbatch_args]
    lines += ["set -eo pipefail",
              f'RUN_DIR="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {listing})"',
              "export MEGAMT_MODULE=" + "megamt.experiments.worker",
              "# array tasks sharing a node must not share the rendezvous port",
              'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
              f'exec bash {script} "$RUN_DIR"', ""]
    batch = sdir / "array.sbatch"
    batch.write_text("\n".join(lines))
    cmd = ["sbatch", "--parsable"] + (["--wait"] if s.wait else []) + [str(batch)]
    log(f"submitting {len(run_dirs)} run(s) as one job array: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    ids = [line.split(";")[0] for line in proc.stdout.split() if line.split(";")[0].isdigit()]
    job = ids[0] if ids else None  # --parsable: "JOBID[;CLUSTER]"
    events("submitted", job_id=job, runs=[d.name for d in run_dirs], array=array, returncode=proc.returncode,
           waited=s.wait, seconds=time.perf_counter() - t0)
    if proc.returncode != 0 and not (s.wait and job):
        raise ExperimentError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
    log(f"job array {job}: " + ("finished" if s.wait else "submitted; `megamt experiment run SPEC --collect` "
                                "writes the results table when it is done"))
    return job


# --------------------------------------------------------------------------- results


def read_tokens(run_dir: Path) -> tuple[int, int]:
    """(non-pad tokens trained, steps logged) from train_log.jsonl; a step logged twice (a
    resumed run replays the steps after its last checkpoint) counts once, the last time."""
    path = run_dir / "train_log.jsonl"
    by_step: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train/loss" in rec and rec.get("perf/tokens_per_s") is not None:
                by_step[rec["step"]] = rec["perf/tokens_per_s"] * rec["perf/step_time_s"]
    return int(round(sum(by_step.values()))), len(by_step)


def result_row(run: PlannedRun, run_dir: Path, events: EventLog) -> dict:
    summary = read_summary(run_dir)
    mine = [e for e in events.records() if e.get("run") == run.name]
    wall = sum(e.get("seconds", 0.0) for e in mine if e["event"] in ("done", "failed"))
    failed = bool(mine) and mine[-1]["event"] == "failed"
    tokens, steps = read_tokens(run_dir)
    row: dict[str, Any] = {"run": run.name, "status": (summary or {}).get("status") or ("failed" if failed else
                           run_state(run_dir)), "overrides": " ".join(run.overrides), "steps": steps,
                           "tokens": tokens, "wall_seconds": round(wall, 1),
                           "peak_memory_gib": None if summary is None else round(summary["peak_memory_gib"], 3),
                           "metrics": {}}
    for task, r in (((summary or {}).get("eval") or {}).get("tasks") or {}).items():
        for m, v in r.get("metrics", {}).items():
            row["metrics"][f"{task}/{m}"] = v
    return row


def write_results(rows: list[dict], out: Path, title: str = "Experiment results") -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` (one row per run; metric columns ``<task>/<metric>``)."""
    metric_cols = sorted({k for r in rows for k in r["metrics"]})
    cols = ["run", "status", "overrides", *metric_cols, "tokens", "steps", "wall_seconds", "peak_memory_gib"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([r["metrics"].get(c, "") if c in metric_cols else ("" if r.get(c) is None else r[c]) for c in cols])
    csv_path = out / "results.csv"
    csv_path.write_text(buf.getvalue())
    lines = [f"# {title}", "", "Metrics on the 0-100 scale (`<task>/<metric>`), tokens = non-pad tokens trained, "
             "wall time = the launches of this run (start-up, training, evaluation), peak memory = max over ranks.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r["metrics"].get(c) if c in metric_cols else r.get(c)
            cells.append("–" if v is None or v == "" else f"{v:.2f}" if isinstance(v, float) else
                         f"`{v}`" if c == "overrides" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def run_experiment(spec: ExperimentSpec, *, slurm: bool = False, collect: bool = False,
                   log: Callable[[str], None] = print) -> list[dict]:
    out = Path(spec.out)
    planned = plan_runs(spec)
    log(f"experiment {spec.spec_path}: {len(planned)} run(s) into {out}")
    rows = execute(spec, planned, out, log=log, slurm=slurm, collect=collect)
    write_results(rows, out)
    log((out / "results.md").read_text())
    return rows


# --------------------------------------------------------------------------- CLI


def experiment_main(argv: list[str] | None, *, prog: str, doc: str, spec_cls, dry_run: Callable,
                    run: Callable) -> int:
    """The command line every runner-based experiment shares: SPEC, --out, --slurm, --collect,
    --dry-run; a bad spec is one message and exit status 2; a failed run makes it 1.
    ``dry_run(spec)`` yields lines; ``run(spec, slurm=, collect=)`` returns the table rows."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    ap.add_argument("spec", help="the experiment's spec YAML")
    ap.add_argument("--out", default=None, help="output folder (default: the spec's `out`)")
    ap.add_argument("--slurm", action="store_true", help="submit the unfinished runs as one SLURM job array")
    ap.add_argument("--collect", action="store_true", help="launch nothing; report from the finished runs")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args = ap.parse_args(argv)
    from megamt.config import ConfigError
    from megamt.experiments.spec import load_spec

    try:
        spec = load_spec(spec_cls, args.spec, args.out)
        if args.dry_run:
            for line in dry_run(spec):
                print(line)
            return 0
        rows = run(spec, slurm=args.slurm, collect=args.collect)
    except (ConfigError, ExperimentError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] in ("complete", "pruned") for r in rows) or args.slurm or args.collect else 1


def main(argv: list[str] | None = None) -> int:
    return experiment_main(argv, prog="megamt experiment run", doc=__doc__, spec_cls=ExperimentSpec, run=run_experiment,
                           dry_run=lambda spec: (f"{r.name}: {' '.join(r.overrides) or '(base config)'}"
                                                 for r in plan_runs(spec)))


if __name__ == "__main__":
    sys.exit(main())
