"""Streams, mixture and the training pipeline: rank/worker splits (exactly once, also with
fewer shards than consumers), mixture rates and sampled frequencies, curriculum phases,
exact resume."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from megamt.config import MixtureConfig, PhaseConfig, load_config
from megamt.data.mixture import TaskMixture
from megamt.data.pipeline import TrainPipeline, eval_batches, padding_batch
from megamt.data.shards import build_shards, load_manifest, split_shards
from megamt.data.streams import ExampleDataset, TaskStream, identity
from megamt.data.synthetic import make_demo_assets


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo shards: 40 train examples per task in 3 shards; 25 validation examples in 3 shards."""
    root = tmp_path_factory.mktemp("demo")
    a = make_demo_assets(root, seed=2, n_train=40, n_val=25)
    over = ["data.shard_max_examples=16", "data.seq_len=96", "train.micro_batch_size=2", "data.pack_buffer=8"]
    build_shards(load_config(a.spec, ["data.shard_max_examples=16"]), a.shards, a.tokenizer, progress=False, log=None)
    # validation in 3 shards of up to 9 examples (fewer shards than 2 ranks x 2 workers)
    build_shards(load_config(a.spec, ["data.shard_max_examples=9"]), a.root / "val9", a.tokenizer, progress=False, log=None)
    return a, over


def keys_of(stream_like):
    return [s["meta"]["key"] for s in stream_like]


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("shards_dir,max_ex", [("shards", 16), ("val9", 9), ("val2", 2)])
def test_exactly_once_two_ranks_two_workers(demo, shards_dir, max_ex):
    """2 ranks x 2 real DataLoader workers: every validation example exactly once."""
    a, _ = demo
    d = a.root / shards_dir
    if shards_dir == "val2":  # 13 shards: more shards than consumers
        build_shards(load_config(a.spec, ["data.shard_max_examples=2"]), d, a.tokenizer, progress=False, log=None)
    m = load_manifest(d)
    shards = split_shards(m, d, "qa", "validation")
    assert len(shards) == math.ceil(25 / max_ex)
    seen = []
    per_rank = []
    for rank in range(2):
        ds = ExampleDataset(shards, rank, 2, num_workers=2, name="qa")
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=identity)
        got = keys_of(loader)
        per_rank.append(len(got))
        seen += got
    assert sorted(seen) == sorted(keys_of(TaskStream(shards, infinite=False)))
    assert len(set(seen)) == len(seen) == 25
    if len(shards) < 4:
        assert sorted(per_rank) == [12, 13]  # split by example index: balanced


def test_eval_batches_cover_the_split_once_per_rank_pair(demo):
    a, over = demo
    cfg = load_config(a.spec, over + [f"data.shards_dir={a.root / 'val9'}", "data.num_workers=2"])
    m = load_manifest(a.root / "val9")
    total = m["tasks"]["summ"]["splits"]["validation"]["tokens"]
    n_seg, n_tok = 0, 0
    for rank in range(2):
        for b in eval_batches(cfg, "summ", "validation", rank, 2):
            assert b["input_ids"].shape == (2, 96)
            n_seg += int(sum(int(r.max()) + 1 for r in b["segment_ids"] if r.max() >= 0))
            n_tok += int((b["segment_ids"] >= 0).sum())
    assert n_seg == 25 and n_tok == total
    pb = padding_batch(cfg)
    assert (pb["labels"] == -100).all() and (pb["task_ids"] == -1).all() and pb["input_ids"].shape == (2, 96)
    assert len(list(eval_batches(cfg, "summ", "validation", 0, 2, max_batches=1))) == 1


def test_infinite_stream_epochs_reshuffle_and_split_by_rank(demo):
    a, _ = demo
    m = load_manifest(a.shards)
    shards = split_shards(m, a.shards, "ner", "train")  # 3 shards, 40 examples
    all_keys = set(keys_of(TaskStream(shards, infinite=False)))
    epochs = {}
    for rank in range(2):
        s = TaskStream(shards, rank, 2, infinite=True, seed=5, name="ner")
        n = s.num_examples
        e0, e1 = [next(s)["meta"]["key"] for _ in range(n)], [next(s)["meta"]["key"] for _ in range(n)]
        assert set(e0) == set(e1) and len(set(e0)) == n and e0 != e1  # same examples, new order
        epochs[rank] = set(e0)
    assert epochs[0] | epochs[1] == all_keys and not epochs[0] & epochs[1]
    # fewer examples than consumers: a consumer without own examples resamples everything
    # shuffle windows: with window >= 17 two shards are mixed together
    w1, w2 = (TaskStream(shards, 0, 1, infinite=True, seed=5, name="ner", window=w) for w in (1, 17))
    src = {k: i for i, (p, n) in enumerate(shards) for k in keys_of(TaskStream([(p, n)], infinite=False))}
    assert len({src[next(w1)["meta"]["key"]] for _ in range(8)}) == 1
    assert len({src[next(w2)["meta"]["key"]] for _ in range(8)}) == 2
    # the last shard holds 8: consumer c of 9 owns the run [8c // 9, 8(c + 1) // 9): 7 owns one, 0 none
    one = TaskStream(shards[-1:], 7, 9, infinite=True, name="x")
    assert len({next(one)["meta"]["key"] for _ in range(10)}) == 1
    tiny = TaskStream(shards[-1:], 0, 9, infinite=True, name="x")
    assert len({next(tiny)["meta"]["key"] for _ in range(40)}) == 8


# --------------------------------------------------------------------------- mixture


def test_mixture_rates_by_strategy():
    sizes = {"a": 100, "b": 400, "c": 1600}
    r = TaskMixture(sizes, MixtureConfig(strategy="proportional")).rates()
    assert r == pytest.approx({"a": 1 / 21, "b": 4 / 21, "c": 16 / 21})
    r = TaskMixture(sizes, MixtureConfig(strategy="capped", cap=400)).rates()
    assert r == pytest.approx({"a": 1 / 9, "b": 4 / 9, "c": 4 / 9})
    r = TaskMixture(sizes, MixtureConfig(strategy="temperature", temperature=2.0)).rates()
    assert r == pytest.approx({"a": 1 / 7, "b": 2 / 7, "c": 4 / 7})
    r = TaskMixture(sizes, MixtureConfig(strategy="explicit"), {"a": 1, "b": 1, "c": 2}).rates()
    assert r == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})
    r = TaskMixture(sizes, MixtureConfig(strategy="temperature", temperature=1e9), {"a": 3.0}).rates()
    assert r == pytest.approx({"a": 0.6, "b": 0.2, "c": 0.2})
    phases = [PhaseConfig(0, ["a"]), PhaseConfig(10, [], {"c": 0.0}), PhaseConfig(20, ["b", "c"], {"b": 1.0})]
    mx = TaskMixture(sizes, MixtureConfig(strategy="proportional", phases=phases))
    assert mx.rates(0) == {"a": 1.0, "b": 0.0, "c": 0.0} and mx.rates(9) == mx.rates(0)
    assert mx.rates(10) == pytest.approx({"a": 0.2, "b": 0.8, "c": 0.0})
    assert mx.rates(25) == pytest.approx({"a": 0.0, "b": 1 / (1 + 16 / 21), "c": (16 / 21) / (1 + 16 / 21)})
    assert "phase 2 from step 20" in mx.describe()


def test_sampled_frequencies_within_statistical_bounds():
    mx = TaskMixture({"a": 100, "b": 400, "c": 1600}, MixtureConfig(strategy="temperature", temperature=2.0))
    rng, n = random.Random(0), 30000
    counts = Counter(mx.sample(rng) for _ in range(n))
    for t, p in mx.rates().items():
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[t] - n * p) < 4.5 * sd, (t, counts[t], n * p)


def test_pipeline_task_frequencies_and_curriculum(demo):
    a, over = demo
    cfg = load_config(a.spec, over + ["mixture.strategy=explicit", "tasks.sentiment.weight=3.0",
                                      "tasks.nli.weight=1.0", "tasks.qa.weight=0.0", "tasks.ner.weight=0.0",
                                      "tasks.summ.weight=0.0", "tasks.instruct.weight=0.0"])
    lines = []
    p = TrainPipeline(cfg, 0, 1, log=lines.append)
    assert "sentiment" in lines[0] and "75.00%" in lines[0]
    names = list(cfg.tasks)
    counts = Counter()
    for _ in range(60):
        b = p.next_batch()
        for r in range(b["input_ids"].shape[0]):
            seg, tid = b["segment_ids"][r], b["task_ids"][r]
            for j in range(int(seg.max()) + 1):
                counts[names[int(tid[seg == j][0])]] += 1
    n = sum(counts.values())
    assert set(counts) == {"sentiment", "nli"} and n > 300
    sd = math.sqrt(n * 0.75 * 0.25)
    assert abs(counts["sentiment"] - 0.75 * n) < 4.5 * sd + 8  # + the packer buffer's residue
    cfg2 = load_config(a.spec, over + ["mixture.phases=[{start_step: 0, tasks: [qa]}, {start_step: 3, tasks: [ner]}]"])
    p = TrainPipeline(cfg2, 0, 1, log=None)
    assert set(p.next_batch()["task_ids"].unique().tolist()) <= {-1, names.index("qa")}
    p.set_step(3)
    assert p.rates() == {t: float(t == "ner") for t in names}
    for _ in range(4):  # the buffer drains its qa examples, then only ner follows
        b = p.next_batch()
    assert set(b["task_ids"].unique().tolist()) <= {-1, names.index("ner")}


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_exact_resume(demo, rank, world):
    a, over = demo
    cfg = load_config(a.spec, over + ["mixture.phases=[{start_step: 0}, {start_step: 20, tasks: [qa, ner]}]"])
    plan = [None, None, "qa", None, "ner"] * 8  # mixed and task-homogeneous micro-batches, 40 steps
    k = 17

    def run(p, steps):
        out = []
        for step in steps:
            p.set_step(step)
            out.append(p.next_batch(plan[step]))
        return out

    ref_p = TrainPipeline(cfg, rank, world, log=None)
    ref = run(ref_p, range(k))
    state = json.loads(json.dumps(ref_p.state_dict()))
    ref += run(ref_p, range(k, len(plan)))
    assert any(s.epoch >= 1 for s in ref_p.streams.values())  # the run crossed epoch boundaries

    resumed = TrainPipeline(cfg, rank, world, log=None)
    resumed.load_state_dict(state)
    got = run(resumed, range(k, len(plan)))
    for b_ref, b_got in zip(ref[k:], got):
        assert b_ref.keys() == b_got.keys()
        for key in b_ref:
            if torch.is_tensor(b_ref[key]):
                assert torch.equal(b_ref[key], b_got[key]), key
            else:
                assert b_ref[key] == b_got[key]
    with pytest.raises(ValueError, match="same world size"):
        TrainPipeline(cfg, 0, world + 1, log=None).load_state_dict(state)


def test_overlong_examples_are_reported(demo):
    a, over = demo
    cfg = load_config(a.spec, over + ["data.seq_len=24", "data.overlong=reject", f"data.shards_dir={a.root / 'val9'}"])
    lines = []
    p = TrainPipeline(cfg, 0, 1, log=lines.append)
    for _ in range(3):
        p.next_batch()
    assert p.stats()["overlong"] > 0 and sum("data.seq_len=24" in l for l in lines) == 1
    assert list(eval_batches(cfg, "summ", "validation", log=lines.append)) == []
    assert "0 example(s) truncated, 25 rejected" in lines[-1]  # every summ example is longer than 24 tokens


def test_encoder_qa_is_split_into_doc_stride_windows(demo):
    a, over = demo
    cfg = load_config(a.spec, over + ["data.objective=encoder", "data.seq_len=16", "data.qa_doc_stride=3"])
    lines = []
    p = TrainPipeline(cfg, 0, 1, log=lines.append)
    spans = 0
    for _ in range(6):
        b = p.next_batch(task="qa")
        for r in range(b["input_ids"].shape[0]):
            for seg in b["segment_ids"][r].unique().tolist():
                if seg < 0:
                    continue
                in_seg = b["segment_ids"][r] == seg
                starts = ((b["start_labels"][r] == 1) & in_seg).nonzero().flatten()
                ends = ((b["end_labels"][r] == 1) & in_seg).nonzero().flatten()
                assert len(starts) == len(ends) <= 1  # a window holds its example's gold span whole
                if len(starts):
                    spans += 1
                    assert starts[0] <= ends[0] and b["start_labels"][r, starts[0]] == 1
    stats = p.stats()
    assert stats["qa_split"] > 0 and stats["qa_windows"] >= stats["qa_split"] and spans > 0
    assert any("extractive QA split into windows (data.qa_doc_stride=3)" in l for l in lines)


def test_background_window_reads_give_the_same_batches(demo):
    """data.prefetch_windows changes when a window is read, never which batches come out."""
    a, over = demo
    on, off = (TrainPipeline(load_config(a.spec, over + [f"data.prefetch_windows={v}", "data.shuffle_buffer=10"]),
                             1, 2, log=None) for v in ("true", "false"))
    on.start_prefetch()
    for step in range(30):
        task = "qa" if step % 3 == 2 else None
        b_on, b_off = on.next_batch(task), off.next_batch(task)
        for key in b_on:
            if torch.is_tensor(b_on[key]):
                assert torch.equal(b_on[key], b_off[key]), (step, key)
    assert on.state_dict() == off.state_dict()
    assert on.window_stats()["fills"] == off.window_stats()["fills"] > 6
    assert off.window_stats()["fill_waits"] == off.window_stats()["fills"]  # inline: every fill is waited for
    on.close()
