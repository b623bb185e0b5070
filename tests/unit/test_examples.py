"""Every example config in examples/ loads and validates (a typo there is a user's first error)."""

from pathlib import Path

import pytest

from megamt.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path, monkeypatch):
    import os

    monkeypatch.setenv("MINILM", os.environ.get("MINILM", "/models/minilm"))  # minilm_heads.yaml: ${MINILM}
    cfg = load_config(path)
    assert cfg.tasks and cfg.train.max_steps > 0
    assert cfg.train.ds_config in ("zero3", "zero3_offload", "zero2", "zero2_offload") or Path(cfg.train.ds_config).suffix == ".json"
