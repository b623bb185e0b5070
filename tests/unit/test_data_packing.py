"""Packer and the packed-batch contract: labels shifted within examples, nothing lost or
duplicated, never split, overlong policy counted, packed Llama forward == unpacked forward,
encoder head labels."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from megamt.data.packing import IGNORE, Packer, PackItem, collate_rows

PAD = 0


def item(tokens, n_prompt, task_id=0):
    return PackItem(np.asarray(tokens, dtype=np.int64), task_id, n_prompt=n_prompt)


def random_items(rng, n, lo=3, hi=60, vocab=90):
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        out.append(item([rng.randint(1, vocab) for _ in range(length)], rng.randint(1, length - 1), i % 3))
    return out


def segments(batch):
    """(tokens, labels, task_id, positions) of every example segment in a batch."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for j in range(int(seg.max()) + 1):
            m = seg == j
            out.append((batch["input_ids"][b][m].tolist(), batch["labels"][b][m].tolist(),
                        batch["task_ids"][b][m].unique().tolist(), batch["position_ids"][b][m].tolist()))
    return out


def test_contract_on_a_hand_built_row():
    rows = [[item([5, 6, 7, 8], 2, 1), item([9, 10, 11], 1, 2)], [item([3, 4], 1, 0)]]
    b = collate_rows(rows, 10, PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 0, 0, 0], [3, 4] + [0] * 8]
    # labels[t] = token t+1 when that token is a target token; -100 on prompt, last token, padding
    assert b["labels"].tolist() == [[-100, 7, 8, -100, 10, 11, -100, -100, -100, -100], [4] + [-100] * 9]
    assert b["task_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 2, -1, -1, -1], [0, 0] + [-1] * 8]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, -1, -1, -1], [0, 0] + [-1] * 8]
    assert b["cu_seqlens"].tolist() == [0, 4, 7, 10, 12, 20] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 8
    assert all(b[k].dtype == torch.long for k in ("input_ids", "labels", "task_ids", "position_ids", "segment_ids"))


@pytest.mark.parametrize("seq_len,buffer", [(64, 1), (128, 16), (512, 64)])
def test_no_target_token_lost_or_duplicated(seq_len, buffer):
    rng = random.Random(seq_len)
    items = random_items(rng, 400)
    packer = Packer(seq_len, buffer)
    rows = []
    for it in items:
        packer.add(it)
        if packer.full:
            rows.append(packer.pop_row())
    while len(packer):
        rows.append(packer.pop_row())
    segs = []
    for i in range(0, len(rows), 4):
        b = collate_rows(rows[i:i + 4], seq_len, PAD)
        assert b["input_ids"].shape == (min(4, len(rows) - i), seq_len)
        segs += segments(b)
    # every example exactly once, whole (never split), positions restart at 0
    assert Counter(tuple(s[0]) for s in segs) == Counter(tuple(it.tokens.tolist()) for it in items)
    by_tokens = {tuple(it.tokens.tolist()): it for it in items}
    n_target = 0
    for toks, labels, tids, pos in segs:
        it = by_tokens[tuple(toks)]
        p = it.n_prompt
        assert labels == [IGNORE] * (p - 1) + toks[p:] + [IGNORE]
        assert tids == [it.task_id] and pos == list(range(len(toks)))
        n_target += sum(l != IGNORE for l in labels)
    assert n_target == sum(len(it) - it.n_prompt for it in items)
    eff = sum(len(it) for it in items) / (len(rows) * seq_len)
    if buffer >= 16:
        assert eff > 0.93, eff


def test_overlong_truncate_and_reject_are_counted():
    long = item(list(range(1, 31)), 20)  # 20 prompt + 10 target tokens
    p = Packer(16, 4, "truncate")
    assert p.add(long) and p.stats["truncated"] == 1
    (got,) = p.pop_row()
    # first prompt token kept, prompt cut from the left, target whole
    assert got.tokens.tolist() == [1, 16, 17, 18, 19, 20] + list(range(21, 31)) and got.n_prompt == 6
    p.add(item(list(range(1, 31)), 2))  # the target alone is too long: cut from the right
    (got,) = p.pop_row()
    assert got.tokens.tolist() == [1] + list(range(3, 18)) and got.n_prompt == 1
    r = Packer(16, 4, "reject")
    assert not r.add(long) and r.stats["overlong"] == 1 and len(r) == 0


def test_oldest_first_best_fit_and_state_round_trip():
    p = Packer(10, 8)
    for n in (6, 3, 4, 2, 5):
        p.add(item(list(range(1, n + 1)), 1))
    assert [len(x) for x in p.pop_row()] == [6, 4]   # oldest (6), then the longest that fits (4)
    state = p.state_dict()
    q = Packer(10, 8)
    q.load_state_dict(state)
    assert [[x.tokens.tolist() for x in p.pop_row()] for _ in range(2)] == \
           [[x.tokens.tolist() for x in q.pop_row()] for _ in range(2)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_llama_forward_equals_unpacked(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    rng = random.Random(1)
    rows = [[item([rng.randint(1, 99) for _ in range(n)], 2, k) for k, n in enumerate(lens)]
            for lens in ((9, 17, 5), (30,), (4, 4, 4, 4))]
    b = collate_rows(rows, 40, PAD)
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            o = 0
            for it in row:
                alone = model(input_ids=torch.from_numpy(it.tokens)[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, o:o + len(it)], alone, atol=1e-5, rtol=0)
                o += len(it)


def test_encoder_head_labels(tmp_path):
    from megamt.config import load_config
    from megamt.data.pipeline import eval_batches
    from megamt.data.shards import build_shards, read_shard, split_shards
    from megamt.data.synthetic import make_demo_assets
    from megamt.data.tokenize import load_tokenizer

    a = make_demo_assets(tmp_path, n_train=8, n_val=12)
    cfg = load_config(a.spec, ["data.objective=encoder", "data.seq_len=64", "train.micro_batch_size=2"])
    m = build_shards(cfg, a.shards, a.tokenizer, progress=False, log=None)
    tok = load_tokenizer(a.tokenizer)
    names = list(cfg.tasks)
    for task in ("sentiment", "nli", "qa", "ner", "summ"):
        tid = names.index(task)
        samples = [s for p, n in split_shards(m, a.shards, task, "validation") for s in read_shard(p, n)]
        by_ids = {tuple(s["enc_ids"].tolist()): s for s in samples}
        seen = 0
        for b in eval_batches(cfg, task, "validation", num_workers=0):
            assert (b["labels"] == IGNORE).all()
            for r in range(b["input_ids"].shape[0]):
                seg = b["segment_ids"][r]
                for j in range(int(seg.max()) + 1):
                    mask = seg == j
                    ids = b["input_ids"][r][mask].tolist()
                    s = by_ids[tuple(ids)]
                    seen += 1
                    assert (b["task_ids"][r][mask] == tid).all() and ids[0] == tok.cls_token_id
                    cls, tags = b["cls_labels"][r][mask], b["tag_labels"][r][mask]
                    st, en = b["start_labels"][r][mask], b["end_labels"][r][mask]
                    if task in ("sentiment", "nli"):
                        assert cls.tolist() == [s["meta"]["class_id"]] + [IGNORE] * (len(ids) - 1)
                    else:
                        assert (cls == IGNORE).all()
                    if task == "ner":
                        assert tags.tolist() == s["enc_tags"].tolist()
                        assert [m["tasks"]["ner"]["labels"][t] for t in tags[tags != IGNORE]] == s["meta"]["references"]
                    else:
                        assert (tags == IGNORE).all()
                    if task == "qa":
                        assert int((st == 1).sum()) == 1 and int((en == 1).sum()) == 1
                        i, k = int(st.argmax()), int(en.argmax())
                        assert tok.decode(ids[i:k + 1]) == s["meta"]["references"][0]
                        c0, c1 = s["meta"]["ctx_span"]
                        assert (st[c0:c1 + 1] >= 0).all() and (st[:c0] == IGNORE).all() and (st[c1 + 1:] == IGNORE).all()
                    else:
                        assert (st == IGNORE).all() and (en == IGNORE).all()
        assert seen == len(samples) == 12


def test_encoder_overlong_truncation_keeps_last_token_and_drops_cut_answers():
    from megamt.data.packing import fit_overlong

    toks = np.arange(1, 21)
    qa = PackItem(toks, 0, span=(12, 13), ctx=(5, 18))
    got = fit_overlong(qa, 10, "truncate")
    assert got.tokens.tolist() == list(range(1, 10)) + [20] and got.span == (-1, -1) and got.ctx == (5, 8)
    kept = fit_overlong(PackItem(toks, 0, span=(6, 7), ctx=(5, 18)), 10, "truncate")
    assert kept.span == (6, 7)
    ner = fit_overlong(PackItem(toks, 0, tags=np.arange(20)), 10, "truncate")
    assert ner.tags.tolist() == list(range(9)) + [IGNORE]
    b = collate_rows([[got]], 12, PAD, "encoder")
    assert (b["start_labels"][0, 5:9] == 0).all() and (b["start_labels"][0, 9:] == IGNORE).all()


def _qa_item(n_ctx=30, span=(10, 12), head=4, tail=1):
    from megamt.data.packing import PackItem

    toks = np.arange(100, 100 + head + n_ctx + tail, dtype=np.int64)
    return PackItem(toks, 2, span=(head + span[0], head + span[1]), ctx=(head, head + n_ctx - 1), key="ex7")


@pytest.mark.parametrize("seq_len,stride", [(16, 3), (17, 5), (12, 1), (33, 4)])
def test_qa_windows_hold_the_answer_at_every_position(seq_len, stride):
    from megamt.data.packing import qa_windows

    for a in range(0, 30):
        for length in range(1, stride + 2):  # consecutive windows share `stride` tokens
            b = a + length - 1
            if b >= 30:
                continue
            item = _qa_item(span=(a, b))
            wins = qa_windows(item, seq_len, stride)
            assert wins, (a, b)
            for w in wins:
                assert len(w) <= seq_len and w.task_id == 2 and w.key.startswith("ex7#w")
                assert list(w.tokens[:4]) == list(item.tokens[:4]) and w.tokens[-1] == item.tokens[-1]
                # the gold span covers the same tokens as in the original example
                assert list(w.tokens[w.span[0]:w.span[1] + 1]) == list(item.tokens[item.span[0]:item.span[1] + 1])
                assert w.ctx[0] == 4 and w.ctx[0] <= w.span[0] <= w.span[1] <= w.ctx[1] == len(w) - 2


def test_qa_windows_cover_the_context_with_the_stride_overlap():
    from megamt.data.packing import qa_windows

    seen = set()
    for a in range(30):  # the union of the windows that hold some answer = every context token
        for w in qa_windows(_qa_item(span=(a, a)), 16, 3):
            seen.update(int(t) for t in w.tokens[w.ctx[0]:w.ctx[1] + 1])
    assert seen == set(range(104, 134))
    assert qa_windows(_qa_item(), 16, 11) == []  # room 11 <= stride: no progress possible


def test_packer_splits_overlong_qa_and_counts():
    from megamt.data.packing import Packer, PackItem

    p = Packer(16, overlong="truncate", qa_doc_stride=3)
    assert p.add(_qa_item(span=(10, 11)))
    assert p.stats["qa_split"] == 1 and p.stats["qa_windows"] == len(p) >= 1 and p.stats["truncated"] == 0
    # an answer longer than a window: truncated as before (counted), gold span lost
    assert p.add(_qa_item(span=(0, 20)))
    assert p.stats["truncated"] == 1
    # reject policy and stride 0 keep their meaning
    r = Packer(16, overlong="reject", qa_doc_stride=3)
    assert not r.add(_qa_item()) and r.stats["overlong"] == 1
    z = Packer(16, overlong="truncate", qa_doc_stride=0)
    assert z.add(_qa_item()) and z.stats["truncated"] == 1 and z.stats["qa_split"] == 0
    # a short QA example is never split
    s = Packer(64, qa_doc_stride=3)
    s.add(_qa_item())
    assert s.stats["qa_split"] == 0 and len(s) == 1
    assert isinstance(PackItem.from_state(p._items[next(iter(p._items))].to_state()), PackItem)
