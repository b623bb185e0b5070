"""Gradient methods, loss balancing, interference monitoring (and metrics during training)
wired into the trainer:
2-rank ZeRO-3 CPU runs through the real `deepspeed` launcher on the demo corpus.

The surgery's arithmetic is held to a single-process reference in test_grad_surgery.py;
here: the trainer drives it (one task-homogeneous micro-batch per task, write-back before
the step), the balancer's weights move and are logged, monitoring steps alone pay the
per-task passes, and every tag lands in TensorBoard.
"""

from __future__ import annotations

import math

import pytest

from test_train_deepspeed import TASKS, finish_ok, launch, log_text, records, step_losses

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megamt.demo import prepare

    out = tmp_path_factory.mktemp("demo_grad")
    config = prepare(out, n_train=120, n_val=24, seq_len=128, steps=STEPS)
    return out, config


def _run(demo, name: str, *extra: str):
    out, config = demo
    run_dir = out / name
    proc = launch(config, run_dir, f"train.max_steps={STEPS}", "train.eval_at_start=false", "train.save_every=0",
                  *extra)
    finish_ok(proc, run_dir, 500)
    return run_dir


def test_pcgrad_with_uncertainty_weighting(demo):
    from megamt.metrics_log import read_scalars

    run_dir = _run(demo, "pcgrad", "gradients.method=pcgrad", "gradients.loss_weighting=uncertainty",
                   "gradients.balancer_lr=0.2")
    steps = step_losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for r in steps.values():
        assert math.isfinite(r["train/loss"])
        # every step measured all six tasks: timings and the conflict count are logged
        assert "grad/conflicts" in r and r["grad/time_s/allreduce"] >= 0
    # uncertainty weights start at 1 and move towards 1/L_t (all losses here are > 1)
    first, last = steps[1], steps[STEPS]
    for t in TASKS:
        assert first[f"loss_weight/{t}"] == pytest.approx(1.0)
        assert last[f"loss_weight/{t}"] < 0.95, (t, last[f"loss_weight/{t}"])
    assert last["train/loss/sentiment"] < first["train/loss/sentiment"]
    scalars = read_scalars(run_dir / "tensorboard")
    for i, a in enumerate(TASKS):  # pairs in task order (the config's)
        assert f"grad/norm/{a}" in scalars
        for b in TASKS[i + 1:]:
            cos = [v for _, v in scalars[f"grad/cos/{a}/{b}"]]
            assert len(cos) == STEPS and all(-1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in cos)
    evals = [r for r in records(run_dir) if "eval" in r]
    assert evals and set(evals[-1]["eval"]) == set(TASKS)


def test_monitoring_only_on_measuring_steps(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megamt.metrics_log import read_scalars

    # the same run also computes per-task metrics at its validation point (eval.during_training),
    # and balances with GradNorm: its norms come from G on the measuring steps and from the
    # shared representation (one mixed backward) on the others
    run_dir = _run(demo, "monitor", "gradients.monitor_every=3", "train.log_every=100", "eval.during_training=true",
                   "eval.max_examples=4", "eval.max_new_tokens=8", "gradients.loss_weighting=gradnorm",
                   "gradients.balancer_lr=0.05")
    steps = step_losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    measured = sorted(s for s, r in steps.items() if "grad/conflicts" in r)
    assert measured == [3, 6]
    with_rep = sorted(s for s, r in steps.items() if any(k.startswith("grad/rep_norm/") for k in r))
    assert with_rep == [1, 2, 4, 5]
    for s in with_rep:  # every task of the step (the mixture need not draw all six every step)
        tasks = [t for t in TASKS if f"train/loss/{t}" in steps[s]]
        assert len(tasks) >= 2 and all(steps[s][f"grad/rep_norm/{t}"] > 0 for t in tasks), steps[s]
    # the weights move on plain steps too (GradNorm learns from step 1), and stay a sum of T
    w1, w2 = ([steps[s][f"loss_weight/{t}"] for t in TASKS] for s in (1, 2))
    assert w1 == pytest.approx([1.0] * len(TASKS)) and w2 != pytest.approx(w1, abs=1e-4)
    assert sum(steps[STEPS][f"loss_weight/{t}"] for t in TASKS) == pytest.approx(len(TASKS), abs=1e-3)
    scalars = read_scalars(run_dir / "tensorboard")
    assert sorted(s for s, _ in scalars["grad/cos/sentiment/nli"]) == [3, 6]
    acc = EventAccumulator(str(next((run_dir / "tensorboard").glob("events.out.tfevents.*")).parent),
                           size_guidance={"images": 0})
    acc.Reload()
    assert "grad/cos_heatmap" in acc.Tags()["images"]
    for task in TASKS:  # eval/<task>/<metric> at the end of training, from megamt.eval
        tags = [t for t in scalars if t.startswith(f"eval/{task}/")]
        assert tags and all(scalars[t][-1][0] == STEPS for t in tags), (task, tags)
    assert (run_dir / "eval" / f"step_{STEPS:08d}" / "eval.json").is_file()
    # a measuring step runs one micro-batch per task (6) instead of train.grad_accum (1)
    assert steps[3]["perf/step_time_s"] > steps[2]["perf/step_time_s"]


def test_mgda_under_zero2(demo):
    # ZeRO-2: every task's backward is its own accumulation boundary, the weights move once per step
    run_dir = _run(demo, "zero2", "train.ds_config=zero2", "gradients.method=mgda", "gradients.loss_weighting=dwa")
    steps = step_losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert "zero_stage: 2" in log_text(run_dir)
    for r in steps.values():
        assert math.isfinite(r["train/loss"]) and "grad/conflicts" in r and r["grad/time_s/gram"] >= 0
    # one optimizer (and scheduler) step per megamt step, not one per task micro-batch: the
    # learning rate climbs through the warm-up step by step (6 micro-batches per step would
    # have ended it before step 2)
    lrs = [steps[s]["train/lr"] for s in range(1, STEPS + 1)]
    assert lrs[0] == 0.0 < lrs[1] < lrs[2] and lrs[-1] < lrs[2], lrs
    assert steps[STEPS]["train/loss/sentiment"] < steps[1]["train/loss/sentiment"]


@pytest.mark.parametrize("template,method", [("zero3_offload", "gradvac"), ("zero2_offload", "cagrad")])
def test_gradient_method_under_cpu_offload(demo, template, method):
    # the offloaded optimizer's gradient buffers: the combined partitions reach the CPU Adam step
    # (DeepSpeed's JIT-built op: the first run in a fresh venv compiles it, about 2.5 min here)
    run_dir = _run(demo, template, f"train.ds_config={template}", f"gradients.method={method}")
    steps = step_losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    text = log_text(run_dir)
    assert '"offload_optimizer"' in text and f"zero_stage: {template[4]}" in text
    for r in steps.values():
        assert math.isfinite(r["train/loss"]) and "grad/conflicts" in r and math.isfinite(r["train/grad_norm"])
    assert steps[STEPS]["train/loss/sentiment"] < steps[1]["train/loss/sentiment"]
