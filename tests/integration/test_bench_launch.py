"""The benchmark tools that launch `deepspeed --num_gpus 2` run end to end at their smallest
settings (the others: tests/unit/test_bench_tools.py). bench_train's fairness holds in the run:
every side's ranks report literally megamt's resolved ZeRO and optimizer sections and one
optimizer class, and peak memory is the maximum over the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def _tool(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=os.environ)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_train_three_sides_same_engine(tmp_path):
    _, out = _tool(str(TOOLS / "bench_train.py"), "--data", "demo", "--steps", "3", "--warmup", "1", "--seq-len", "64",
                   "--rows", "1", "--hidden", "64", "--layers", "1", "--out", str(tmp_path / "bench_train"))
    assert set(out["results"]) == {"megamt", "hf", "trl"}
    engine = out["engine"]
    zero, opt = engine["zero_optimization"], engine["optimizer"]
    # resolved with the model's hidden size (64), as megamt's trainer does: not DeepSpeed's 5e8 defaults
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_param_persistence_threshold"] == 640
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True
    assert engine["optimizer_class"] == "torch.optim.adamw.AdamW" and engine["same_on_every_side_and_rank"]
    for side, r in out["results"].items():
        rank_peaks = [json.loads(p.read_text())["peak_gib"] for p in (tmp_path / "bench_train").glob(f"rank_{side}_*.json")]
        assert len(rank_peaks) == 2 and r["peak_gib_max_over_ranks"] == max(rank_peaks) > 0, side
        assert r["nonpad_tokens_per_s"] > 0 and r["steps_measured"] == 2, (side, r)
    assert 0 < out["lm_head_token_fraction"] < 1
    assert out["ratio_megamt_vs_hf"] > 0 and out["ratio_megamt_vs_trl"] > 0


def test_bench_gradients_zero3_part(tmp_path):
    _, out = _tool(str(TOOLS / "bench_gradients.py"), "--steps", "1", "--tasks", "2", "--stage", "3")
    res = out["cpu_zero3_2ranks"]["results"]
    assert list(res) == ["T=2"] and res["T=2"], out
    assert out["gpu"] == {"skipped": "no CUDA"}
