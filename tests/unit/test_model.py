"""MultitaskModel + per-task losses on hand-made packed batches (contract of ARCHITECTURE.md)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from packed_batches import pack_rows, random_rows  # noqa: E402

from megamt.config import ModelConfig, MultitaskConfig, TaskConfig  # noqa: E402
from megamt.losses import count_targets, step_loss, task_cross_entropy, task_means  # noqa: E402
from megamt.model import MultitaskModel  # noqa: E402

VOCAB = 61


def tiny_config(fused: bool, tie: bool = False, model_type: str = "llama") -> MultitaskConfig:
    if model_type == "llama":
        fc = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": tie}
    else:
        fc = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
    return MultitaskConfig(tasks={"a": TaskConfig(), "b": TaskConfig(), "c": TaskConfig()},
                           model=ModelConfig(from_config=fc, fused_loss=fused, attn_implementation="sdpa"))


def build(fused: bool, tie: bool = False, model_type: str = "llama") -> MultitaskModel:
    torch.manual_seed(0)
    return MultitaskModel(tiny_config(fused, tie, model_type)).eval()


def batch(seed=0, B=3, L=32, num_tasks=3):
    return pack_rows(random_rows(torch.Generator().manual_seed(seed), B, L, num_tasks, VOCAB), L)


def test_task_cross_entropy_matches_per_token_reference():
    b = batch()
    logits = torch.randn(*b["input_ids"].shape, VOCAB)
    tl = task_cross_entropy(logits, b["labels"], b["task_ids"], 3)
    for t in range(3):
        mask = (b["task_ids"] == t) & (b["labels"] != -100)
        ref = F.cross_entropy(logits[mask], b["labels"][mask], reduction="sum")
        torch.testing.assert_close(tl.loss_sum[t], ref)
        assert tl.count[t] == mask.sum()
    torch.testing.assert_close(count_targets(b["labels"], b["task_ids"], 3), tl.count)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_forward_equals_separate_examples(model_type):
    """Packed examples must not attend to each other (position_ids + use_cache=False)."""
    model = build(fused=False, model_type=model_type)
    rows = random_rows(torch.Generator().manual_seed(3), 2, 32, 3, VOCAB)
    packed = model(pack_rows(rows, 32))
    loss_sum, count = torch.zeros(3), torch.zeros(3)
    for row in rows:
        for ex in row:
            single = model(pack_rows([[ex]], len(ex[1]) + len(ex[2])))
            loss_sum += single.loss_sum.detach()
            count += single.count
    torch.testing.assert_close(packed.loss_sum.detach(), loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.count, count)


@pytest.mark.parametrize("tie", [False, True])
def test_fused_loss_equals_unfused_with_gradients(tie):
    fused, plain = build(fused=True, tie=tie), build(fused=False, tie=tie)
    assert fused.fused_loss and not plain.fused_loss
    plain.load_state_dict(fused.state_dict())
    b = batch(seed=1)
    lf, lp = fused(b), plain(b)
    torch.testing.assert_close(lf.loss_sum, lp.loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lf.count, lp.count)
    lf.loss_sum.sum().backward()
    lp.loss_sum.sum().backward()
    for (n, pf), (_, pp) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(pf.grad, pp.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_loss_module_owns_the_head_registration_and_the_hinted_path(tie):
    """The fused loss runs in the parameter-free child ``lm_loss``; the head (tied or not) is
    registered as ITS external ZeRO-3 parameter, not the root's; state_dict keys are unchanged;
    with ``loss_grad_scale`` in the batch (the trainer's path) the gradients equal the unfused
    ones for the step loss."""
    pytest.importorskip("deepspeed")
    fused, plain = build(fused=True, tie=tie), build(fused=False, tie=tie)
    head = fused.backbone.get_output_embeddings().weight
    assert [id(p) for _, p in fused.lm_loss.ds_external_parameters()] == [id(head)]
    assert not hasattr(fused, "_external_params") and list(fused.lm_loss.parameters()) == []
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    b = batch(seed=2)
    count = count_targets(b["labels"], b["task_ids"], 3)
    weights = torch.tensor([1.0, 0.5, 2.0])
    import megamt.kernels.fused_linear_cross_entropy as flce

    flce.backward_path_counts.clear()
    for model in (fused, plain):
        step_loss(model(dict(b, loss_grad_scale=weights / count.clamp_min(1.0))), count, weights, 2, 3).backward()
    assert dict(flce.backward_path_counts) == {"hinted": 1}
    for (n, pf), (_, pp) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(pf.grad, pp.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_step_loss_gradient_equals_global_objective():
    """Sum over ranks/micro-batches of step_loss / (world*accum) (what DeepSpeed averages) is the
    gradient of sum_t mean_t over the global batch."""
    model = build(fused=False)
    batches = [batch(seed=s, B=2) for s in range(4)]  # 2 "ranks" x 2 micro-batches
    world, gas = 2, 2
    count = sum(count_targets(b["labels"], b["task_ids"], 3) for b in batches)
    weights = torch.tensor([1.0, 2.0, 0.5])
    model.zero_grad()
    for b in batches:
        (step_loss(model(b), count, weights, world, gas) / (world * gas)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(model(b).loss_sum for b in batches)
    (weights * task_means(total, count)).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    model = build(fused=False)
    model.save_pretrained(tmp_path / "m")
    again = MultitaskModel.from_pretrained(tmp_path / "m").eval()
    assert again.task_names == ["a", "b", "c"]
    b = batch(seed=2)
    torch.testing.assert_close(again.logits(b), model.logits(b))


def test_nonfinite_steps_are_counted_and_stop_the_run():
    from megamt.trainer import MultitaskTrainer, NonFiniteError

    trainer = object.__new__(MultitaskTrainer)  # only the bookkeeping of check_finite
    trainer.step, trainer.rank, trainer.metrics, trainer.consecutive_nonfinite = 4, 1, None, 0
    trainer.tcfg = tiny_config(False).train
    trainer.tcfg.max_nonfinite_steps = 2
    trainer.check_finite(True, [], 1.0)
    assert trainer.consecutive_nonfinite == 0
    trainer.check_finite(False, ["b"], None)
    assert trainer.consecutive_nonfinite == 1
    trainer.check_finite(True, [], 2.0)  # a good step resets the count
    assert trainer.consecutive_nonfinite == 0
    trainer.check_finite(False, [], float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite loss in task\\(s\\) c.*max_nonfinite_steps"):
        trainer.check_finite(False, ["c"], float("nan"))
