"""``megamt report RUN_DIR``: a Markdown + PNG report of a finished run from its TensorBoard logs.

What a person wants to look at instead of scrolling TensorBoard, in ``RUN_DIR/report/``
(``--out`` to put it elsewhere):

- ``loss_curves.png``: per-task training loss (smoothed, raw behind) and validation loss;
- ``mixture.png``: the mixture rates ``mix/prob/<task>`` over the steps (and the loss
  weights ``loss_weight/<task>`` when a balancer set them);
- ``cosine_over_time.png`` and ``cosine_by_phase.png``: the task-gradient cosines
  ``grad/cos/<a>/<b>`` of the measuring steps, over time and as one mean matrix per phase;
  the table of the share of conflicting pairs (negative cosine) per phase -- the mixture's
  curriculum phases (``mixture.phases``) when the run had them, else thirds of the run;
- ``affinity.png``: the mean TAG affinity ``affinity/<i>/<j>`` (lookahead) and
  ``affinity_first_order/<i>/<j>`` over the measured steps;
- ``eval_metrics.png``: ``eval/<task>/<metric>`` over the validations, and the last values.

Only what the run logged is reported; a section without data says so. Reads the event files
with TensorBoard's EventAccumulator (``megamt.metrics_log.read_scalars``); a resumed run's
replayed steps count once (the last value).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

Series = dict[int, float]


def load_scalars(run_dir: Path) -> dict[str, Series]:
    from megamt.metrics_log import read_scalars

    tb = run_dir / "tensorboard"
    if not tb.is_dir() or not any(tb.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files under {tb} (is it a megamt run folder?)")
    out: dict[str, Series] = {}
    for tag, points in read_scalars(tb).items():
        series: Series = {}
        for step, value in points:  # files in time order: a replayed step keeps its last value
            series[int(step)] = float(value)
        out[tag] = dict(sorted(series.items()))
    return out


def run_config(run_dir: Path):
    """The run's config: RUN_DIR/config.yaml, else the newest checkpoint's copy; None if neither."""
    from megamt.config import load_config

    candidates = [run_dir / "config.yaml"] + sorted((run_dir / "checkpoints").glob("step_*/megamt_config.yaml"),
                                                    reverse=True)
    for c in candidates:
        if c.is_file():
            try:
                return load_config(c)
            except Exception:  # noqa: BLE001 -- a report must not fail on an old config
                continue
    return None


def by_prefix(scalars: dict[str, Series], prefix: str) -> dict[str, Series]:
    """``{rest of the tag: series}`` of the tags under ``prefix/``."""
    return {t[len(prefix) + 1:]: s for t, s in scalars.items() if t.startswith(prefix + "/")}


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """TensorBoard's exponential moving average (debiased)."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def phases(cfg, last_step: int) -> list[tuple[str, int, int]]:
    """(name, first step, last step) of the run's curriculum phases, else of its thirds."""
    starts = [p.start_step for p in cfg.mixture.phases] if cfg is not None and cfg.mixture.phases else []
    if starts:
        bounds = [max(1, s + 1) for s in starts] + [last_step + 1]
        return [(f"phase {i} ({', '.join(cfg.mixture.phases[i].tasks) or 'all tasks'})", bounds[i], bounds[i + 1] - 1)
                for i in range(len(starts)) if bounds[i] <= last_step]
    a, b = last_step // 3, 2 * last_step // 3
    return [("early", 1, a), ("middle", a + 1, b), ("late", b + 1, last_step)]


def pair_tags(scalars: dict[str, Series], prefix: str) -> dict[tuple[str, str], Series]:
    out = {}
    for rest, s in by_prefix(scalars, prefix).items():
        parts = rest.split("/")
        if len(parts) == 2:
            out[(parts[0], parts[1])] = s
    return out


def conflict_shares(scalars: dict[str, Series], spans: list[tuple[str, int, int]]) -> list[dict]:
    """Per phase: measured steps, mean share of conflicting pairs, and the mean cosine per pair."""
    cos = pair_tags(scalars, "grad/cos")
    steps = sorted({s for series in cos.values() for s in series})
    rows = []
    for name, a, b in spans:
        mine = [s for s in steps if a <= s <= b]
        shares = []
        for s in mine:
            vals = [series[s] for series in cos.values() if s in series]
            if vals:
                shares.append(sum(v < 0 for v in vals) / len(vals))
        rows.append({"phase": name, "steps": f"{a}-{b}", "measured_steps": len(mine),
                     "conflict_share": float(np.mean(shares)) if shares else None,
                     "mean_cosine": {f"{x}/{y}": float(np.mean([series[s] for s in mine if s in series]))
                                     for (x, y), series in cos.items() if any(s in series for s in mine)}})
    return rows


def mean_matrix(tasks: list[str], pairs: dict[tuple[str, str], Series], symmetric: bool,
                steps: Optional[list[int]] = None) -> np.ndarray:
    M = np.full((len(tasks), len(tasks)), np.nan)
    for (a, b), series in pairs.items():
        if a not in tasks or b not in tasks:
            continue
        vals = [v for s, v in series.items() if steps is None or s in steps]
        if vals:
            M[tasks.index(a), tasks.index(b)] = float(np.mean(vals))
            if symmetric:
                M[tasks.index(b), tasks.index(a)] = M[tasks.index(a), tasks.index(b)]
    if symmetric:
        np.fill_diagonal(M, 1.0)
    return M


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(scalars, tasks, path: Path) -> bool:
    train, val = by_prefix(scalars, "train/loss"), by_prefix(scalars, "eval/loss")
    if not train:
        return False
    plt = _plt()
    n = len(tasks)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=90, squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        if t in train:
            s = train[t]
            ax.plot(list(s), list(s.values()), lw=0.6, alpha=0.35, color="C0")
            ax.plot(list(s), smooth(list(s.values())), lw=1.4, color="C0", label="train (smoothed)")
        if t in val:
            ax.plot(list(val[t]), list(val[t].values()), "o-", ms=3, color="C3", label="validation")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_lines(groups: list[tuple[str, dict[str, Series]]], path: Path, ylabel: str, ylim=None) -> bool:
    groups = [(title, series) for title, series in groups if series]
    if not groups:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.2), dpi=90, squeeze=False)
    for ax, (title, series) in zip(axes[0], groups):
        for label, s in series.items():
            ax.plot(list(s), list(s.values()), marker="o" if len(s) < 30 else None, ms=2, lw=1, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
            ax.axhline(0, lw=0.5, color="grey")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_matrices(tasks, mats: list[tuple[str, np.ndarray]], path: Path, vlim=None, title="") -> None:
    from megamt.gradients.monitor import draw_matrix

    plt = _plt()
    fig, axes = plt.subplots(1, len(mats), figsize=(1.2 + (1.6 + 0.5 * len(tasks)) * len(mats), 1.4 + 0.5 * len(tasks)),
                             dpi=90, squeeze=False)
    for ax, (label, M) in zip(axes[0], mats):
        lim = vlim or (float(np.nanmax(np.abs(M))) if np.isfinite(M).any() else 1.0)
        draw_matrix(fig, ax, tasks, M, -lim, lim, ".2g")
        ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the report


def fmt(v, spec=".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def build_report(run_dir: Path, out: Path) -> dict:
    scalars = load_scalars(run_dir)
    cfg = run_config(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = by_prefix(scalars, "train/loss")
    tasks = list(cfg.tasks) if cfg is not None else sorted(train)
    tasks = [t for t in tasks if t in train or any(t in k for k in scalars)] or sorted(train)
    last_step = max((max(s) for s in scalars.values() if s), default=0)
    lines = [f"# Run report: `{run_dir}`", "", f"{last_step} steps logged; tasks: {', '.join(tasks)}."]
    result: dict = {"run_dir": str(run_dir), "steps": last_step, "tasks": tasks, "plots": []}

    # summary table
    val = by_prefix(scalars, "eval/loss")
    lines += ["", "## Losses", "", "| task | first train loss | last train loss | first validation | last validation |",
              "|---|---:|---:|---:|---:|"]
    for t in tasks:
        tr, va = train.get(t, {}), val.get(t, {})
        first = lambda s: next(iter(s.values())) if s else None  # noqa: E731
        last = lambda s: list(s.values())[-1] if s else None  # noqa: E731
        lines.append(f"| {t} | {fmt(first(tr))} | {fmt(last(tr))} | {fmt(first(va))} | {fmt(last(va))} |")
    if plot_losses(scalars, tasks, out / "loss_curves.png"):
        result["plots"].append("loss_curves.png")
        lines += ["", "![loss curves](loss_curves.png)"]
    tps = list(scalars.get("perf/tokens_per_s", {}).values())
    mem = list(scalars.get("mem/peak_gib", {}).values())
    if tps:
        lines += ["", f"Throughput: {np.median(tps):,.0f} tokens/s (median over steps); peak memory "
                  f"{fmt(max(mem) if mem else None, '.2f')} GiB (rank 0)."]

    # mixture
    mix, weights = by_prefix(scalars, "mix/prob"), by_prefix(scalars, "loss_weight")
    lines += ["", "## Mixture"]
    if plot_lines([("mixture rates mix/prob", mix), ("loss weights", weights)], out / "mixture.png", "rate / weight"):
        result["plots"].append("mixture.png")
        lines += ["", "![mixture](mixture.png)"]
    else:
        lines += ["", "No mixture rates logged."]

    # interference
    spans = phases(cfg, last_step)
    cos = pair_tags(scalars, "grad/cos")
    lines += ["", "## Task-gradient interference"]
    if cos:
        shares = conflict_shares(scalars, spans)
        result["conflicts"] = shares
        lines += ["", "Share of task pairs with a negative gradient cosine, per phase (mean over the measuring steps):",
                  "", "| phase | steps | measuring steps | conflicting pairs |", "|---|---|---:|---:|"]
        for r in shares:
            lines.append(f"| {r['phase']} | {r['steps']} | {r['measured_steps']} | "
                         f"{fmt(None if r['conflict_share'] is None else 100 * r['conflict_share'], '.0f')} % |"
                         if r["conflict_share"] is not None else
                         f"| {r['phase']} | {r['steps']} | {r['measured_steps']} | – |")
        plot_lines([("gradient cosine grad/cos", {f"{a}/{b}": s for (a, b), s in cos.items()})],
                   out / "cosine_over_time.png", "cosine", ylim=(-1, 1))
        mats = []
        for name, a, b in spans:
            steps = [s for s in range(a, b + 1)]
            M = mean_matrix(tasks, cos, symmetric=True, steps=steps)
            if np.isfinite(M[~np.eye(len(tasks), dtype=bool)]).any():
                mats.append((f"{name}, steps {a}-{b}", M))
        result["plots"].append("cosine_over_time.png")
        lines += ["", "![cosine over time](cosine_over_time.png)"]
        if mats:
            plot_matrices(tasks, mats, out / "cosine_by_phase.png", vlim=1.0, title="mean task-gradient cosine")
            result["plots"].append("cosine_by_phase.png")
            lines += ["", "![cosine by phase](cosine_by_phase.png)"]
    else:
        lines += ["", "No task-gradient cosines logged (set gradients.monitor_every, or a gradient method)."]

    # affinity
    aff, aff1 = pair_tags(scalars, "affinity"), pair_tags(scalars, "affinity_first_order")
    lines += ["", "## Inter-task affinity (TAG)"]
    if aff or aff1:
        mats = [(label, mean_matrix(tasks, pairs, symmetric=False)) for label, pairs in
                (("lookahead", aff), ("first order", aff1)) if pairs]
        result["affinity"] = {label: M.tolist() for label, M in mats}
        from megamt.gradients.affinity import plot_affinity

        fig = plot_affinity(tasks, dict(mats), {label: len(next(iter(p.values())))
                                                for label, p in (("lookahead", aff), ("first order", aff1)) if p})
        fig.savefig(out / "affinity.png")
        _plt().close(fig)
        result["plots"].append("affinity.png")
        M = mats[0][1]
        lines += ["", f"Mean {mats[0][0]} affinity Z[i -> j] = 1 - L_j(theta - lr g_i) / L_j(theta) "
                  "(row: the task stepped on; column: the task whose loss is read; > 0 helps):", "",
                  "| i \\ j | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for i, t in enumerate(tasks):
            lines.append(f"| {t} | " + " | ".join("–" if i == j else fmt(M[i, j], ".3g") for j in range(len(tasks))) + " |")
        lines += ["", "![affinity](affinity.png)"]
    else:
        lines += ["", "No affinity logged (set gradients.affinity_every)."]

    # eval metrics
    metrics = {}
    for rest, s in by_prefix(scalars, "eval").items():
        parts = rest.split("/")
        if len(parts) == 2 and parts[0] != "loss":
            metrics[f"{parts[0]}/{parts[1]}"] = s
    lines += ["", "## Evaluation metrics"]
    if metrics:
        plot_lines([("eval/<task>/<metric>", metrics)], out / "eval_metrics.png", "score (0-100)")
        result["plots"].append("eval_metrics.png")
        result["eval"] = {k: list(s.values())[-1] for k, s in metrics.items()}
        lines += ["", "| task/metric | first | last (step) |", "|---|---:|---:|"]
        for k, s in metrics.items():
            lines.append(f"| {k} | {fmt(next(iter(s.values())), '.2f')} | {fmt(list(s.values())[-1], '.2f')} "
                         f"({list(s)[-1]}) |")
        lines += ["", "![eval metrics](eval_metrics.png)"]
    else:
        lines += ["", "No metrics logged during training (eval.during_training)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    from megamt.experiments.pairs import json_safe

    (out / "report.json").write_text(json.dumps(json_safe(result), indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("run_dir", help="a run folder (train.run_dir) with tensorboard/")
    ap.add_argument("--out", default=None, help="report folder (default: RUN_DIR/report)")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    out = Path(args.out).resolve() if args.out else run_dir / "report"
    try:
        result = build_report(run_dir, out)
    except FileNotFoundError as e:
        print(f"megamt report: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text(), end="")
    print(f"\nreport: {out / 'report.md'} ({len(result['plots'])} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
