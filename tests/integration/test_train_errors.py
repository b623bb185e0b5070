"""Errors once, in words, under the real `deepspeed` launcher with 2 CPU ranks.

- a config error stops the run before training with one message (not one traceback per
  rank) and a non-zero exit (the other startup problems take the same path; their messages
  are checked in tests/unit/test_train_entry.py without a launch);
- a rank that raises during training says so first, with its rank and exception; the other
  rank reports the lost connection in one line after it, without gloo's traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from launching import free_port, run_tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FAST = ["train.max_steps=4", "train.micro_batch_size=2", "train.log_every=1", "train.eval_at_start=false",
        "train.eval_batches=1", "train.progress_bar=false"]


def launch(target: list[str], *args: str, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """`deepspeed --num_gpus 2 TARGET ARGS` in its own process group; (exit code, output)."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), *target, *args]
    try:
        return run_tree(cmd, timeout, cwd=REPO, env={**os.environ, **(env or {})})
    finally:
        from megamt.trainer import cpu_shm_buffer

        for rank in range(2):  # a killed rank cannot remove its shared-memory all-reduce buffer
            cpu_shm_buffer(rank, "127.0.0.1", port).unlink(missing_ok=True)


def megamt_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("megamt train:")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megamt.demo import prepare

    out = tmp_path_factory.mktemp("errors")
    return out, prepare(out, n_train=40, n_val=8, seq_len=128, steps=4)


def test_a_config_error_prints_once_without_traceback(demo, tmp_path):
    """Every startup problem (config, run_dir, shards: tests/unit/test_train_entry.py) takes this path."""
    out, config = demo
    rc, text = launch(["--module", "megamt.train"], str(config), f"train.run_dir={tmp_path / 'run'}", *FAST,
                      "train.max_stepz=3", timeout=120)
    assert rc != 0, text[-3000:]
    assert len(megamt_lines(text)) == 1, text[-3000:]
    assert "train.max_stepz: unknown config key (did you mean 'max_steps'?)" in text, text[-3000:]
    assert "Traceback" not in text and "Connection closed" not in text, text[-3000:]


def test_a_failing_rank_speaks_first_and_the_other_in_one_line(demo, tmp_path):
    out, config = demo
    rc, text = launch([str(REPO / "tests" / "integration" / "fault_script.py")], str(config),
                      f"train.run_dir={tmp_path / 'run'}", *FAST, env={"MEGAMT_TEST_RAISE": "1:1"})
    assert rc != 0
    cause = text.find("megamt train: rank 1 failed: RuntimeError: injected fault on rank 1 at step 1")
    lost = text.find("megamt train: rank 0: lost the connection to another rank, which failed first")
    assert cause >= 0, text[-4000:]
    assert lost < 0 or lost > cause, text[-4000:]  # the launcher may kill rank 0 before it prints
    assert text.count("Traceback") == 1, text[-4000:]  # rank 1's own, not gloo's on rank 0
    assert "[rank0]" not in text, text[-4000:]
