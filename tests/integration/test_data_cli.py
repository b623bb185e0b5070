"""The data CLI end to end, as a user runs it: `megamt demo-corpus`, then
`megamt build-shards --workers 2` with an override, then the training pipeline on the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def megamt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "megamt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_demo_corpus_then_build_shards(tmp_path):
    r = megamt("--help")
    assert r.returncode == 0 and "demo-corpus" in r.stdout and "build-shards" in r.stdout
    r = megamt("demo-corpus", tmp_path / "demo", "--n-train", 60, "--n-val", 20)
    assert r.returncode == 0, r.stderr
    spec = tmp_path / "demo" / "spec.yaml"
    r = megamt("build-shards", spec, "data.shard_max_examples=25", "--out", tmp_path / "shards",
               "--tokenizer", tmp_path / "demo" / "tokenizer", "--workers", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    for task, entry in m["tasks"].items():
        assert [s["examples"] for s in entry["splits"]["train"]["shards"]] == [25, 25, 10], task
        assert entry["splits"]["validation"]["examples"] == 20
    assert m["skips"] == {}

    from megamt.config import load_config
    from megamt.data.pipeline import TrainPipeline

    cfg = load_config(spec, [f"data.shards_dir={tmp_path / 'shards'}", "train.micro_batch_size=2"])
    lines = []
    p = TrainPipeline(cfg, 1, 2, log=lines.append)
    assert lines == []  # only rank 0 prints the mixture
    b = p.next_batch()
    assert b["input_ids"].shape == (2, cfg.data.seq_len) and (b["labels"] != -100).any()

    r = megamt("build-shards", spec, "--out", tmp_path / "x", "--tokenizer", tmp_path / "nope")
    assert r.returncode == 1 and "nope" in r.stderr and "tokenizer folder not found" in r.stderr
