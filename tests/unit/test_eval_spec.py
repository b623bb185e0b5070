"""`megamt eval MODEL SPEC`: the training spec as is, dotted overrides, `--on-error`, the same
label check as build-shards, a writable --out, and zero-shot on an encoder through a trained
head of the same label set. Tiny untrained models on the demo corpus (the numbers do not
matter here, only what is evaluated and how errors read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megamt.config import load_config
from megamt.eval import api
from megamt.eval.api import EvalError
from megamt.eval.evaluate import main

BERT = ("model.from_config={model_type: bert, vocab_size: %d, hidden_size: 32, num_hidden_layers: 2, "
        "num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 128}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megamt.data.synthetic import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("demo"), n_train=24, n_val=6, seq_len=128)


@pytest.fixture(scope="module")
def causal_dir(demo, tmp_path_factory):
    from megamt.model import MultitaskModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("causal") / "model"
    MultitaskModel(load_config(demo.spec, ["model.fused_loss=false"])).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def encoder(demo):
    from megamt.data.tokenize import load_tokenizer
    from megamt.model import MultitaskModel

    cfg = load_config(demo.spec, ["model.family=encoder", BERT % len(load_tokenizer(demo.tokenizer))])
    for t in ("summ", "instruct"):
        del cfg.tasks[t]
    torch.manual_seed(0)
    return MultitaskModel(cfg)


def test_eval_takes_the_training_spec_as_is_with_overrides(demo, causal_dir, tmp_path, capsys):
    """The README's `megamt eval runs/quick/hf runs/quick/spec.yaml` answered
    "unknown eval spec key(s) ['data', 'model', 'train']" with the spec demo-corpus writes."""
    out = tmp_path / "out"
    assert main([str(causal_dir), str(demo.spec), "eval.max_examples=3", "eval.max_new_tokens=2", "--out", str(out),
                 "--no-progress"]) == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    assert set(res["tasks"]) == {"sentiment", "nli", "qa", "ner", "summ", "instruct"}
    assert all(e["n_examples"] == 3 for e in res["tasks"].values())
    # eval.tasks / eval.metrics of the training spec choose tasks and metrics
    assert main([str(causal_dir), str(demo.spec), "eval.tasks=[nli]", "eval.metrics={nli: [accuracy]}",
                 "eval.max_examples=2", "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "o2" / "eval.json").read_text())
    assert list(res["tasks"]) == ["nli"] and list(res["tasks"]["nli"]["metrics"]) == ["accuracy"]
    # a typo in an override is named
    assert main([str(causal_dir), str(demo.spec), "eval.max_exampels=2", "--out", str(tmp_path / "o3")]) == 2
    assert "eval.max_exampels: unknown config key" in capsys.readouterr().err


def test_eval_spec_overrides_and_help(demo, causal_dir, tmp_path, capsys):
    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"tasks": ["sentiment"], "max_examples": 5}))
    assert main([str(causal_dir), str(spec), "max_examples=2", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["tasks"]["sentiment"]["n_examples"] == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "The training spec, as is" in text and "--on-error" in text and "overrides" in text


def test_label_outside_the_label_set_raises_or_is_skipped(demo, causal_dir, tmp_path, capsys):
    """build-shards rejects a label outside the task's labels; eval scored it. Now the same
    check, and the `--on-error skip` the message recommends exists on eval."""
    root = tmp_path / "spec"
    shutil.copytree(demo.root / "corpus", root / "corpus")
    val = root / "corpus" / "sentiment" / "validation.tsv"
    lines = val.read_text().splitlines()
    lines.insert(3, "the movie was there .\tneutral")
    val.write_text("\n".join(lines) + "\n")
    spec = root / "spec.yaml"
    shutil.copy(demo.spec, spec)
    args = [str(causal_dir), str(spec), "eval.tasks=[sentiment]", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{val}:4" in err and "'neutral' is not in the task's label set" in err and "--on-error skip" in err
    assert main(args + ["--on-error", "skip"]) == 0
    err = capsys.readouterr().err
    assert "sentiment: skipped 1 example(s) {'unknown_label': 1}" in err
    entry = json.loads((tmp_path / "o" / "eval.json").read_text())["tasks"]["sentiment"]
    assert entry["skipped"] == {"unknown_label": 1} and entry["n_examples"] == 6
    # data.on_error of the spec is the default policy, as for build-shards
    assert main(args + ["data.on_error=skip"]) == 0


def test_unwritable_out_is_one_message_before_loading(demo, causal_dir, capsys):
    bad = Path("/sys/megamt-eval-out") if Path("/sys").is_dir() else Path("/proc/megamt-eval-out")
    assert main([str(causal_dir), str(demo.spec), "--out", str(bad / "x")]) == 2
    err = capsys.readouterr().err
    assert f"--out={bad / 'x'}: cannot write there" in err and "Traceback" not in err


def test_encoder_zero_shot_on_a_head_with_the_same_labels(demo, encoder, tmp_path):
    """A held-out entailment set is predicted by the trained NLI head (same label set);
    a task whose labels no head has is refused with what an encoder can do instead."""
    records = [{"text": "Alice visited Paris .", "text_pair": "Alice visited Paris .", "label": "entailment"},
               {"text": "Bob sold the car .", "text_pair": "Carol sold the car .", "label": "not_entailment"}]
    res = encoder.evaluate_zero_shot(task_name="new_nli", test_dataset=records, task_type="classification",
                                     labels=["entailment", "not_entailment"], out_dir=tmp_path, progress=False)
    e = res["tasks"]["new_nli"]
    assert e["zero_shot"] and e["n_examples"] == 2 and e["template"] == "encoder head of nli"
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "predictions" / "new_nli.jsonl").read_text().splitlines()]
    assert set(preds) <= {"entailment", "not_entailment"}
    # a task marked zero_shot in the model's own config has a head too, never trained: the
    # NLI head predicts it (before, its random head was scored silently)
    import copy
    import dataclasses

    from megamt.model import MultitaskModel

    cfg = copy.deepcopy(encoder.config)
    cfg.tasks["nli2"] = dataclasses.replace(cfg.tasks["nli"], zero_shot=True)
    enc2 = MultitaskModel(cfg).backbone
    assert api.encoder_head_for(enc2, cfg, api.EvalTask("nli2", cfg.tasks["nli2"])) == "nli"
    assert api.encoder_head_for(enc2, cfg, api.EvalTask("nli", cfg.tasks["nli"])) == "nli"
    cfg.tasks["nli"].zero_shot = True  # no trained head with these labels left
    with pytest.raises(EvalError, match="no trained sequence_classification head shares its label set"):
        api.encoder_head_for(enc2, cfg, api.EvalTask("nli2", cfg.tasks["nli2"]))
    with pytest.raises(EvalError) as err:
        encoder.evaluate_zero_shot(task_name="topics", test_dataset=[{"text": "a", "label": "sports"}],
                                   task_type="classification", labels=["sports", "world"], progress=False)
    msg = str(err.value)
    assert "no trained sequence_classification head shares its label set ['sports', 'world']" in msg
    assert "'nli': ['entailment', 'not_entailment']" in msg and "causal_lm" in msg


def test_encoder_export_reloads_without_a_missing_pooler_report(demo, encoder, tmp_path, capfd):
    """megamt drops BERT's pooler (the heads pool themselves); reloading the saved encoder
    built one anyway and printed `pooler.dense.weight | MISSING` on every load."""
    from megamt.model import MultitaskModel

    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    encoder.save_pretrained(tmp_path / "enc")
    records = Records()
    hf_logger = logging.getLogger("transformers")  # transformers does not propagate to the root logger
    hf_logger.addHandler(records)
    try:
        capfd.readouterr()
        again = MultitaskModel.from_pretrained(tmp_path / "enc")
        captured = capfd.readouterr()
    finally:
        hf_logger.removeHandler(records)
    said = captured.out + captured.err + "\n".join(records.messages)
    assert "MISSING" not in said and "pooler" not in said, said
    assert getattr(again.backbone.backbone, "pooler", None) is None
    for (k, a), (_, b) in zip(encoder.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
