"""Shared by the real-cluster tests (test_slurm_cluster.py, test_multinode_netns.py): the tiny
demo training they run, and the uninterrupted 1-node 2-rank run of it that they compare their
per-task losses with, trained once per session by the plain ``deepspeed`` launcher."""

from __future__ import annotations

import socket
from pathlib import Path

from test_train_deepspeed import finish_ok, launch, records

STEPS = 24
# tiny and fast: demo corpus, seq_len 64 (set in prepare), ~0.1 s per step on 2 CPU ranks
TRAIN = [f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.lr=0.005", "train.warmup_steps=2",
         "train.log_every=1", "train.save_every=4", "train.keep_last=1", "train.eval_every=0",
         "train.eval_at_start=false", "train.eval_batches=1", "train.progress_bar=false"]
# one thread per rank in every run compared (the SLURM script sets the same for 2 ranks on 2 CPUs)
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_cache: dict[str, tuple[Path, Path]] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run_dir) of the uninterrupted 1-node 2-rank run; trained on first use."""
    if "reference" not in _cache:
        from megamt.demo import prepare

        root = tmp_path_factory.mktemp("cluster_reference")
        config = prepare(root, n_train=120, n_val=24, seq_len=64, steps=STEPS)
        run_dir = root / "reference"
        finish_ok(launch(config, run_dir, *TRAIN, env=THREADS), run_dir, 400)
        _cache["reference"] = (config, run_dir)
    return _cache["reference"]


def assert_losses_match(run_dir: Path, reference_dir: Path) -> list[int]:
    """Every step record of ``run_dir`` (steps logged before an interruption included) has the
    reference's per-task losses; every step 1..STEPS is there. Returns the steps seen."""
    ref = {r["step"]: r for r in records(reference_dir) if "train/loss" in r}
    seen = []
    for rec in (r for r in records(run_dir) if "train/loss" in r):
        step = rec["step"]
        keys = [k for k in ref[step] if k.startswith("train/loss/")]
        assert keys and sorted(keys) == sorted(k for k in rec if k.startswith("train/loss/")), (step, rec)
        for k in keys + ["train/loss"]:
            assert abs(rec[k] - ref[step][k]) <= 1e-6, (step, k, rec[k], ref[step][k])
        seen.append(step)
    assert sorted(set(seen)) == list(range(1, STEPS + 1)), seen
    return seen
