"""`megamt adapt` / ``model.adapt``: few-shot adaptation curves (in one process, tiny demo model).

README's command runs literally (in a temporary folder holding ``runs/quick``); the request's bad
inputs are refused naming the option or key; the fine-tuning steps lower the shots' loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
COMMAND = ("megamt adapt runs/quick/hf runs/quick/spec.yaml --task sentiment --shots 8 16 --steps 2 --seeds 0 1 "
           "--max-examples 8 --out runs/quick/adapt")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``runs/quick`` as README's quick start leaves it (the exported model: a fresh tiny one)."""
    from megamt.config import load_config
    from megamt.data.synthetic import make_demo_assets
    from megamt.model import MultitaskModel

    cwd = tmp_path_factory.mktemp("adapt")
    assets = make_demo_assets(cwd / "runs" / "quick", n_train=40, n_val=16, seq_len=128)
    cfg = load_config(assets.spec)
    torch.manual_seed(0)
    MultitaskModel(cfg).save_pretrained(cwd / "runs" / "quick" / "hf", tokenizer_dir=str(assets.tokenizer))
    return cwd, cfg


def test_readme_command_writes_curves(quick):
    cwd, _ = quick
    assert COMMAND in (REPO / "README.md").read_text()
    exe = Path(sys.executable).parent / "megamt"
    proc = subprocess.run([str(exe), *COMMAND.split()[1:]], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "runs" / "quick" / "adapt"
    report = json.loads((out / "adapt.json").read_text())
    assert (out / "adapt.png").stat().st_size > 1000
    assert report["metric"] == "accuracy" and report["shots"] == [8, 16] and report["seeds"] == [0, 1]
    starts = set()
    for k in ("8", "16"):
        c = report["curves"][k]
        assert c["steps"] == [0, 1, 2] and len(c["mean"]) == len(c["std"]) == 3
        assert set(c["per_seed"]) == {"0", "1"}
        for values in c["per_seed"].values():
            assert len(values) == 3 and all(0 <= v <= 100 for v in values)
            starts.add(values[0])
        assert c["mean"][1] == pytest.approx(sum(v[1] for v in c["per_seed"].values()) / 2)
    assert len(starts) == 1  # step 0 is the model before adaptation, the same for every K and seed
    assert "accuracy after 2 steps" in proc.stdout


def test_fine_tuning_lowers_the_shots_loss(quick):
    from megamt.data.formats import read_examples, resolve_labels
    from megamt.data.tokenize import load_tokenizer
    from megamt.eval.adapt import adaptation_model, fine_tune, shot_batches
    from megamt.model import MultitaskModel

    cwd, cfg = quick
    model = MultitaskModel.from_pretrained(cwd / "runs" / "quick" / "hf")
    base, fresh = adaptation_model(model, cfg, lora=False)
    assert fresh == []  # a causal LM has no heads
    labels = resolve_labels("sentiment", cfg.tasks["sentiment"])
    shots = list(read_examples("sentiment", cfg.tasks["sentiment"], "train", labels=labels))[:8]
    batches = shot_batches(shots, cfg, "sentiment", load_tokenizer(cfg.data.tokenizer), labels, rows=2)
    k = list(cfg.tasks).index("sentiment")

    def loss(m):
        with torch.no_grad():
            out = [m(b) for b in batches]
        return float(sum(o.loss_sum[k] for o in out) / sum(o.count[k] for o in out))

    before = loss(base)
    for _ in fine_tune(base, batches, 3, 3e-3, cfg.tasks, "sentiment"):
        pass
    assert loss(base) < before - 0.1
    # the source model is untouched (each K and seed starts from it)
    assert loss(adaptation_model(model, cfg, lora=False)[0]) == pytest.approx(before)


def test_python_api_with_lora(quick):
    from megamt.model import MultitaskModel

    cwd, cfg = quick
    model = MultitaskModel.from_pretrained(cwd / "runs" / "quick" / "hf")
    report = model.adapt(cfg, "sentiment", shots=[4], steps=1, seeds=[3], lora=True, max_examples=4, lr=1e-3,
                         log=lambda *_: None)
    assert report["lora"] and list(report["curves"]) == ["4"] and len(report["curves"]["4"]["mean"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "--task nope: not a task of the spec"),
    (["--task", "sentiment", "--shots", "100000"], "--shots 100000: task 'sentiment' has only 40 training examples"),
    (["--task", "sentiment", "--steps", "0"], "--steps 0: must be >= 1"),
    (["--task", "sentiment", "--shots", "0"], "--shots [0]"),
])
def test_bad_requests_name_the_option(quick, capsys, args, message):
    from megamt.eval.adapt import main

    cwd, _ = quick
    q = cwd / "runs" / "quick"
    assert main([str(q / "hf"), str(q / "spec.yaml"), *args, "--out", str(cwd / "bad")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("megamt adapt:") == 1 and "Traceback" not in err  # one message


def test_a_task_type_without_evaluation_is_refused(quick, monkeypatch):
    from megamt.eval import adapt, metrics

    _, cfg = quick
    monkeypatch.delitem(metrics.METRICS_BY_TYPE, "classification")
    with pytest.raises(adapt.AdaptError, match=r"tasks.sentiment.task_type=classification: this task type has no "):
        adapt.check_request(cfg, "sentiment", [8], 3, [0], 1e-4)


def test_readme_meta_yaml_is_a_valid_config():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Meta-learning and few-shot adaptation", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    from megamt.config import config_from_dict

    raw = yaml.safe_load(block)
    raw["tasks"] = {"a": {"task_type": "classification", "inputs": {"train": {"path": "a.tsv"}}, "labels": ["x", "y"]}}
    cfg = config_from_dict(raw)
    assert cfg.meta.method == "reptile" and cfg.train.ds_config == "zero3"


def test_encoder_adaptation_copies_known_heads_and_adds_a_fresh_one(quick, tmp_path):
    """An encoder trained on ``sentiment``, adapted to ``nli`` (not among its heads): the backbone and
    the sentiment head are copied, nli gets a fresh head, and a 1-step curve comes out."""
    from types import SimpleNamespace

    from megamt.config import load_config
    from megamt.data.tokenize import load_tokenizer
    from megamt.eval.adapt import adapt, adaptation_model
    from megamt.model import MultitaskModel

    root = quick[0] / "runs" / "quick"
    demo = SimpleNamespace(spec=root / "spec.yaml", tokenizer=root / "tokenizer")
    spec = yaml.safe_load(demo.spec.read_text())
    spec["model"] = {"family": "encoder", "from_config": {
        "model_type": "bert", "vocab_size": len(load_tokenizer(demo.tokenizer)), "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 96}}
    trained_spec = dict(spec, tasks={"sentiment": spec["tasks"]["sentiment"]})
    (root / "trained.yaml").write_text(yaml.safe_dump(trained_spec))
    (root / "new.yaml").write_text(yaml.safe_dump(dict(spec, tasks={k: spec["tasks"][k] for k in ("sentiment", "nli")})))
    torch.manual_seed(0)
    trained = MultitaskModel(load_config(root / "trained.yaml"))
    trained.save_pretrained(root / "enc_hf", tokenizer_dir=str(demo.tokenizer))
    source = MultitaskModel.from_pretrained(root / "enc_hf")
    cfg = load_config(root / "new.yaml")
    new, fresh = adaptation_model(source, cfg, lora=False)
    assert fresh == ["nli"]
    src, dst = source.state_dict(), new.state_dict()
    copied = [k for k in src if k in dst]
    assert copied and all(torch.equal(src[k], dst[k]) for k in copied)
    assert any(k.startswith("backbone.heads.sentiment.") for k in copied)
    report = adapt(source, cfg, "nli", shots=[4], steps=1, seeds=[0], max_examples=6, lr=1e-3, log=lambda *_: None)
    assert report["fresh_heads"] == ["nli"] and len(report["curves"]["4"]["mean"]) == 2
