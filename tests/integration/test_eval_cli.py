"""`megamt eval` on a saved model folder: one rank vs two ranks (torchrun, gloo), bad specs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from megamt.config import load_config
    from megamt.data.synthetic import make_demo_assets
    from megamt.model import MultitaskModel

    root = tmp_path_factory.mktemp("evalcli")
    demo = make_demo_assets(root / "demo", n_train=20, n_val=7, seq_len=128)
    torch.manual_seed(0)
    model = MultitaskModel(load_config(demo.spec, ["model.fused_loss=false"]))
    model.save_pretrained(root / "model")
    spec = {"max_examples": 7, "max_new_tokens": 3, "batch_size": 2,
            "tasks": {"sentiment": {"metrics": ["accuracy"]}, "ner": {}, "qa": {},
                      # a task held out of training, with its own instruction template
                      "nli_new": {"task_type": "classification", "zero_shot": True,
                                  "inputs": {"validation": {"path": "demo/corpus/nli/validation.csv",
                                                            "format": "csv", "quoting": True}},
                                  "fields": {"text": "premise", "text_pair": "hypothesis", "label": "label"},
                                  "labels": ["entailment", "not_entailment"],
                                  "instruction": "Does the first sentence imply the second?",
                                  "templates": ["{text} => {text_pair}? ({options}) ||| {answer}"]}}}
    (root / "eval.yaml").write_text(yaml.safe_dump(spec))
    return root


def test_eval_cli_one_rank_equals_two_ranks(saved):
    from megamt.eval.evaluate import main

    assert main([str(saved / "model"), str(saved / "eval.yaml"), "--out", str(saved / "one"), "--no-progress"]) == 0
    one = json.loads((saved / "one" / "eval.json").read_text())
    assert set(one["tasks"]) == {"sentiment", "ner", "qa", "nli_new"}
    assert one["tasks"]["nli_new"]["zero_shot"] and one["tasks"]["nli_new"]["template"] == "inline0"
    assert list(one["tasks"]["sentiment"]["metrics"]) == ["accuracy"]

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
                           "megamt.eval.evaluate", str(saved / "model"), str(saved / "eval.yaml"),
                           "--out", str(saved / "two"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((saved / "two" / "eval.json").read_text())
    assert two["world_size"] == 2
    for name, e in one["tasks"].items():  # every example once, gathered: the same numbers
        assert two["tasks"][name]["n_examples"] == e["n_examples"] == 7
        assert two["tasks"][name]["metrics"] == pytest.approx(e["metrics"], abs=1e-6)
    preds = (saved / "two" / "predictions" / "qa.jsonl").read_text().splitlines()
    assert len(preds) == 7 and len({json.loads(p)["key"] for p in preds}) == 7


def test_eval_cli_bad_input(saved, capsys):
    from megamt.eval.evaluate import main

    bad = saved / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": {"nosuch": {}}, "max_exampels": 3}))
    assert main([str(saved / "model"), str(bad)]) == 2
    assert "max_exampels" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"tasks": {"nosuch": {}, "qa": {"metrics": ["rouge9"]}}}))
    assert main([str(saved / "model"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tasks.nosuch: unknown task" in err and "rouge9" in err
    # a tokenizer other than the one saved with the checkpoint
    from megamt.data.synthetic import build_tokenizer

    other = build_tokenizer(["some other words entirely"] * 4, saved / "other_tok", vocab_size=80)
    bad.write_text(yaml.safe_dump({"tokenizer": str(other), "tasks": ["qa"]}))
    assert main([str(saved / "model"), str(bad)]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_cli_all_templates(saved):
    from megamt.eval.evaluate import main

    spec = saved / "tpl.yaml"
    spec.write_text(yaml.safe_dump({"max_examples": 3, "max_new_tokens": 2, "tasks": ["sentiment", "qa"]}))
    assert main([str(saved / "model"), str(spec), "--out", str(saved / "tpl"), "--no-progress",
                 "--all-templates"]) == 0
    res = json.loads((saved / "tpl" / "eval.json").read_text())
    for name in ("sentiment", "qa"):
        e = res["tasks"][name]
        assert len(e["per_template"]) >= 2 and e["template"] == f"mean of {len(e['per_template'])} templates"
    spec.write_text(yaml.safe_dump({"max_examples": 3, "tasks": ["sentiment"], "all_templates": True}))
    assert main([str(saved / "model"), str(spec), "--out", str(saved / "tpl2"), "--no-progress"]) == 0
    assert "per_template" in json.loads((saved / "tpl2" / "eval.json").read_text())["tasks"]["sentiment"]
