"""``megamt experiment pairs SPEC``: the pairwise transfer matrix of T tasks.

Trains every task alone (``steps_per_task`` steps) and every pair of tasks
(``2 * steps_per_task`` steps, so the same budget per task), evaluates each model on its
tasks, and reports the T x T matrix of gains::

    gain[i][j] = metric_i(model trained on {i, j}) - metric_i(model trained on i alone)

on each task's primary metric (accuracy, SQuAD F1, entity F1, ROUGE-L; 0-100 scale):
row i = the task measured, column j = its partner; > 0: j helps i. The T + T(T-1)/2 runs go
through the experiment runner (``megamt experiment run``'s machinery: one launch per run,
resumable, ``--slurm`` for a job array). Spec (megamt.experiments.spec.PairsSpec)::

    base: ../train.yaml
    overrides: [eval.max_examples=200]
    tasks: [sst2, rte, conll, squad]
    steps_per_task: 100
    affinity_every: 5        # + one run on all tasks measuring the TAG affinity (optional)
    launch: {launcher: deepspeed, num_gpus: 2}
    out: runs/pairs

With ``affinity_every`` one more run trains all T tasks for ``T * steps_per_task`` steps with
``gradients.affinity_every`` set (with T = 2 the pair run is that run and measures it); the report then compares its one-run affinity
(``Z[j -> i]``, the effect of a step on j on task i's loss) with the measured gains
(``gain[i][j]``) by Spearman's rank correlation over the ordered pairs, and over the
unordered pairs (``gain[i][j] + gain[j][i]`` vs ``Z[i -> j] + Z[j -> i]``).

Outputs: ``OUT/pairs.md``, ``OUT/pairs.json``, ``OUT/pairs_matrix.png`` (and
``OUT/affinity_vs_pairs.png``), plus the runner's ``results.csv`` / ``results.md``.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from megamt.experiments.runner import PlannedRun, execute, experiment_main, write_results
from megamt.experiments.spec import PairsSpec, base_config
from megamt.experiments.worker import read_summary

AFFINITY_RUN = "all-tasks-affinity"


def pairs_tasks(spec: PairsSpec) -> list[str]:
    cfg = base_config(spec)
    tasks = list(spec.tasks or cfg.train_task_names)
    from megamt.config import ConfigError

    bad = [t for t in tasks if t not in cfg.tasks]
    if bad or len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise ConfigError([f"{spec.spec_path}: tasks {tasks}: need at least 2 distinct tasks of {spec.base} "
                           f"(unknown: {bad}; tasks there: {list(cfg.tasks)})"])
    return tasks


def affinity_run_name(tasks: list[str]) -> str:
    """The run that measures the one-run affinity: with 2 tasks the pair run is the run on all
    tasks (same tasks, same steps; measuring leaves its training bit-identical), else its own run."""
    return f"pair-{tasks[0]}+{tasks[1]}" if len(tasks) == 2 else AFFINITY_RUN


def plan_pairs(spec: PairsSpec, tasks: list[str]) -> list[PlannedRun]:
    n = spec.steps_per_task
    measure = [f"gradients.affinity_every={spec.affinity_every}"] if spec.affinity_every else []
    runs = [PlannedRun(f"single-{t}", [f"train.max_steps={n}"], tasks=[t], meta={"pair": [t]}) for t in tasks]
    runs += [PlannedRun(f"pair-{a}+{b}", [f"train.max_steps={2 * n}"] + (measure if len(tasks) == 2 else []),
                        tasks=[a, b], meta={"pair": [a, b]}) for a, b in itertools.combinations(tasks, 2)]
    if measure and len(tasks) > 2:
        runs.append(PlannedRun(AFFINITY_RUN, [f"train.max_steps={n * len(tasks)}"] + measure, tasks=list(tasks)))
    return runs


def primary_score(summary: Optional[dict], task: str) -> Optional[float]:
    from megamt.eval.metrics import primary_metric

    if summary is None:
        return None
    r = ((summary.get("eval") or {}).get("tasks") or {}).get(task)
    if r is None:
        return None
    return r["metrics"].get(primary_metric(r["task_type"]))


def gain_matrix(out: Path, tasks: list[str]) -> dict[str, Any]:
    """Single scores, pair scores and the gain matrix from the runs' summaries (NaN: missing)."""
    from megamt.eval.metrics import primary_metric

    T = len(tasks)
    single = {t: primary_score(read_summary(out / "runs" / f"single-{t}"), t) for t in tasks}
    pair = np.full((T, T), np.nan)
    for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
        s = read_summary(out / "runs" / f"pair-{a}+{b}")
        for x, y, t in ((i, j, a), (j, i, b)):
            v = primary_score(s, t)
            pair[x, y] = np.nan if v is None else v
    gain = np.full((T, T), np.nan)
    for i, t in enumerate(tasks):
        for j in range(T):
            if i != j and single[t] is not None:
                gain[i, j] = pair[i, j] - single[t]
    metrics = {}
    for t in tasks:
        s = read_summary(out / "runs" / f"single-{t}")
        r = (((s or {}).get("eval") or {}).get("tasks") or {}).get(t)
        metrics[t] = primary_metric(r["task_type"]) if r else None
    return {"tasks": tasks, "metric": metrics, "single": single, "pair": pair, "gain": gain}


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 finite pairs
    or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties: the mean of their ranks
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def read_affinity(path: Path, tasks: list[str], kind: str = "lookahead") -> Optional[np.ndarray]:
    """A run's mean affinity ``Z[i][j]`` (effect of i on j) re-indexed to ``tasks``."""
    f = path / "affinity.json" if path.is_dir() else path
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    names = data["tasks"]
    m = data.get(kind, {}).get("mean")
    if not m or not data.get(kind, {}).get("steps"):
        return None
    Z = np.full((len(tasks), len(tasks)), np.nan)
    for a, ta in enumerate(tasks):
        for b, tb in enumerate(tasks):
            if ta in names and tb in names:
                v = m[names.index(ta)][names.index(tb)]
                Z[a, b] = np.nan if v is None else v
    return Z


def compare_affinity(gain: np.ndarray, Z: np.ndarray) -> dict[str, Any]:
    """Spearman of the one-run affinity against the measured gains: ordered pairs
    (``gain[i][j]`` vs ``Z[j][i]``: j's effect on i both times) and unordered pairs (sums)."""
    T = gain.shape[0]
    ordered = [(gain[i, j], Z[j, i]) for i in range(T) for j in range(T) if i != j]
    unordered = [(gain[i, j] + gain[j, i], Z[i, j] + Z[j, i]) for i, j in itertools.combinations(range(T), 2)]
    return {"spearman_ordered": spearman(*zip(*ordered)), "n_ordered": len(ordered),
            "spearman_unordered": spearman(*zip(*unordered)), "n_unordered": len(unordered),
            "points_ordered": [[float(a), float(b)] for a, b in ordered]}


def json_safe(obj):
    """NaN / inf -> None (strict JSON), numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    lines = ["# Pairwise transfer matrix", "",
             f"Spec `{report['spec']}`; {report['steps_per_task']} steps per task (single: {report['steps_per_task']}, "
             f"pairs: {2 * report['steps_per_task']}). Primary metric per task (0-100).", "",
             "| task | metric | single-task |", "|---|---|---:|"]
    for t in tasks:
        v = report["single"][t]
        lines.append(f"| {t} | {report['metric'][t]} | {'–' if v is None else f'{v:.2f}'} |")
    lines += ["", "Gain `gain[i][j]` = metric of task i (row) trained with task j (column) minus task i alone "
              "(> 0: j helps i):", "", "| task \\ partner | " + " | ".join(tasks) + " | mean |",
              "|---|" + "---:|" * (len(tasks) + 1)]
    gain = np.array(report["gain"], dtype=float)
    for i, t in enumerate(tasks):
        row = ["–" if i == j or not np.isfinite(gain[i, j]) else f"{gain[i, j]:+.2f}" for j in range(len(tasks))]
        off = [gain[i, j] for j in range(len(tasks)) if j != i and np.isfinite(gain[i, j])]
        lines.append(f"| {t} | " + " | ".join(row) + f" | {np.mean(off):+.2f} |" if off else f"| {t} | "
                     + " | ".join(row) + " | – |")
    cmp_ = report.get("affinity")
    if cmp_:
        lines += ["", f"One-run affinity (run `{affinity_run_name(tasks)}`, mean over its measuring steps) "
                  "against the matrix, Spearman's rank correlation:", "",
                  "| affinity | ordered pairs (gain[i][j] vs Z[j->i]) | unordered pairs (sums) |", "|---|---:|---:|"]
        for kind, c in cmp_.items():
            lines.append(f"| {kind} | {c['spearman_ordered']:.3f} (n={c['n_ordered']}) | "
                         f"{c['spearman_unordered']:.3f} (n={c['n_unordered']}) |")
    lines += ["", "Plots: `pairs_matrix.png`" + (", `affinity_vs_pairs.png`" if cmp_ else "") + "; per-run table: "
              "`results.md`."]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    gain = np.array(report["gain"], dtype=float)
    written = []
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(tasks), 1.2 + 0.8 * len(tasks)), dpi=100)
    lim = np.nanmax(np.abs(gain)) if np.isfinite(gain).any() else 1.0
    im = ax.imshow(gain, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("trained together with (j)")
    ax.set_ylabel("task measured (i)")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if np.isfinite(gain[i, j]):
                ax.text(j, i, f"{gain[i, j]:+.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="gain (metric points)")
    ax.set_title("pairwise transfer: pair - single")
    fig.tight_layout()
    written.append(out / "pairs_matrix.png")
    fig.savefig(written[-1])
    plt.close(fig)
    if report.get("affinity"):
        kinds = list(report["affinity"])
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), dpi=100, squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            pts = np.array(report["affinity"][kind]["points_ordered"], dtype=float)
            ax.scatter(pts[:, 1], pts[:, 0], s=18)
            ax.axhline(0, lw=0.5, color="grey")
            ax.axvline(0, lw=0.5, color="grey")
            ax.set_xlabel(f"affinity Z[j -> i] ({kind})")
            ax.set_ylabel("gain[i][j] (metric points)")
            ax.set_title(f"Spearman {report['affinity'][kind]['spearman_ordered']:.2f}", fontsize=9)
        fig.tight_layout()
        written.append(out / "affinity_vs_pairs.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


def run_pairs(spec: PairsSpec, *, slurm: bool = False, collect: bool = False,
              log: Callable[[str], None] = print) -> dict:
    tasks = pairs_tasks(spec)
    out = Path(spec.out)
    planned = plan_pairs(spec, tasks)
    log(f"pairs experiment: {len(tasks)} tasks -> {len(planned)} runs into {out}")
    rows = execute(spec, planned, out, log=log, slurm=slurm, collect=collect)
    write_results(rows, out, title="Pairwise transfer: runs")
    m = gain_matrix(out, tasks)
    report = {"spec": spec.spec_path, "steps_per_task": spec.steps_per_task, "tasks": tasks, "metric": m["metric"],
              "single": m["single"], "pair": m["pair"].tolist(), "gain": m["gain"].tolist(), "affinity": {},
              "runs": rows}
    if spec.affinity_every:
        for kind in ("lookahead", "first_order"):
            Z = read_affinity(out / "runs" / affinity_run_name(tasks), tasks, kind)
            if Z is not None:
                report["affinity"][kind] = {"matrix": Z.tolist(), **compare_affinity(m["gain"], Z)}
    (out / "pairs.json").write_text(json.dumps(json_safe(report), indent=1))
    md = markdown(report)
    (out / "pairs.md").write_text(md)
    plot(report, out)
    log(md)
    return report


def main(argv: list[str] | None = None) -> int:
    return experiment_main(
        argv, prog="megamt experiment pairs", doc=__doc__, spec_cls=PairsSpec,
        run=lambda spec, **kw: run_pairs(spec, **kw)["runs"],
        dry_run=lambda spec: (f"{r.name}: tasks {r.tasks}, {' '.join(r.overrides)}" for r in plan_pairs(spec, pairs_tasks(spec))))


if __name__ == "__main__":
    sys.exit(main())
