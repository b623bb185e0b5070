"""``megamt hpo SPEC --trials N --study NAME --storage sqlite:///PATH``: hyperparameter search with Optuna.

Optuna is the library; its RDB storage is the record. Each trial is one training run in its
own process (the experiment runner's launch: ``deepspeed --module megamt.experiments.worker
TRIAL_DIR``), so a crashed trial is a failed trial, not a crashed study. The study survives
the driver: running the same command again continues it to N trials in total (trials a
killed driver left running on this host are relaunched on their folders and resume from
their checkpoints; nothing is counted twice).

Spec (megamt.experiments.spec.HpoSpec)::

    base: ../train.yaml
    overrides: [train.max_steps=300, train.eval_every=50, eval.during_training=true, eval.max_examples=200]
    hpo:
      space:
        train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
        mixture.temperature: {type: float, low: 1.0, high: 5.0}
        gradients.method: {type: categorical, choices: [none, pcgrad, cagrad]}
        gradients.loss_weighting: {type: categorical, choices: [equal, uncertainty]}
        model.lora.r: {type: int, low: 4, high: 64, log: true}
      objective: {metric: primary, tasks: [sst2, rte], reduce: worst}   # or metric: loss
      pruner: median          # median | hyperband | none
      enqueue: [{train.lr: 3.0e-4}]
    launch: {launcher: deepspeed, num_gpus: 8}
    out: runs/hpo

The objective is reported at every validation (``train.eval_every``; metrics need
``eval.during_training``): the worker's rank 0 calls ``trial.report`` / ``trial.should_prune``
on the same storage, and a pruned trial's ranks leave the training loop together after that
validation (no checkpoint, exit 0, ``status: pruned``). Outputs in ``out``: ``trials/``
(one run folder per trial), ``trials.csv`` / ``trials.md``, ``best.yaml`` (the best trial's
config, ready for ``megamt train``), and Optuna's matplotlib plots ``history.png``,
``importances.png``, ``parallel_coordinate.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from megamt.experiments.spec import HpoParam, HpoSpec, override_text

COUNTED = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


class ObjectiveError(ValueError):
    """The objective cannot be computed from a run's results; the message says what is missing."""


# --------------------------------------------------------------------------- objective


def task_values(objective: dict, tasks: list[str], losses: Optional[dict], results: Optional[dict]) -> dict[str, float]:
    """Per-task numbers the objective reduces: validation losses, or metrics from ``evaluate()``."""
    from megamt.eval.metrics import primary_metric

    metric = objective["metric"]
    out = {}
    for t in tasks:
        if metric == "loss":
            if not losses or t not in losses:
                raise ObjectiveError(f"objective: no validation loss of task {t!r} (losses: {sorted(losses or {})})")
            out[t] = float(losses[t])
            continue
        r = ((results or {}).get("tasks") or {}).get(t)
        if r is None:
            raise ObjectiveError(f"objective: no metrics of task {t!r} (evaluated: {sorted((results or {}).get('tasks') or {})}); "
                                 "metrics during training need eval.during_training=true")
        name = primary_metric(r["task_type"]) if metric == "primary" else metric
        if name not in r["metrics"]:
            raise ObjectiveError(f"objective: task {t!r} has no metric {name!r} (it has {sorted(r['metrics'])})")
        out[t] = float(r["metrics"][name])
    return out


def objective_value(objective: dict, tasks: list[str], losses: Optional[dict], results: Optional[dict]) -> float:
    """mean, or the worst task (lowest metric / highest loss), of :func:`task_values`."""
    vals = list(task_values(objective, tasks, losses, results).values())
    if objective["reduce"] == "mean":
        return sum(vals) / len(vals)
    return max(vals) if objective["direction"] == "minimize" else min(vals)


def objective_meta(spec: HpoSpec, cfg) -> dict:
    o = spec.hpo.objective
    return {"metric": o.metric, "tasks": list(o.tasks or cfg.train_task_names), "reduce": o.reduce,
            "direction": o.resolved_direction()}


# --------------------------------------------------------------------------- Optuna pieces


def build_pruner(pruner: dict):
    """From ``run.json``'s pruner record: the same pruner in the driver and in every trial."""
    import optuna

    kind = pruner["kind"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner["startup_trials"],
                                           n_warmup_steps=pruner["warmup_steps"])
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=pruner["min_resource"], max_resource=pruner["max_resource"],
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def pruner_meta(spec: HpoSpec, cfg) -> dict:
    h = spec.hpo
    return {"kind": h.pruner, "startup_trials": h.pruner_startup_trials, "warmup_steps": h.pruner_warmup_steps,
            "min_resource": max(1, cfg.train.eval_every), "max_resource": cfg.train.max_steps}


def build_sampler(spec: HpoSpec):
    import optuna

    if spec.hpo.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.hpo.seed)
    return optuna.samplers.TPESampler(seed=spec.hpo.seed)


def suggest(trial, key: str, p: HpoParam) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(key, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)


class TrialReporter:
    """The worker's side (``trainer.on_validation``): rank 0 reports the objective of every
    validation to the trial on the study's storage and asks the pruner; the answer is
    broadcast, so every rank stops (or goes on) together."""

    def __init__(self, meta: dict, cfg, run_dir: Path):
        self.meta = meta
        self.max_steps = cfg.train.max_steps
        self.run_dir = Path(run_dir)
        self._trial = None

    def trial(self):
        if self._trial is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=self.meta["study"], storage=self.meta["storage"],
                                      pruner=build_pruner(self.meta["pruner"]),
                                      sampler=optuna.samplers.RandomSampler())
            self._trial = optuna.trial.Trial(study, self.meta["trial_id"])
        return self._trial

    def __call__(self, trainer, losses: dict, results: Optional[dict]) -> bool:
        from megamt import comm

        if trainer.step == 0:  # before training: nothing to compare
            return False
        prune = False
        if trainer.rank == 0:
            rec: dict[str, Any] = {"step": trainer.step}
            try:
                value = objective_value(self.meta["objective"], self.meta["objective"]["tasks"], losses, results)
                trial = self.trial()
                trial.report(value, trainer.step)
                prune = bool(trainer.step < self.max_steps and trial.should_prune())
                rec.update(value=value, pruned=prune)
            except Exception as e:  # noqa: BLE001 -- a report that fails must not kill the run
                rec["error"] = f"{type(e).__name__}: {e}"
                print(f"WARNING hpo: no report at step {trainer.step}: {rec['error']}", flush=True)
            with open(self.run_dir / "intermediate.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if prune:
                print(f"hpo: trial {self.meta['trial_number']} pruned at step {trainer.step} "
                      f"(objective {rec['value']:.4g})", flush=True)
        return bool(comm.broadcast_object(prune))


# --------------------------------------------------------------------------- the driver


def check_spec(spec: HpoSpec) -> None:
    """Every value of the space must make a valid config; the objective must be computable
    and reported as often as the pruner needs. All problems at once (ConfigError)."""
    from megamt.config import ConfigError, load_config
    from megamt.eval.metrics import METRICS_BY_TYPE

    problems: list[str] = []
    cfg = load_config(spec.base, spec.overrides)
    for key, p in spec.hpo.space.items():
        for v in p.values_to_check():
            try:
                load_config(spec.base, list(spec.overrides) + [override_text(key, v)])
            except ConfigError as e:
                problems += [f"hpo.space.{key}={v!r}: {q}" for q in e.problems]
    o = spec.hpo.objective
    tasks = o.tasks or cfg.train_task_names
    for t in tasks:
        if t not in cfg.train_task_names:
            problems.append(f"hpo.objective.tasks: {t!r} is not a training task of {spec.base} ({cfg.train_task_names})")
        elif o.metric not in ("loss", "primary") and o.metric not in METRICS_BY_TYPE[cfg.tasks[t].task_type]:
            problems.append(f"hpo.objective.metric: task {t!r} ({cfg.tasks[t].task_type}) has no metric {o.metric!r}; "
                            f"choose from loss, primary, {list(METRICS_BY_TYPE[cfg.tasks[t].task_type])}")
    if spec.hpo.pruner != "none":
        if not cfg.train.eval_every:
            problems.append("hpo.pruner: the pruner needs a report at every validation; set train.eval_every "
                            "(in the base config or the spec's overrides), or hpo.pruner: none")
        elif o.metric != "loss" and not cfg.eval.during_training:
            problems.append(f"hpo.pruner: metric {o.metric!r} is computed during training only with "
                            "eval.during_training=true (or use metric: loss, or hpo.pruner: none)")
    if problems:
        raise ConfigError(problems)


def this_driver() -> dict:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def driver_alive(driver: dict) -> bool:
    import psutil

    if driver.get("host") != socket.gethostname():
        return True  # another machine's driver: not ours to judge
    try:
        return abs(psutil.Process(driver["pid"]).create_time() - driver["started"]) < 1e-3
    except (psutil.NoSuchProcess, KeyError):
        return False


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"trial_{number:04d}"


def prepare_trial(spec: HpoSpec, out: Path, trial, params: dict, meta: dict) -> Path:
    from megamt.config import load_config
    from megamt.experiments.worker import CONFIG, META, write_json_atomic

    run_dir = trial_dir(out, trial.number)
    cfg = load_config(spec.base, list(spec.overrides) + [override_text(k, v) for k, v in params.items()]
                      + [f"train.run_dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(cfg.to_yaml())
    write_json_atomic(run_dir / META, {"name": run_dir.name, "params": params,
                                       "hpo": {**meta, "trial_id": trial._trial_id, "trial_number": trial.number}})
    return run_dir


def finish_trial(study, trial_number: int, run_dir: Path, res, spec: HpoSpec, meta: dict,
                 log: Callable[[str], None]) -> None:
    """Tell the study how the trial's run ended (complete with its value, pruned, failed)."""
    import optuna

    from megamt.experiments.launch import log_tail
    from megamt.experiments.worker import read_summary

    storage, tid = study._storage, study.trials[trial_number]._trial_id
    summary = read_summary(run_dir)
    storage.set_trial_user_attr(tid, "seconds", (study.trials[trial_number].user_attrs.get("seconds", 0.0)
                                                 + (res.seconds if res is not None else 0.0)))
    if summary is not None:
        storage.set_trial_user_attr(tid, "steps", summary["steps"])
    if res is not None and res.returncode == 0 and summary is not None and summary["status"] == "pruned":
        study.tell(trial_number, state=optuna.trial.TrialState.PRUNED)
        log(f"trial {trial_number}: pruned at step {summary['steps']} of {summary['max_steps']}")
        return
    if res is not None and res.returncode == 0 and summary is not None:
        try:
            value = objective_value(meta["objective"], meta["objective"]["tasks"], summary.get("eval_loss"),
                                    summary.get("eval"))
        except ObjectiveError as e:
            storage.set_trial_user_attr(tid, "error", str(e))
            study.tell(trial_number, state=optuna.trial.TrialState.FAIL)
            log(f"trial {trial_number}: FAILED: {e}")
            return
        study.tell(trial_number, value)
        log(f"trial {trial_number}: {meta['objective']['metric']} objective {value:.4g} ({summary['steps']} steps)")
        return
    why = ("no result" if res is None else "timed out" if res.timed_out else
           f"exit status {res.returncode}" if res.returncode else "no run_summary.json")
    storage.set_trial_user_attr(tid, "error", why)
    study.tell(trial_number, state=optuna.trial.TrialState.FAIL)
    log(f"trial {trial_number}: FAILED ({why})" + (f"; log {res.log}:\n{log_tail(res.log)}" if res is not None else ""))


def launch_trial(spec: HpoSpec, run_dir: Path, label: str, log: Callable[[str], None]):
    from megamt.config import load_config
    from megamt.experiments.launch import launch_run

    l = spec.launch
    return launch_run(run_dir, launcher=l.launcher, num_gpus=l.num_gpus, timeout_s=l.timeout_s,
                      max_steps=load_config(run_dir / "config.yaml").train.max_steps,
                      progress_every_s=l.progress_every_s, env=l.env, log=log, label=label)


def run_study(spec: HpoSpec, n_trials: int, study_name: str, storage: str, *, log: Callable[[str], None] = print,
              launch: Optional[Callable] = None):
    """Run trials until the study holds ``n_trials`` (finished or running elsewhere); returns the study."""
    import optuna

    from megamt.config import ConfigError, load_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    launch = launch or launch_trial
    check_spec(spec)
    cfg = load_config(spec.base, spec.overrides)
    meta = {"study": study_name, "storage": storage, "objective": objective_meta(spec, cfg),
            "pruner": pruner_meta(spec, cfg)}
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=build_sampler(spec),
                                pruner=build_pruner(meta["pruner"]), direction=meta["objective"]["direction"],
                                load_if_exists=True)
    if study.direction.name.lower() != meta["objective"]["direction"]:
        raise ConfigError([f"study {study_name!r} in {storage} maximises/minimises the other way "
                           f"({study.direction.name}); use a new study name"])
    if not study.trials:
        for params in spec.hpo.enqueue:
            study.enqueue_trial(params)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    # trials a killed driver of this host left running: relaunch them on their folders (they
    # resume from their checkpoints) and finish them
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if driver_alive(t.user_attrs.get("driver", {})):
            continue
        if "run_dir" not in t.user_attrs:  # killed between ask() and the trial's folder
            study._storage.set_trial_user_attr(t._trial_id, "error", "driver killed before the trial was launched")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            continue
        run_dir = Path(t.user_attrs["run_dir"])
        if not (run_dir / "config.yaml").is_file():
            prepare_trial(spec, out, t, t.params, meta)
        study._storage.set_trial_user_attr(t._trial_id, "driver", this_driver())
        study._storage.set_trial_user_attr(t._trial_id, "resumed", t.user_attrs.get("resumed", 0) + 1)
        log(f"trial {t.number}: its driver is gone; relaunching it on {run_dir}")
        res = launch(spec, run_dir, f"trial {t.number} (resumed)", log)
        finish_trial(study, t.number, run_dir, res, spec, meta, log)
    while True:
        counted = [t for t in study.get_trials(deepcopy=False) if t.state.name in COUNTED]
        if len(counted) >= n_trials:
            break
        trial = study.ask()
        trial.set_user_attr("driver", this_driver())
        params = {k: suggest(trial, k, p) for k, p in spec.hpo.space.items()}
        run_dir = trial_dir(out, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        label = f"trial {trial.number} ({len(counted) + 1}/{n_trials})"
        try:
            prepare_trial(spec, out, trial, params, meta)
        except ConfigError as e:  # a combination of values the config refuses
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"{label}: FAILED, invalid config {params}: {e}")
            continue
        log(f"{label}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        res = launch(spec, run_dir, label, log)
        finish_trial(study, trial.number, run_dir, res, spec, meta, log)
    return study


# --------------------------------------------------------------------------- outputs


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value, **{f"param:{k}": v for k, v in
                                                                                    t.params.items()},
                     "steps": t.user_attrs.get("steps"), "last_report_step": t.last_step,
                     "seconds": round(t.user_attrs.get("seconds", 0.0), 1), "run_dir": t.user_attrs.get("run_dir"),
                     "error": t.user_attrs.get("error")})
    return rows


def write_outputs(study, spec: HpoSpec, out: Path, n_trials: int) -> dict:
    """trials.csv / trials.md, best.yaml, the three plots; returns a summary dict."""
    rows = trial_rows(study)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    (out / "trials.csv").write_text(buf.getvalue())
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    o = spec.hpo.objective
    summary: dict[str, Any] = {"study": study.study_name, "trials": len(study.trials), "complete": len(done),
                               "pruned": len(pruned), "failed": len(failed), "direction": study.direction.name}
    lines = [f"# HPO study `{study.study_name}`", "",
             f"{len(study.trials)} trials ({len(done)} complete, {len(pruned)} pruned, {len(failed)} failed); "
             f"objective: {o.reduce} of {o.metric} over {', '.join(o.tasks) or 'every training task'}, "
             f"{study.direction.name.lower()}d.", ""]
    best_yaml = None
    if done:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        best_yaml = write_best(best, out)
        lines += [f"Best: trial {best.number}, value {best.value:.5g}, params `{best.params}` -> `{best_yaml}` "
                  "(`megamt train` it as it is).", ""]
    steps_run = sum((t.user_attrs.get("steps") or 0) for t in study.trials if t.state.name in ("COMPLETE", "PRUNED"))
    full = [t.user_attrs.get("steps") for t in done if t.user_attrs.get("steps")]
    if pruned and full:
        max_steps = max(full)
        saved = sum(max_steps - (t.user_attrs.get("steps") or 0) for t in pruned)
        summary.update(steps_run=steps_run, steps_saved_by_pruning=saved)
        lines += [f"Pruning stopped {len(pruned)} trial(s) early: {saved} of {max_steps * (len(done) + len(pruned))} "
                  f"optimizer steps not run ({100 * saved / (max_steps * (len(done) + len(pruned))):.0f} %).", ""]
    head = ["trial", "state", "value"] + [c for c in cols if c.startswith("param:")] + ["steps", "seconds"]
    lines += ["| " + " | ".join(h.removeprefix("param:") for h in head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join("–" if r.get(h) is None else f"{r[h]:.5g}" if isinstance(r.get(h), float)
                                      else str(r[h]) for h in head) + " |")
    plots = write_plots(study, out)
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots["written"])
              + ("; " + "; ".join(f"{k}: {v}" for k, v in plots["skipped"].items()) if plots["skipped"] else "")]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    summary["plots"] = plots
    return summary


def write_best(best, out: Path) -> Path:
    """The best trial's resolved config with its own run_dir replaced: ready for ``megamt train``."""
    import yaml

    from megamt.config import load_config

    cfg = load_config(Path(best.user_attrs["run_dir"]) / "config.yaml")
    cfg.train.run_dir = str(out / "best_run")
    path = out / "best.yaml"
    header = (f"# best trial {best.number} of HPO study (value {best.value!r})\n"
              f"# params: {json.dumps(best.params)}\n")
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def write_plots(study, out: Path) -> dict:
    """Optuna's matplotlib plots as PNG; a plot Optuna cannot draw yet (too few complete
    trials, one parameter) is named with the reason instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written, skipped = [], {}
    for name, fn in (("history.png", ovm.plot_optimization_history), ("importances.png", ovm.plot_param_importances),
                     ("parallel_coordinate.png", ovm.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append(name)
        except Exception as e:  # noqa: BLE001 -- Optuna refuses some plots on small studies
            skipped[name] = f"{type(e).__name__}: {e}"
            plt.close("all")
    return {"written": written, "skipped": skipped}


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt hpo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("spec", help="HPO spec YAML (base config, hpo.space, hpo.objective, launch)")
    ap.add_argument("--trials", type=int, required=True, help="trials in the study in total (a re-run continues to it)")
    ap.add_argument("--study", required=True, help="Optuna study name")
    ap.add_argument("--storage", required=True, help="Optuna RDB storage URL, e.g. sqlite:///runs/hpo.db")
    ap.add_argument("--out", default=None, help="output folder (default: the spec's `out`)")
    args = ap.parse_args(argv)
    from megamt.config import ConfigError
    from megamt.experiments.spec import load_spec

    if args.trials < 1:
        ap.error("--trials must be >= 1")
    try:
        spec = load_spec(HpoSpec, args.spec, args.out)
        t0 = time.perf_counter()
        study = run_study(spec, args.trials, args.study, args.storage)
    except ConfigError as e:
        print(f"megamt hpo: {e}", file=sys.stderr)
        return 2
    summary = write_outputs(study, spec, Path(spec.out), args.trials)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print((Path(spec.out) / "trials.md").read_text())
    print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, default=str))
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
