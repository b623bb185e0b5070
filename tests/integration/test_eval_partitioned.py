"""Evaluation through the ZeRO-3 partitioned model on 2 CPU ranks equals evaluation of a
plain copy (one launch: causal LM, encoder, encoder-decoder; see eval_partitioned_script.py)."""

import json
import os
import random
from pathlib import Path

import pytest
from test_train_deepspeed import launcher_or_skip, run_group

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("eval_partitioned_script.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from megamt.data.synthetic import make_demo_assets

    launcher = launcher_or_skip()
    root = tmp_path_factory.mktemp("evalpart")
    demo = make_demo_assets(root / "demo", n_train=12, n_val=7, seq_len=128)
    out = root / "report.json"
    port = str(29500 + random.randrange(2000))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # MEGAMT_STRICT_COLLECTIVES=1 comes from conftest
    proc = run_group([launcher, "--num_gpus", "2", "--master_port", port, str(SCRIPT), str(demo.root), str(out)],
                     600, env=env)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", ["causal", "encoder", "seq2seq"])
@pytest.mark.parametrize("run", ["partitioned", "checkpoint"])
def test_partitioned_evaluation_equals_the_plain_copy(report, family, run):
    """Identical predictions (every example of every task, in the prediction files) and
    metrics: the partitioned model gathers exactly the weights the plain copy holds."""
    plain, other = report[family]["plain"], report[family][run]
    every = {"sentiment", "nli", "qa", "ner", "summ", "instruct"}
    tasks = {"causal": every, "seq2seq": every, "encoder": {"sentiment", "nli", "qa", "ner"}}[family]
    assert set(plain["predictions"]) == tasks
    for task, lines in plain["predictions"].items():
        assert len(lines) == 5
        assert other["predictions"][task] == lines, task
    assert other["metrics"] == plain["metrics"]
