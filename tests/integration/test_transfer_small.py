"""The transfer experiment, small: tiny encoder + heads, generated data, a few steps."""

import json

import pytest
import yaml

pytestmark = pytest.mark.integration


def _write_experiment(root, launcher="inprocess"):
    from megamt.data.synthetic import make_demo_assets
    from megamt.data.tokenize import load_tokenizer

    demo = make_demo_assets(root / "demo", n_train=32, n_val=6, seq_len=96)
    spec = yaml.safe_load(demo.spec.read_text())
    spec["model"] = {"family": "encoder", "from_config": {
        "model_type": "bert", "vocab_size": len(load_tokenizer(demo.tokenizer)), "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 96}}
    spec["train"] = {"micro_batch_size": 2, "log_every": 1, "eval_batches": 1, "warmup_steps": 0, "lr": 1e-3,
                     "eval_at_start": False, "progress_bar": False, "ds_config": "zero2"}
    (root / "demo" / "enc.yaml").write_text(yaml.safe_dump(spec))
    exp = {"base": "demo/enc.yaml", "tasks": ["sentiment", "qa"], "steps_per_task": 2, "launcher": launcher,
           "multitask": {"temperature": []}, "eval": {"max_examples": 6}, "out": "out"}
    (root / "exp.yaml").write_text(yaml.safe_dump(exp))
    return root / "exp.yaml"


def test_transfer_experiment_small(tmp_path):
    from megamt.experiments.transfer import main

    spec = _write_experiment(tmp_path)
    assert main(["transfer", str(spec)]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "transfer.json").read_text())
    runs = {n: json.loads((out / "runs" / n / "run_summary.json").read_text())
            for n in ("single-sentiment", "single-qa", "multitask-temperature")}
    # every number of the table is the one its run measured
    for row in report["tasks"]:
        t, m = row["task"], row["metric"]
        single = runs[f"single-{t}"]["eval"]["tasks"][t]["metrics"][m]
        multi = runs["multitask-temperature"]["eval"]["tasks"][t]["metrics"][m]
        assert row["single"] == single and row["multitask"]["temperature"] == multi
        assert row["diff"]["temperature"] == pytest.approx(multi - single)
        assert row["n_examples"] == 6
    res = {r["configuration"]: r for r in report["resources"]}
    assert res["single-task"]["models"] == 2 and res["multitask (temperature)"]["models"] == 1
    assert res["single-task"]["steps"] == 4 and res["multitask (temperature)"]["steps"] == 4  # same budget per task
    assert res["single-task"]["parameters_stored"] == runs["single-sentiment"]["parameters"] + runs["single-qa"]["parameters"]
    assert res["single-task"]["train_seconds"] == pytest.approx(
        runs["single-sentiment"]["train_seconds"] + runs["single-qa"]["train_seconds"])
    # one shared backbone: the multitask model stores fewer parameters than the two single-task ones
    assert res["multitask (temperature)"]["parameters_stored"] < res["single-task"]["parameters_stored"]
    md = (out / "transfer.md").read_text()
    assert "| sentiment | accuracy | 6 |" in md and "| multitask (temperature) | 1 | 4 |" in md
    for png in ("scores.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["curves"]["single-qa"]["qa"]  # per-task loss curve read from the run's train log


def test_transfer_spec_errors_are_named(tmp_path):
    from megamt.experiments.transfer import main

    spec = _write_experiment(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["tasks"] = ["sentiment", "nosuch"]
    raw["steps_per_tsk"] = 3
    spec.write_text(yaml.safe_dump(raw))
    assert main(["transfer", str(spec)]) == 2


def _tiny_text_to_text_base(root, family: str, name: str) -> None:
    """The demo corpus with its tiny Llama (causal_lm) or T5 (seq2seq), trained a few steps."""
    from megamt.data.synthetic import make_demo_assets

    demo = make_demo_assets(root / "demo", n_train=32, n_val=4, seq_len=96, family=family)
    spec = yaml.safe_load(demo.spec.read_text())
    spec["train"] = {"micro_batch_size": 2, "log_every": 1, "eval_batches": 1, "warmup_steps": 0, "lr": 1e-3,
                     "eval_at_start": False, "progress_bar": False}
    spec.setdefault("eval", {})["max_new_tokens"] = 4
    (root / "demo" / name).write_text(yaml.safe_dump(spec))


def test_transfer_with_held_out_task_causal(tmp_path):
    """The held-out branch end to end: a tiny causal LM, two trained tasks, one task left out
    of multitask training and scored zero-shot against its own single-task model."""
    from megamt.experiments.transfer import main

    _tiny_text_to_text_base(tmp_path, "causal_lm", "causal.yaml")
    exp = {"base": "demo/causal.yaml", "tasks": ["sentiment", "nli"], "held_out": ["instruct"], "steps_per_task": 2,
           "launcher": "inprocess", "multitask": {"proportional": ["mixture.strategy=proportional"]},
           "eval": {"max_examples": 4}, "out": "out"}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert main(["transfer", str(tmp_path / "exp.yaml")]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "transfer.json").read_text())
    multi = json.loads((out / "runs" / "multitask-proportional" / "run_summary.json").read_text())
    single = json.loads((out / "runs" / "single-instruct" / "run_summary.json").read_text())
    row = next(r for r in report["tasks"] if r["task"] == "instruct")
    assert row["held_out"] and row["n_examples"] == 4
    m = row["metric"]
    assert row["single"] == single["eval"]["tasks"]["instruct"]["metrics"][m]
    assert row["multitask"]["proportional"] == multi["eval"]["tasks"]["instruct"]["metrics"][m]
    assert multi["eval"]["tasks"]["instruct"]["zero_shot"]  # never trained on: zero-shot
    # the multitask run trained on the two tasks only, for 2 steps each
    res = {r["configuration"]: r for r in report["resources"]}
    assert res["multitask (proportional)"]["steps"] == 4 and res["single-task"]["models"] == 3
    md = (out / "transfer.md").read_text()
    assert "instruct (held out: zero-shot)" in md and "Zero-shot / supervised (single-task) ratio: instruct" in md


def test_transfer_with_held_out_task_seq2seq(tmp_path):
    """The experiment accepts an encoder-decoder backbone: a tiny T5 (the family detected from
    its config), two trained tasks and one held out, scored zero-shot by generation."""
    from megamt.experiments.transfer import main

    _tiny_text_to_text_base(tmp_path, "seq2seq", "t5.yaml")
    exp = {"base": "demo/t5.yaml", "tasks": ["sentiment", "qa"], "held_out": ["summ"], "steps_per_task": 2,
           "launcher": "inprocess", "eval": {"max_examples": 4}, "out": "out"}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert main(["transfer", str(tmp_path / "exp.yaml")]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "transfer.json").read_text())
    multi = json.loads((out / "runs" / "multitask-multitask" / "run_summary.json").read_text())
    assert multi["eval"]["family"] == "seq2seq"
    assert multi["eval"]["tasks"]["summ"]["zero_shot"] and not multi["eval"]["tasks"]["qa"]["zero_shot"]
    for row in report["tasks"]:
        t, m = row["task"], row["metric"]
        single = json.loads((out / "runs" / f"single-{t}" / "run_summary.json").read_text())
        assert row["single"] == single["eval"]["tasks"][t]["metrics"][m]
        assert row["multitask"]["multitask"] == multi["eval"]["tasks"][t]["metrics"][m]
        assert row["n_examples"] == 4
    assert next(r for r in report["tasks"] if r["task"] == "summ")["held_out"]
