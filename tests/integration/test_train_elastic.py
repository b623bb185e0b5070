"""Elastic resume: a checkpoint of 2 ZeRO-3 ranks resumed by 1 rank and back by 2 (and a
ZeRO-2 one by 1 rank), through DeepSpeed universal checkpoints (real launcher, CPU, demo corpus).

The weights must come back exactly: a 1-rank run resumed at the checkpoint's own step
(no training step) evaluates the whole validation split to the losses the 2-rank run
measured at that step. The learning-rate schedule and the step counter continue; the data
streams restart reshuffled (said in the log). The ZeRO-3 checkpoints are small, so rank 0
converts them at start-up (the other ranks wait on the completion marker); the ZeRO-2 one
is converted beforehand by `megamt convert-checkpoint --workers 2`, as at scale, and the run
that resumes it is not allowed to convert (train.elastic_convert_max_gb=0). One resume also
finds `latest` deleted: it must resume from the newest complete checkpoint, not restart.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from test_train_deepspeed import TASKS, finish_ok, launch, log_text, records, run_group, step_losses

pytestmark = pytest.mark.integration

ALL_VAL = "train.eval_batches=1000"  # every validation batch: the same examples on 1 and 2 ranks


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megamt.demo import prepare

    out = tmp_path_factory.mktemp("demo_elastic")
    return out, prepare(out, n_train=120, n_val=24, seq_len=128, steps=8)


def _run(config, run_dir, gpus, *extra):
    proc = launch(config, run_dir, "train.eval_at_start=false", "train.save_every=0", ALL_VAL, *extra, gpus=gpus)
    finish_ok(proc, run_dir, 400)


def _last_eval(run_dir):
    return [r for r in records(run_dir) if "eval" in r][-1]


def test_shrink_and_grow(demo):
    out, config = demo
    run_dir = out / "run"
    # 2 ranks train steps 1-4, checkpoint, validate the whole split
    _run(config, run_dir, 2, "train.max_steps=4")
    assert sorted(step_losses(run_dir)) == [1, 2, 3, 4]
    two = _last_eval(run_dir)
    # 1 rank resumes at step 4 with nothing left to train: its final validation measures the
    # loaded weights only, and must equal the 2 ranks' validation of the same weights
    _run(config, run_dir, 1, "train.max_steps=4")
    one = _last_eval(run_dir)
    assert one["step"] == two["step"] == 4 and one is not two
    for t in TASKS:
        assert one["eval"][t] == pytest.approx(two["eval"][t], rel=1e-5), t
    text = log_text(run_dir)
    assert "was written by 2 rank(s), this run has 1" in text and "data streams restart reshuffled" in text
    assert (run_dir / "checkpoints" / "step_00000004" / "universal" / "zero").is_dir()

    # 1 rank trains steps 5-6; 2 ranks resume that 1-rank checkpoint and train 7-8. The
    # scheduler state comes back (warm-up is 2 steps from lr 0: a restarted schedule would
    # log lr 0 at the first resumed step)
    _run(config, run_dir, 1, "train.max_steps=6")
    (run_dir / "checkpoints" / "latest").unlink()  # lost: the complete step_6 must still be resumed
    _run(config, run_dir, 2, "train.max_steps=8")
    text = log_text(run_dir)
    assert "latest was missing" in text and f"resumed from {run_dir / 'checkpoints'}/step_00000006 at step 6" in text
    steps = step_losses(run_dir)
    assert [r["step"] for r in records(run_dir) if "train/loss" in r] == list(range(1, 9))  # each step once
    for s in (5, 6, 7, 8):
        assert math.isfinite(steps[s]["train/loss"]) and steps[s]["train/lr"] > 0, steps[s]
    assert "was written by 1 rank(s), this run has 2" in log_text(run_dir)
    assert _last_eval(run_dir)["step"] == 8


def test_zero2_converted_offline_then_shrunk_exact_weights(demo):
    """ZeRO-2 checkpoints carry no universal_checkpoint_info; the conversion injects the
    default one, and the weights come back exactly on 1 rank. The conversion is the explicit
    command with 2 worker processes; the resuming run only loads it."""
    out, config = demo
    run_dir = out / "run_zero2"
    _run(config, run_dir, 2, "train.max_steps=3", "train.ds_config=zero2")
    two = _last_eval(run_dir)
    megamt = Path(sys.executable).parent / "megamt"
    proc = run_group([str(megamt), "convert-checkpoint", str(run_dir), "--workers", "2"], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    universal = run_dir / "checkpoints" / "step_00000003" / "universal"
    assert json.loads((universal / "megamt_universal.json").read_text())["workers"] == 2
    assert "1. Extracting ZeRO fragments" in proc.stdout and "universal checkpoint complete" in proc.stdout
    _run(config, run_dir, 1, "train.max_steps=3", "train.ds_config=zero2", "train.elastic_convert_max_gb=0")
    one = _last_eval(run_dir)
    text = log_text(run_dir)
    assert one["step"] == two["step"] == 3 and "was written by 2 rank(s), this run has 1" in text
    assert "converting it into a DeepSpeed universal checkpoint" not in text
    for t in TASKS:
        assert one["eval"][t] == pytest.approx(two["eval"][t], rel=1e-5), t
