"""A tiny T5 (built from a config) trained with ZeRO-3 on 2 CPU ranks through the real
`deepspeed` launcher, on the demo corpus (six tasks, all five task types), packed on both
sides -- README's encoder-decoder command sequence (``megamt demo-corpus --family seq2seq``,
``build-shards``, the launch, ``megamt export``). One uninterrupted launch that every test
inspects, plus one launch that resumes its step-4 checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_train_deepspeed import (assert_every_task_loss_falls, exported_and_checkpoint, finish_ok, launch, log_text,
                                  step_losses, validation_pass)

pytestmark = pytest.mark.integration

STEPS = 8
TASKS = ["sentiment", "nli", "qa", "ner", "summ", "instruct"]
# monitor_every: steps 4 and 8 also run one task-homogeneous forward + backward per task and
# measure the task-gradient Gram matrix on the ZeRO-3 partitions (megamt.gradients)
EXTRA = ["train.keep_last=2", "train.micro_batch_size=3", "gradients.monitor_every=4"]


def megamt_cli(*args: str) -> None:
    exe = Path(sys.executable).parent / "megamt"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def t5_demo(tmp_path_factory):
    """README's encoder-decoder sequence: demo corpus with a tiny T5, shards (the launch follows)."""
    out = tmp_path_factory.mktemp("t5")
    megamt_cli("demo-corpus", str(out), "--family", "seq2seq")
    megamt_cli("build-shards", str(out / "spec.yaml"))
    return out, out / "spec.yaml"


@pytest.fixture(scope="module")
def full_run(t5_demo):
    out, config = t5_demo
    run_dir = out / "full"
    finish_ok(launch(config, run_dir, *EXTRA), run_dir, 300)
    return run_dir


def test_seq2seq_zero3_every_task_loss_falls(full_run):
    text = log_text(full_run)
    assert "family: seq2seq" in text and '"stage": 3' in text
    assert "(256 encoder + 64 decoder) tokens" in text
    train = assert_every_task_loss_falls(full_run, TASKS, STEPS)
    assert all(r["perf/tokens_per_s"] > 0 for r in train.values())
    for step in (4, 8):  # gradient monitoring works unchanged on the encoder-decoder
        assert all(f"grad/norm/{t}" in train[step] and train[step][f"grad/norm/{t}"] > 0 for t in TASKS), train[step]
        assert "grad/conflicts" in train[step]
    assert "grad/conflicts" not in train[3]


def test_seq2seq_resume_from_a_checkpoint_is_exact(t5_demo, full_run):
    """The step-4 checkpoint of the full run, resumed in new processes, gives the full run's
    losses of steps 5..8 and its final weights, to the bit."""
    from megamt.export import gather_fp32_state_dict

    out, config = t5_demo
    run_dir = out / "resumed"
    shutil.copytree(full_run / "checkpoints", run_dir / "checkpoints")
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    (run_dir / "checkpoints" / "latest").write_text("step_00000004")
    finish_ok(launch(config, run_dir, *EXTRA), run_dir, 300)
    assert f"resumed from {run_dir / 'checkpoints'}/step_00000004 at step 4" in log_text(run_dir)
    resumed, reference = step_losses(run_dir), step_losses(full_run)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step in range(5, STEPS + 1):
        keys = [k for k in reference[step] if k.startswith("train/loss")]
        assert len(keys) == len(TASKS) + 1
        for k in keys:
            assert resumed[step][k] == reference[step][k], (step, k, resumed[step][k], reference[step][k])
    tag = f"step_{STEPS:08d}"
    a, b = gather_fp32_state_dict(full_run / "checkpoints", tag), gather_fp32_state_dict(run_dir / "checkpoints", tag)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def exported(full_run, tmp_path_factory):
    """``megamt export`` of the run: (folder, AutoModelForSeq2SeqLM from it, checkpoint model, final eval losses)."""
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path_factory.mktemp("export") / "hf"
    return (out, *exported_and_checkpoint(full_run, out, AutoModelForSeq2SeqLM))


def test_seq2seq_export_loads_with_auto_model_and_reproduces_the_checkpoint(exported):
    """``megamt export`` -> ``AutoModelForSeq2SeqLM.from_pretrained``: its logits equal the
    checkpoint's, and its loss on every validation example (one at a time, Hugging Face's own
    forward: no packing) equals the final validation loss the packed ZeRO-3 run logged."""
    folder, hf, mm, trained = exported
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    assert "megamt_" not in (folder / "config.json").read_text()  # no megamt attention name
    for task in mm.task_names:
        loss_sum = count = 0.0
        for b in validation_pass(mm.config, task):
            enc, dec = b["segment_ids"], b["decoder_segment_ids"]
            for row in range(enc.shape[0]):
                for seg in range(int(enc[row].max()) + 1):  # every example of the packed batch, alone
                    ids = b["input_ids"][row][enc[row] == seg][None]
                    labels = b["labels"][row][dec[row] == seg][None]
                    with torch.no_grad():
                        logits = hf(input_ids=ids, labels=labels).logits
                        if seg == 0:
                            torch.testing.assert_close(logits, mm.backbone(input_ids=ids, labels=labels).logits,
                                                       rtol=0, atol=0)
                    loss_sum += float(torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum"))
                    count += labels.numel()
        assert abs(loss_sum / count - trained[task]) < 1e-5 * trained[task], (task, loss_sum / count, trained[task])


def test_seq2seq_eval_cli_on_the_export(exported, tmp_path):
    from megamt.eval.evaluate import main as eval_main

    out = exported[0]
    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"max_examples": 4, "max_new_tokens": 6, "tasks": ["sentiment", "summ"]}))
    assert eval_main([str(out), str(spec), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["family"] == "seq2seq"
    assert res["tasks"]["sentiment"]["n_examples"] == 4 and "accuracy" in res["tasks"]["sentiment"]["metrics"]
    assert set(res["tasks"]["summ"]["metrics"]) == {"rougeL", "rouge1", "rouge2"}


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_zero3_gathers_each_parameter_once(tmp_path, kind):
    """ZeRO-3 (a tiny T5 / BART under zero.Init, one CPU rank, one packed forward + backward): the
    encoder runs once per forward (its output is an activation that every decoder layer's
    cross-attention reads: nothing to gather for it), and every parameter is all-gathered at
    most once in the forward and once in the backward, except the tied embedding matrix: the
    encoder's and decoder's embeddings read it at the start of the forward, and the fused
    loss's LM head at its end, inside ``model.lm_loss`` (megamt.losses.LMHeadTaskLoss, which
    owns its ZeRO-3 registration so that the head is released right after the loss instead of
    staying gathered for the whole forward and backward: issue 18's memory rule). So it is
    gathered exactly twice in the forward and once in the backward. DeepSpeed's all-gather is
    counted by a stand-in wrapping each parameter's ``all_gather_coalesced``."""
    out = tmp_path / "gathers.json"
    script = Path(__file__).with_name("seq2seq_gather_script.py")
    from test_train_deepspeed import _free_port, run_group

    proc = run_group([sys.executable, str(script), kind, str(out)], 240,
                     env={**os.environ, "MASTER_PORT": str(_free_port())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["encoder_calls"] == 1 and result["loss_finite"]
    assert len(result["tied"]) == 1 and result["tied_modules"] >= 3
    counts = result["counts"]
    assert counts[result["tied"][0]] == {"forward": 2, "backward": 1}
    redundant = {n: c for n, c in counts.items()
                 if n != result["tied"][0] and (c["forward"] > 1 or c["backward"] > 1)}
    assert not redundant, redundant
    assert sum(c["backward"] for c in counts.values()) == len(counts)  # every parameter got its gradient pass
