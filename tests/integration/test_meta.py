"""Meta-learning (Reptile, first-order MAML) on 2 ZeRO CPU ranks.

- ``partitions``: one launch of meta_script.py holds megamt.gradients.meta.MetaPartitions to a
  single-process float64 reference of the same algorithm on ZeRO-3 (both methods, SGD and Adam
  inner optimizers, with and without CPU optimizer offload and persistent parameters) and on
  ZeRO-1 and ZeRO-2 (both methods, with and without CPU optimizer offload; the ``z1_``/``z2_``
  cases); ``*_skipped``: a NaN query loss makes DeepSpeed skip fomaml's outer step, and the
  model must hold theta0 again (``restore(publish=False)``, then ``publish()`` after the skip).
- ``runs``: the trainer's meta mode on the demo corpus through the real launcher: the TensorBoard
  tags, Reptile's annealed eps (batched Reptile on ZeRO-2), and exact resumes (a fomaml run on
  ZeRO-3 and the Reptile run on ZeRO-2, stopped after 2 of 4 steps and resumed, log the same
  numbers to the bit as uninterrupted ones; the inner Adam state is in the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

from test_train_deepspeed import run_group, step_losses

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("meta_script.py")
CASES = ["reptile_sgd", "reptile_adam", "fomaml_sgd", "fomaml_adam", "reptile_offload", "fomaml_offload",
         "reptile_persistent", "fomaml_persistent", "reptile_batched", "reptile_batched_offload",
         "z1_reptile_sgd", "z1_fomaml_adam", "z1_fomaml_offload", "z2_reptile_adam", "z2_fomaml_sgd",
         "z2_reptile_offload", "z2_fomaml_offload", "z2_reptile_batched_offload", "fomaml_skipped",
         "z2_fomaml_skipped"]
STEPS = 4
META = ["train.micro_batch_size=2", "train.lr=0.005", "train.warmup_steps=2", "train.log_every=1",
        "train.eval_batches=2", "train.progress_bar=false", "train.eval_at_start=false", "train.save_every=0",
        f"train.max_steps={STEPS}", "meta.inner_steps=2", "meta.inner_lr=0.05",
        "tasks.nli.zero_shot=true"]  # held out of training: the small experiment adapts to it


@pytest.fixture(scope="module")
def partitions(tmp_path_factory):
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        launcher = shutil.which("deepspeed")
    if not launcher:
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path_factory.mktemp("meta") / "results.json"
    port = str(29500 + random.randrange(2000))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = run_group([str(launcher), "--num_gpus", "2", "--master_port", port, str(SCRIPT), str(out)], 600, env=env)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_outer_step_matches_float64_reference(partitions, case):
    r = partitions[case]
    assert "error" not in r, r.get("error")
    assert r["param"] <= 1e-5, r  # relative max error of the weights after each outer step
    assert r["disp"] <= 1e-5, r  # |theta_k - theta0| from the partitions' local sums
    assert r["moved"] > 1e-2, r  # the outer steps moved the weights (the comparison is not vacuous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Seven trainer runs in ONE launch (meta_train_script.py): reptile on ZeRO-2 uninterrupted, stopped
    after 2 steps, the same resumed; fomaml (ZeRO-3) uninterrupted, stopped after 2 steps, the same
    resumed; plain multitask with reptile's micro-batch budget."""
    from megamt.demo import prepare

    from test_train_deepspeed import TRAIN, _free_port

    out = tmp_path_factory.mktemp("demo_meta")
    config = prepare(out, n_train=120, n_val=24, seq_len=128, steps=STEPS)
    dirs = {name: out / name for name in ("reptile", "reptile_cut", "fomaml", "fomaml_cut", "multitask")}
    reptile = ["meta.method=reptile", "meta.outer_lr=0.5", "meta.tasks_per_step=2", "train.ds_config=zero2"]
    plan = [[f"train.run_dir={dirs['reptile']}", *reptile],
            [f"train.run_dir={dirs['reptile_cut']}", *reptile, "train.stop_at_step=2"],
            ["--resume", f"train.run_dir={dirs['reptile_cut']}", *reptile],
            [f"train.run_dir={dirs['fomaml']}", "meta.method=fomaml", "meta.inner_optimizer=adam"],
            [f"train.run_dir={dirs['fomaml_cut']}", "meta.method=fomaml", "meta.inner_optimizer=adam",
             "train.stop_at_step=2"],
            ["--resume", f"train.run_dir={dirs['fomaml_cut']}", "meta.method=fomaml", "meta.inner_optimizer=adam"],
            [f"train.run_dir={dirs['multitask']}", f"train.max_steps={2 * STEPS}"]]
    args = []
    for i, run in enumerate(plan):
        args += (["--"] if i else []) + [*TRAIN, *META, *run]
    launcher = Path(sys.executable).with_name("deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = run_group([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()),
                      str(Path(__file__).with_name("meta_train_script.py")), str(config), *args], 600, env=env)
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    dirs["log"] = out / "launch.log"
    dirs["config"] = config
    return dirs


def test_reptile_logs_meta_tags_and_anneals_eps(runs):
    from megamt.metrics_log import read_scalars

    [ds] = (runs["reptile"] / "checkpoints").glob("*/ds_config.json")
    assert json.loads(ds.read_text())["zero_optimization"]["stage"] == 2  # the trainer's ZeRO-1/2 path
    steps = step_losses(runs["reptile"])
    assert sorted(steps) == list(range(1, STEPS + 1))
    before, after = [], []
    for s, r in steps.items():
        # two tasks per outer step (batched Reptile; the same one may be drawn twice): each one's
        # inner losses before and after adaptation
        tasks = [k.split("/")[2] for k in r if k.startswith("meta/inner_loss/") and k.endswith("/before")]
        assert 1 <= len(tasks) <= 2 and all(f"train/loss/{t}" in r for t in tasks), r
        before += [r[f"meta/inner_loss/{t}/before"] for t in tasks]
        after += [r[f"meta/inner_loss/{t}/after"] for t in tasks]
        assert r["meta/outer_lr"] == pytest.approx(0.5 * (1 - (s - 1) / STEPS))  # linear annealing
        assert r["meta/displacement_norm"] > 0 and math.isfinite(r["meta/displacement_norm"])
    assert sum(after) < sum(before)  # the inner steps adapt to the task
    scalars = read_scalars(runs["reptile"] / "tensorboard")
    assert "meta/displacement_norm" in scalars and any(t.startswith("meta/inner_loss/") for t in scalars)


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_resume_is_exact(runs, method):
    """fomaml with inner Adam on ZeRO-3, batched Reptile on ZeRO-2: stopped after step 2 and resumed."""
    full, cut = step_losses(runs[method]), step_losses(runs[f"{method}_cut"])
    assert sorted(full) == sorted(cut) == list(range(1, STEPS + 1))
    keys = lambda r: {k: v for k, v in r.items() if k.startswith(("train/loss", "meta/", "train/grad_norm"))}
    for s in range(1, STEPS + 1):
        assert keys(cut[s]) == keys(full[s]), s  # to the bit
    assert f"resumed from {runs[f'{method}_cut']}" in runs["log"].read_text()
    assert full[STEPS]["meta/outer_lr"] > 0  # fomaml: DeepSpeed's optimizer (train.lr schedule) is the outer one


def test_small_adaptation_experiment(runs, tmp_path):
    """tools/bench_meta.py's comparison, small: the three models above (8 / 8 / 12 micro-batches per rank:
    multitask / reptile / fomaml) exported and adapted to the task they never trained on (nli)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import argparse

    from bench_meta import adapt_models, markdown

    from megamt.config import load_config
    from megamt.export import main as export
    from megamt.model import MultitaskModel

    models = {}
    for name in ("multitask", "reptile", "fomaml"):
        assert export([str(runs[name]), str(tmp_path / name)]) == 0
        models[name] = lambda n=name: MultitaskModel.from_pretrained(tmp_path / n)
    results = adapt_models(models, load_config(runs["config"]), ["nli"], shots=[4, 8], steps=2, seeds=[0],
                           lr=3e-3, max_examples=8, out=tmp_path / "adapt")
    assert set(results) == {"multitask", "reptile", "fomaml"}
    for r in results.values():
        assert r["nli"]["metric"] == "accuracy" and set(r["nli"]["by_k"]) == {"4", "8"}
        assert (tmp_path / "adapt").is_dir()
    table = markdown({"train_seconds": {}, "results": results}, "test",
                     argparse.Namespace(steps=2, seeds=[0], shots=[4, 8]), tasks=["nli"])
    assert table.count("\n| ") == 4  # the header and one row per model
