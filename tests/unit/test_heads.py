"""Encoder heads over packed batches: packed == separate forwards, per-task losses by hand."""

import pytest
import torch
import torch.nn.functional as F

from megamt.attention import cu_seqlens_from_segment_ids
from megamt.config import MultitaskConfig, ModelConfig, TaskConfig
from megamt.heads import EncoderWithHeads, HeadConfigError, count_loss_terms

T_CLS, T_NER, T_QA = 0, 1, 2


def tiny_config(model_type="bert", attn="sdpa"):
    tasks = {
        "sent": TaskConfig(task_type="classification", labels=["neg", "pos", "mid"]),
        "ner": TaskConfig(task_type="ner", labels=["PER", "LOC"]),
        "qa": TaskConfig(task_type="extractive_qa"),
    }
    extra = {"pad_token_id": 1} if model_type == "roberta" else {}
    model = ModelConfig(from_config={"model_type": model_type, "vocab_size": 120, "hidden_size": 32,
                                     "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "intermediate_size": 64, "max_position_embeddings": 64, **extra},
                        attn_implementation=attn)
    return MultitaskConfig(tasks=tasks, model=model)


def example(task, n, gen):
    """One example's token-level fields (label conventions of the packed-batch contract)."""
    ex = {"input_ids": torch.randint(5, 120, (n,), generator=gen), "task": task,
          "cls": torch.full((n,), -100), "tag": torch.full((n,), -100),
          "start": torch.full((n,), -100), "end": torch.full((n,), -100)}
    if task == T_CLS:
        ex["cls"][0] = int(torch.randint(0, 3, (1,), generator=gen))
    elif task == T_NER:
        ex["tag"][1:n - 1] = torch.randint(0, 5, (n - 2,), generator=gen)
        ex["tag"][2] = -100  # a continuation sub-token
    else:  # question = tokens 1..2, context = tokens 3..n-2
        ex["start"][3:n - 1] = 0
        ex["end"][3:n - 1] = 0
        ex["start"][4] = 1
        ex["end"][6] = 1
    return ex


def pack(rows, L, pad_id=0):
    """Rows of examples -> a packed batch dict as the data pipeline builds it."""
    B = len(rows)
    batch = {"input_ids": torch.full((B, L), pad_id), "task_ids": torch.full((B, L), -1),
             "position_ids": torch.zeros(B, L, dtype=torch.long), "segment_ids": torch.full((B, L), -1)}
    for k in ("cls_labels", "tag_labels", "start_labels", "end_labels"):
        batch[k] = torch.full((B, L), -100)
    for b, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row):
            n = len(ex["input_ids"])
            sl = slice(at, at + n)
            batch["input_ids"][b, sl] = ex["input_ids"]
            batch["task_ids"][b, sl] = ex["task"]
            batch["position_ids"][b, sl] = torch.arange(n)
            batch["segment_ids"][b, sl] = s
            for k, f in (("cls_labels", "cls"), ("tag_labels", "tag"), ("start_labels", "start"),
                         ("end_labels", "end")):
                batch[k][b, sl] = ex[f]
            at += n
        batch["position_ids"][b, at:] = torch.arange(L - at)
    batch["cu_seqlens"], batch["max_seqlen"] = cu_seqlens_from_segment_ids(batch["segment_ids"])
    return batch


@pytest.mark.parametrize("model_type,attn", [("bert", "sdpa"), ("bert", "eager"), ("roberta", "sdpa"),
                                             ("deberta-v2", "auto")])
def test_packed_equals_separate(model_type, attn):
    """Packed examples through megamt's packed attention (BERT, RoBERTa) or, for DeBERTa-v2
    (hand-written relative attention, no AttentionInterface), one row per segment."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = EncoderWithHeads(tiny_config(model_type, attn)).eval()
    assert model.packed_attention == (model_type != "deberta-v2")
    rows = [[example(T_CLS, 5, gen), example(T_NER, 6, gen)],
            [example(T_QA, 9, gen), example(T_CLS, 4, gen), example(T_QA, 8, gen)]]
    packed = pack(rows, L=24)
    with torch.no_grad():
        h = model.encode(packed)
        loss = model(packed)
        ref_sum, ref_count = torch.zeros(3), torch.zeros(3)
        for b, row in enumerate(rows):
            at = 0
            for ex in row:
                n = len(ex["input_ids"])
                alone = pack([[ex]], L=n)
                h1 = model.encode(alone)
                assert (h[b, at:at + n] - h1[0]).abs().max() < 1e-5
                one = model(alone)
                ref_sum += one.loss_sum
                ref_count += one.count
                at += n
    assert torch.allclose(loss.loss_sum, ref_sum, atol=1e-5)
    assert torch.equal(loss.count, ref_count)
    # counts: 2 classification examples, 3 tagged words, 2 QA examples; known before the forward
    assert loss.count.tolist() == [2.0, 3.0, 2.0]
    assert count_loss_terms(packed, 3).tolist() == [2.0, 3.0, 2.0]


def test_losses_match_plain_torch():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = EncoderWithHeads(tiny_config()).eval()
    rows = [[example(T_CLS, 5, gen), example(T_NER, 7, gen), example(T_QA, 9, gen)]]
    batch = pack(rows, L=24)
    with torch.no_grad():
        loss = model(batch)
        h = model.encode(batch)[0]
    # classification: CE of the head at the example's first token
    cls_logits = model.heads["sent"](h[0])
    assert loss.loss_sum[T_CLS] == pytest.approx(F.cross_entropy(cls_logits, batch["cls_labels"][0, 0]).item(), abs=1e-5)
    # NER: summed CE over tagged words
    tok = slice(5, 12)
    lab = batch["tag_labels"][0, tok]
    keep = lab != -100
    ner = F.cross_entropy(model.heads["ner"](h[tok])[keep], lab[keep], reduction="sum")
    assert loss.loss_sum[T_NER] == pytest.approx(ner.item(), abs=1e-5)
    # span: mean of start and end CE, softmax over context tokens only
    qa = slice(12, 21)
    ctx = batch["start_labels"][0, qa] != -100
    lg = model.heads["qa"](h[qa])[ctx]
    s = F.cross_entropy(lg[:, 0], batch["start_labels"][0, qa][ctx].argmax())
    e = F.cross_entropy(lg[:, 1], batch["end_labels"][0, qa][ctx].argmax())
    assert loss.loss_sum[T_QA] == pytest.approx(0.5 * (s + e).item(), abs=1e-5)


def test_backward_reaches_backbone_and_every_head():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = EncoderWithHeads(tiny_config())
    batch = pack([[example(T_CLS, 5, gen), example(T_NER, 6, gen)]], L=16)  # no QA example
    out = model(batch)
    (out.loss_sum.sum() / out.count.clamp(min=1).sum()).backward()
    # no QA example: an exact zero gradient (not None: ZeRO-3's reduce-scatter buckets must hold
    # the same parameters on every rank), and the QA loss term stays 0
    assert model.heads["qa"].out.weight.grad is not None and model.heads["qa"].out.weight.grad.abs().sum() == 0
    assert out.loss_sum[T_QA] == 0 and out.count[T_QA] == 0
    assert model.heads["sent"].out.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_bad_head_config_names_the_task():
    cfg = tiny_config()
    cfg.tasks["summ"] = TaskConfig(task_type="summarization")
    cfg.tasks["nolabels"] = TaskConfig(task_type="classification")
    with pytest.raises(HeadConfigError) as err:
        EncoderWithHeads(cfg)
    assert "tasks.summ" in str(err.value) and "tasks.nolabels.labels" in str(err.value)


def test_save_and_reload_with_heads(tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    cfg = tiny_config()
    model = EncoderWithHeads(cfg).eval()
    batch = pack([[example(T_CLS, 5, gen), example(T_NER, 6, gen), example(T_QA, 9, gen)]], L=24)
    with torch.no_grad():
        before = model(batch).loss_sum
    model.save_pretrained(tmp_path / "hf")
    cfg.model.name_or_path, cfg.model.from_config = str(tmp_path / "hf"), {}
    again = EncoderWithHeads(cfg).eval()
    assert again.untrained_heads == []
    with torch.no_grad():
        assert torch.allclose(again(batch).loss_sum, before, atol=1e-6)
    cfg.tasks["sent"].labels = ["neg", "pos"]  # a different label set: refused, named
    with pytest.raises(HeadConfigError, match="sent"):
        EncoderWithHeads(cfg)
