"""``megamt experiment transfer SPEC``: single-task vs multitask, measured in one run.

With the same step budget per task, the experiment trains one single-task model per task
(``steps_per_task`` optimizer steps each) and one multitask model per mixing/balancing
setting (``steps_per_task * T`` steps on the T tasks, so the same number of steps per task
and the same total compute as all single-task models together), evaluates every model on
every task it knows, and writes ``OUT/transfer.md`` + ``OUT/transfer.json``:

- per task: the single-task score, each multitask score and the difference
  (multitask - single-task: positive = positive transfer), on the task type's primary
  metric (accuracy, SQuAD F1, entity F1, ROUGE-L);
- held-out tasks (``held_out:``; causal LMs and encoder-decoders): trained single-task as the supervised
  reference, left out of the multitask training, evaluated zero-shot; the ratio
  zero-shot / supervised;
- the resource table: number of models, total training time, peak memory (max over
  runs and ranks of the per-process peak: RSS on the CPU, allocated memory on a GPU),
  total parameters stored;
- PNG plots: per-task score bars, per-task training-loss curves, the task-gradient cosine
  heatmap when the multitask run measured it (``gradients.monitor_every``).

Every number comes from the runs this command starts. SPEC (YAML)::

    base: ../spec.yaml          # the multitask training config (relative to this file)
    overrides: [data.seq_len=128, train.micro_batch_size=8]
    tasks: [sst2, rte, conll, squad]   # default: every training task of base
    held_out: []                # tasks left out of multitask training, evaluated zero-shot
    steps_per_task: 100
    multitask:                  # setting name -> extra overrides (default: {multitask: []})
      temperature: [mixture.strategy=temperature]
      pcgrad: [gradients.method=pcgrad]
    launcher: python            # python (one process) | deepspeed (``--num_gpus``) | inprocess
    num_gpus: 2
    eval: {split: validation, max_examples: 200, max_new_tokens: 32, batch_size: 16}
    out: runs/transfer          # relative to this file; ``--out`` wins

Each model trains in its own process (``python -m megamt.experiments.transfer run CONFIG`` or the
same under ``deepspeed``) through ``MultitaskTrainer``; after training that process
evaluates the engine's (partitioned) model with :func:`megamt.eval.api.evaluate` (gathering
bounded, ``MultitaskTrainer.evaluate_trained``) and writes
``run_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SPEC_KEYS = {"base", "overrides", "tasks", "held_out", "steps_per_task", "multitask", "launcher", "num_gpus",
             "eval", "out", "seed"}
EVAL_KEYS = {"split", "max_examples", "max_new_tokens", "batch_size"}
# python: one process per model; deepspeed: `deepspeed --num_gpus N` per model; inprocess: every
# model in this process, one after the other (fast for tiny tests; the peak memory of a later
# run is then the process's peak so far, an upper bound)
LAUNCHERS = ("python", "deepspeed", "inprocess")


class TransferSpecError(ValueError):
    """A bad experiment spec; the message names the key."""


# --------------------------------------------------------------------------- spec and plan


def load_spec(path: str | Path, out: str | None = None) -> dict:
    from megamt.config import load_config, load_yaml

    path = Path(path).resolve()
    if not path.is_file():
        raise TransferSpecError(f"{path}: experiment spec not found")
    raw = load_yaml(path) or {}
    problems = [f"{path}: unknown key {k!r} (known: {sorted(SPEC_KEYS)})" for k in raw if k not in SPEC_KEYS]
    if "base" not in raw:
        problems.append(f"{path}: base (the multitask training config) is required")
    for k in raw.get("eval") or {}:
        if k not in EVAL_KEYS:
            problems.append(f"{path}: eval.{k}: unknown key (known: {sorted(EVAL_KEYS)})")
    steps = raw.get("steps_per_task", 50)
    if not isinstance(steps, int) or steps < 1:
        problems.append(f"{path}: steps_per_task must be an integer >= 1, got {steps!r}")
    if raw.get("launcher", "python") not in LAUNCHERS:
        problems.append(f"{path}: launcher must be one of {LAUNCHERS}, got {raw.get('launcher')!r}")
    if problems:
        raise TransferSpecError("\n".join(problems))
    base = (path.parent / raw["base"]).resolve()
    overrides = [str(o) for o in raw.get("overrides") or []]
    cfg = load_config(base, overrides)
    train_tasks = cfg.train_task_names
    tasks = list(raw.get("tasks") or train_tasks)
    held_out = list(raw.get("held_out") or [])
    for t in tasks + held_out:
        if t not in cfg.tasks:
            problems.append(f"{path}: task {t!r} is not in {base} (tasks: {list(cfg.tasks)})")
    if held_out and _family(cfg) == "encoder":
        problems.append(f"{path}: held_out needs a text-to-text family, causal_lm or seq2seq (an encoder has no "
                        "head for an unseen task)")
    if len(tasks) < 2:
        problems.append(f"{path}: a transfer experiment needs at least 2 tasks, got {tasks}")
    multitask = raw.get("multitask") or {"multitask": []}
    if not isinstance(multitask, dict):
        problems.append(f"{path}: multitask must map a setting name to a list of overrides")
    if problems:
        raise TransferSpecError("\n".join(problems))
    out_dir = Path(out) if out else (path.parent / raw.get("out", "transfer_out"))
    return {"spec_path": str(path), "base": str(base), "overrides": overrides, "tasks": tasks, "held_out": held_out,
            "steps_per_task": steps, "multitask": {k: [str(o) for o in (v or [])] for k, v in multitask.items()},
            "launcher": raw.get("launcher", "python"), "num_gpus": int(raw.get("num_gpus", 2)),
            "eval": dict(raw.get("eval") or {}), "out": str(out_dir.resolve()), "seed": raw.get("seed")}


def _family(cfg) -> str:
    """The backbone's family (causal_lm, encoder, seq2seq): configured, else from its config."""
    from megamt.model import resolve_family

    if cfg.model.family != "auto" or not (cfg.model.name_or_path or cfg.model.from_config):
        return cfg.model.family
    return resolve_family(cfg.model)


def plan_runs(spec: dict) -> list[dict]:
    """Every model to train: name, kind (single | multitask), its tasks, steps and overrides."""
    runs = []
    for t in spec["tasks"] + spec["held_out"]:
        runs.append({"name": f"single-{t}", "kind": "single", "setting": "single-task", "train_tasks": [t],
                     "eval_tasks": [t], "max_steps": spec["steps_per_task"], "extra": []})
    n = len(spec["tasks"])
    for setting, extra in spec["multitask"].items():
        runs.append({"name": f"multitask-{setting}", "kind": "multitask", "setting": setting,
                     "train_tasks": list(spec["tasks"]), "eval_tasks": list(spec["tasks"]) + spec["held_out"],
                     "max_steps": spec["steps_per_task"] * n, "extra": list(extra)})
    return runs


def run_config(spec: dict, run: dict, shards_dir: str):
    """The resolved MultitaskConfig of one run (tasks restricted, steps, run_dir, shards)."""
    from megamt.config import load_config

    out = Path(spec["out"])
    overrides = spec["overrides"] + run["extra"] + [
        f"train.max_steps={run['max_steps']}", f"train.run_dir={out / 'runs' / run['name']}",
        f"data.shards_dir={shards_dir}"]
    if spec.get("seed") is not None:
        overrides.append(f"train.seed={spec['seed']}")
    from megamt.experiments.runner import restrict_tasks

    return restrict_tasks(load_config(spec["base"], overrides), run["train_tasks"], run["eval_tasks"])


# --------------------------------------------------------------------------- one run (child process)


def run_one(config_path: str, eval_opts: dict) -> int:
    """Train one model, evaluate it, write ``run_summary.json`` (rank 0)."""
    import torch

    from megamt.config import load_config
    from megamt.metrics_log import peak_memory_gib

    cfg = load_config(config_path)
    from megamt.trainer import MultitaskTrainer

    trainer = MultitaskTrainer(None, cfg, resume=False)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
    t0 = time.perf_counter()
    summary = trainer.train()
    train_s = time.perf_counter() - t0
    from megamt import comm

    peak = torch.tensor(comm.reduce_values([peak_memory_gib()], "max"))
    eval_tasks = {t: {} for t in cfg.tasks}
    t1 = time.perf_counter()
    results = trainer.evaluate_trained(  # partitioned, gathering bounded
        eval_tasks, split=eval_opts.get("split"), max_examples=eval_opts.get("max_examples"),
        max_new_tokens=eval_opts.get("max_new_tokens"), batch_size=eval_opts.get("batch_size"),
        out_dir=Path(cfg.train.run_dir) / "eval", progress=False)
    eval_s = time.perf_counter() - t1
    if trainer.rank == 0:
        out = {"config": config_path, "train_seconds": train_s, "eval_seconds": eval_s,
               "peak_memory_gib": float(peak[0]), "parameters": int(n_params), "steps": summary.get("step"),
               "world_size": trainer.world_size, "final_train_loss": summary.get("loss"),
               "eval_loss": summary.get("eval_loss"), "eval": results}
        (Path(cfg.train.run_dir) / "run_summary.json").write_text(json.dumps(out, indent=1))
    return 0


# --------------------------------------------------------------------------- the experiment (parent)


def _launch(spec: dict, config_path: Path, log_path: Path) -> None:
    from megamt.experiments.launch import free_port

    eval_json = json.dumps(spec["eval"])
    if spec["launcher"] == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(spec["num_gpus"]), "--master_port", str(free_port()),
               "--module", "megamt.experiments.transfer", "run", str(config_path), "--eval-json", eval_json]
        exe = Path(sys.executable).parent / "deepspeed"
        if exe.is_file():
            cmd[0] = str(exe)
    else:
        cmd = [sys.executable, "-m", "megamt.experiments.transfer", "run", str(config_path), "--eval-json", eval_json]
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"run {config_path.parent.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def run_experiment(spec: dict, log=print) -> dict:
    from megamt.data.shards import build_shards

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(spec)
    all_tasks = spec["tasks"] + spec["held_out"]
    shards_dir = out / "shards"
    t_start = time.perf_counter()
    # shards of every task once; each run reads its tasks from them
    shard_cfg = run_config(spec, {"name": "shards", "train_tasks": all_tasks, "eval_tasks": all_tasks,
                                  "max_steps": 1, "extra": []}, str(shards_dir))
    if not (shards_dir / "manifest.json").is_file():
        log(f"building shards of {all_tasks} into {shards_dir}")
        build_shards(shard_cfg, out_dir=shards_dir, progress=False, log=log)
    for i, run in enumerate(runs):
        run_dir = out / "runs" / run["name"]
        summary = run_dir / "run_summary.json"
        if summary.is_file():
            log(f"[{i + 1}/{len(runs)}] {run['name']}: done before, reusing {summary}")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = run_config(spec, run, str(shards_dir))
        cfg_path = run_dir / "config.yaml"
        cfg_path.write_text(cfg.to_yaml())
        log(f"[{i + 1}/{len(runs)}] {run['name']}: {run['max_steps']} steps on {run['train_tasks']}")
        t0 = time.perf_counter()
        if spec["launcher"] == "inprocess":
            run_one(str(cfg_path), spec["eval"])
        else:
            _launch(spec, cfg_path, run_dir / "log.txt")
        log(f"[{i + 1}/{len(runs)}] {run['name']}: finished in {time.perf_counter() - t0:.1f} s")
    report = aggregate(spec, runs)
    report["wall_seconds"] = time.perf_counter() - t_start
    write_experiment_report(report, out)
    return report


def _read_losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return curves
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k.startswith("train/loss/") and v is not None:
                curves.setdefault(k[len("train/loss/"):], []).append((rec["step"], float(v)))
    return curves


def _cosine_records(run_dir: Path) -> list[dict]:
    """Scalar records of a run: train_log.jsonl lines, else the TensorBoard events (tag -> value)."""
    log = run_dir / "train_log.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if any(k.startswith("grad/cos/") for r in recs for k in r):
        return recs
    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        return []
    from megamt.metrics_log import read_scalars

    by_step: dict[int, dict] = {}
    for tag, series in read_scalars(tb).items():
        if tag.startswith("grad/cos/"):
            for step, value in series:
                by_step.setdefault(step, {})[tag] = value
    return list(by_step.values())


def _read_cosines(run_dir: Path, tasks: list[str]):
    """Mean task-gradient cosine matrix over the monitored steps, when the run measured it
    (``grad/cos/<a>/<b>`` scalars of megamt.gradients.monitor, in train_log.jsonl or TensorBoard)."""
    import numpy as np

    sums, n = np.zeros((len(tasks), len(tasks))), np.zeros((len(tasks), len(tasks)))
    for rec in _cosine_records(run_dir):
        for k, v in rec.items():
            parts = k.split("/")
            if v is None or len(parts) != 4 or parts[:2] != ["grad", "cos"]:
                continue
            if parts[2] in tasks and parts[3] in tasks:
                i, j = tasks.index(parts[2]), tasks.index(parts[3])
                for x, y in ((i, j), (j, i)):
                    sums[x, y] += v
                    n[x, y] += 1
    if not n.any():
        return None
    np.fill_diagonal(sums, 1.0)
    np.fill_diagonal(n, 1.0)
    return np.where(n > 0, sums / np.maximum(n, 1), np.nan).tolist()  # NaN: pair never measured


def aggregate(spec: dict, runs: list[dict]) -> dict:
    """Scores, differences and resources from the runs' summaries (all measured numbers)."""
    from megamt.eval.metrics import primary_metric

    out = Path(spec["out"])
    summaries = {}
    for run in runs:
        path = out / "runs" / run["name"] / "run_summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the run {run['name']} did not finish)")
        summaries[run["name"]] = json.loads(path.read_text())
    settings = list(spec["multitask"])
    tasks = []
    for t in spec["tasks"] + spec["held_out"]:
        st = summaries[f"single-{t}"]["eval"]["tasks"][t]
        metric = primary_metric(st["task_type"], st["metrics"])
        row: dict[str, Any] = {"task": t, "task_type": st["task_type"], "metric": metric,
                               "held_out": t in spec["held_out"], "n_examples": st["n_examples"],
                               "single": st["metrics"][metric], "multitask": {}, "diff": {}, "ratio": {}}
        for s in settings:
            mt = summaries[f"multitask-{s}"]["eval"]["tasks"].get(t)
            if mt is None:
                continue
            row["multitask"][s] = mt["metrics"][metric]
            row["diff"][s] = mt["metrics"][metric] - row["single"]
            if row["held_out"]:
                row["ratio"][s] = mt["metrics"][metric] / row["single"] if row["single"] else float("nan")
        tasks.append(row)
    groups = {"single-task": [r for r in runs if r["kind"] == "single"]}
    for s in settings:
        groups[f"multitask ({s})"] = [r for r in runs if r["kind"] == "multitask" and r["setting"] == s]
    resources = []
    for label, members in groups.items():
        sums = [summaries[r["name"]] for r in members]
        resources.append({"configuration": label, "models": len(sums),
                          "steps": sum(s["steps"] or 0 for s in sums),
                          "train_seconds": sum(s["train_seconds"] for s in sums),
                          "peak_memory_gib": max(s["peak_memory_gib"] for s in sums),
                          "parameters_stored": sum(s["parameters"] for s in sums),
                          "world_size": max(s["world_size"] for s in sums)})
    curves = {r["name"]: _read_losses(out / "runs" / r["name"]) for r in runs}
    cosines = {s: _read_cosines(out / "runs" / f"multitask-{s}", spec["tasks"]) for s in settings}
    return {"spec": spec, "tasks": tasks, "resources": resources, "settings": settings, "curves": curves,
            "cosines": {k: v for k, v in cosines.items() if v is not None},
            "runs": {n: {k: v for k, v in s.items() if k != "eval"} for n, s in summaries.items()}}


def markdown_report(report: dict) -> str:
    spec = report["spec"]
    settings = report["settings"]
    lines = ["# Transfer: single-task vs multitask", "",
             f"Spec: `{spec['spec_path']}` (base `{spec['base']}`); {spec['steps_per_task']} steps per task "
             f"(single-task: {spec['steps_per_task']} steps each; multitask: {spec['steps_per_task']} x "
             f"{len(spec['tasks'])} tasks). Scores on the 0-100 scale; diff = multitask - single-task.", ""]
    head = "| task | metric | n | single-task | " + " | ".join(f"multitask ({s}) | diff ({s})" for s in settings) + " |"
    lines += [head, "|" + "---|" * (4 + 2 * len(settings))]
    for r in report["tasks"]:
        cells = []
        for s in settings:
            v = r["multitask"].get(s)
            d = r["diff"].get(s)
            cells += ["–" if v is None else f"{v:.2f}", "–" if d is None else f"{d:+.2f}"]
        name = r["task"] + (" (held out: zero-shot)" if r["held_out"] else "")
        lines.append(f"| {name} | {r['metric']} | {r['n_examples']} | {r['single']:.2f} | " + " | ".join(cells) + " |")
    held = [r for r in report["tasks"] if r["held_out"]]
    if held:
        lines += ["", "Zero-shot / supervised (single-task) ratio: " + "; ".join(
            f"{r['task']} " + ", ".join(f"{s} {v:.3f}" for s, v in r["ratio"].items()) for r in held)]
    lines += ["", "| configuration | models | steps | total training time (s)¹ | peak memory per process (GiB) | "
              "parameters stored |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["resources"]:
        lines.append(f"| {r['configuration']} | {r['models']} | {r['steps']} | {r['train_seconds']:.1f} | "
                     f"{r['peak_memory_gib']:.2f} | {r['parameters_stored']:,} |")
    ws = max(r["world_size"] for r in report["resources"])
    note = (" Runs shared one process (launcher inprocess): a run's peak memory is the process's peak so far."
            if spec["launcher"] == "inprocess" else "")
    lines += ["", "¹ `MultitaskTrainer.train()` of every model: the optimizer steps plus the final validation loss "
              "and checkpoint; start-up and the metric evaluation are not included.",
              "", f"Launcher: {spec['launcher']}; ranks per run: {ws}.{note} Wall time of the whole experiment (shards, training, evaluation): "
              f"{report.get('wall_seconds', float('nan')):.1f} s.", "",
              "Plots: `scores.png`, `loss_curves.png`" + (", `grad_cosine.png`" if report["cosines"] else
                                                         " (no gradient cosines measured)") + "."]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    tasks, settings = report["tasks"], report["settings"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.6))
    width = 0.8 / (1 + len(settings))
    x = np.arange(len(tasks))
    ax.bar(x, [r["single"] for r in tasks], width, label="single-task")
    for k, s in enumerate(settings):
        ax.bar(x + (k + 1) * width, [r["multitask"].get(s, np.nan) for r in tasks], width, label=f"multitask ({s})")
    ax.set_xticks(x + width * len(settings) / 2)
    ax.set_xticklabels([f"{r['task']}\n{r['metric']}" for r in tasks], fontsize=8)
    ax.set_ylabel("score (0-100)")
    ax.set_title("per-task score")
    ax.legend(fontsize=7)
    save(fig, "scores.png")

    names = [r["task"] for r in tasks if not r["held_out"]]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, t in zip(axes[0], names):
        for run, curves in report["curves"].items():
            if t not in curves:
                continue
            steps, vals = zip(*curves[t])
            total = max(steps)
            ax.plot([s / total for s in steps], vals, label=run, lw=1)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("fraction of the run's steps")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=6)
    save(fig, "loss_curves.png")

    if report["cosines"]:
        fig, axes = plt.subplots(1, len(report["cosines"]), figsize=(4 * len(report["cosines"]), 3.6), squeeze=False)
        for ax, (s, mat) in zip(axes[0], report["cosines"].items()):
            im = ax.imshow(np.array(mat), vmin=-1, vmax=1, cmap="coolwarm")
            ax.set_xticks(range(len(names)))
            ax.set_yticks(range(len(names)))
            ax.set_xticklabels(names, rotation=45, fontsize=7)
            ax.set_yticklabels(names, fontsize=7)
            ax.set_title(f"gradient cosine ({s})", fontsize=9)
            fig.colorbar(im, ax=ax)
        save(fig, "grad_cosine.png")
    return written


def write_experiment_report(report: dict, out: Path) -> None:
    out = Path(out)
    (out / "transfer.json").write_text(json.dumps(report, indent=1))
    md = markdown_report(report)
    (out / "transfer.md").write_text(md)
    plot_report(report, out)
    print(md, end="")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # the child process of one model
        ap = argparse.ArgumentParser(prog="megamt.experiments.transfer run")
        ap.add_argument("cmd")
        ap.add_argument("config")
        ap.add_argument("--eval-json", default="{}")
        ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        args = ap.parse_args(argv)
        rc = run_one(args.config, json.loads(args.eval_json))
        from megamt import comm

        comm.leave()  # every rank together, so that no rank aborts at exit (see comm.leave)
        return rc
    ap = argparse.ArgumentParser(prog="megamt experiment", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["transfer"])
    ap.add_argument("spec", help="experiment spec YAML (see `megamt experiment --help`)")
    ap.add_argument("--out", default=None, help="output folder (default: the spec's `out`)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args = ap.parse_args(argv)
    from megamt.config import ConfigError

    try:
        spec = load_spec(args.spec, args.out)
        if args.dry_run:
            for r in plan_runs(spec):
                print(f"{r['name']}: {r['max_steps']} steps on {r['train_tasks']}, evaluated on {r['eval_tasks']}")
            return 0
        run_experiment(spec)
    except (TransferSpecError, ConfigError) as e:
        print(f"megamt experiment: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from megamt import comm as _comm

    _comm.exit_process(main())  # a launched rank: see comm.exit_process
