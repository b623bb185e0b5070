"""The multiple_choice, tagging (POS / chunk) and generative_qa task types: readers and their
bad-input errors, templates, shards, the packer's choice groups, the multiple-choice head
(held to separate per-choice forwards), metrics (held to seqeval / by-hand values) and
evaluation for causal LMs and encoder-decoders (rank classification, both scores) and encoders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamt.config import config_from_dict, load_config
from megamt.data.errors import DataError, SkipCounter
from megamt.data.formats import read_examples, resolve_labels
from megamt.data.packing import Packer, PackItem, collate_rows, encoder_item, fit_choices
from megamt.data.templates import example_rng, parse_tagging_target, render, tagging_target
from megamt.eval import api
from megamt.eval import metrics as M

from task_type_files import ARC, CONLL, MARCO, PIQA, all_texts, task_specs, write_arc_jsonl

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The small files, a tokenizer trained on them, shards, and the spec as a raw mapping."""
    from megamt.data.shards import build_shards
    from megamt.data.synthetic import build_tokenizer, corpus_texts

    out = tmp_path_factory.mktemp("types")
    tasks = task_specs(out)
    build_tokenizer(corpus_texts(out / "_none") + all_texts(out), out / "tok", vocab_size=600)
    raw = {"tasks": tasks, "data": {"shards_dir": str(out / "shards"), "tokenizer": str(out / "tok"), "seq_len": 96,
                                    "pack_buffer": 4},
           "train": {"micro_batch_size": 3}}
    build_shards(config_from_dict(raw), progress=False, log=None)
    return out, raw


def vocab(assets) -> int:
    from megamt.data.tokenize import load_tokenizer

    return len(load_tokenizer(assets[0] / "tok"))


def encoder_raw(assets, drop=("marco",)) -> dict:
    out, raw = assets
    enc = json.loads(json.dumps(raw))
    enc["tasks"] = {k: v for k, v in enc["tasks"].items() if k not in drop}
    enc["model"] = {"family": "encoder", "from_config": {
        "model_type": "bert", "vocab_size": vocab(assets), "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 128}}
    return enc


# --------------------------------------------------------------------------- readers


def test_multiple_choice_readers(assets):
    out, raw = assets
    cfg = config_from_dict(raw)
    arc = list(read_examples("arc", cfg.tasks["arc"], "train"))
    assert [e.fields["label"] for e in arc] == ["ABCD".index(k) for _, _, k in ARC]
    assert arc[0].fields["choices"] == ARC[0][1] and arc[0].fields["question"] == ARC[0][0]
    assert arc[0].key.endswith("arc.jsonl:1") and "context" not in arc[0].fields
    piqa = list(read_examples("piqa", cfg.tasks["piqa"], "train"))
    assert [e.fields["choices"] for e in piqa] == [[r[1], r[2]] for r in PIQA]
    assert [e.fields["label"] for e in piqa] == [r[3] for r in PIQA]
    # ARC's numbered choice labels ("1".."4"): answerKey "3" is the third choice, not index 3
    numbered = out / "arc_numbered.jsonl"
    numbered.write_text(json.dumps({"question": {"stem": "Q?", "choices": [
        {"label": str(i + 1), "text": t} for i, t in enumerate("wxyz")]}, "answerKey": "3"}) + "\n"
        # Hugging Face's layout: {"text": [...], "label": [...]}, and a context
        + json.dumps({"q": "Q2?", "ctx": "Some passage.", "choices": {"text": ["p", "q"], "label": ["A", "B"]},
                      "answerKey": "B"}) + "\n")
    from megamt.config import TaskConfig

    t = TaskConfig(task_type="multiple_choice", inputs={"train": {"path": str(numbered)}},
                   fields={"question": "question.stem", "choices": "question.choices", "label": "answerKey"})
    t = config_from_dict({"tasks": {"x": t.__dict__ | {"inputs": {"train": {"path": str(numbered)}}}}}).tasks["x"]
    first = next(read_examples("x", t, "train", on_error="skip", skips=SkipCounter()))
    assert first.fields["label"] == 2 and first.fields["choices"] == list("wxyz")
    t.fields = {"question": "q", "context": "ctx", "choices": "choices", "label": "answerKey"}
    second = list(read_examples("x", t, "train", on_error="skip", skips=SkipCounter()))[-1]
    assert second.fields == {"question": "Q2?", "context": "Some passage.", "choices": ["p", "q"], "label": 1}


def test_tagging_and_generative_qa_readers(assets):
    out, raw = assets
    cfg = config_from_dict(raw)
    pos = list(read_examples("pos", cfg.tasks["pos"], "train"))
    chunk = list(read_examples("chunk", cfg.tasks["chunk"], "train"))
    assert pos[0].fields["tokens"] == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert pos[0].fields["tags"] == ["NNP", "VBZ", "JJ", "NN", "TO", "VB", "JJ", "NN", "."]
    # chunk tags are IOB1 in CoNLL-2003: normalised to IOB2 ("it" B-NP after an I-PP stays B-NP,
    # an I- that starts a chunk becomes B-)
    assert chunk[0].fields["tags"] == ["B-NP", "B-VP", "B-NP", "I-NP", "B-VP", "I-VP", "B-NP", "I-NP", "O"]
    assert resolve_labels("chunk", cfg.tasks["chunk"]) == ["O", "B-NP", "I-NP", "B-PP", "I-PP", "B-VP", "I-VP"]
    assert resolve_labels("pos", cfg.tasks["pos"]) == sorted({l.split()[1] for l in CONLL.splitlines()[2:]
                                                              if l.strip()})
    cfg.tasks["pos"].inputs["train"].tag_column = "3"  # the NER column by index
    assert list(read_examples("pos", cfg.tasks["pos"], "train"))[0].fields["tags"][0] == "B-ORG"  # IOB, normalised
    marco = list(read_examples("marco", cfg.tasks["marco"], "train"))
    assert marco[1].fields["answers"] == MARCO[1][2] and "context" in marco[1].fields
    assert "context" not in marco[2].fields  # an empty passage: a closed-book question


@pytest.mark.skipif(not (SHARED / "conll2003" / "eng.train").is_file(), reason="real CoNLL-2003 sample absent")
def test_real_conll2003_pos_and_chunk_columns():
    cfg = config_from_dict({"tasks": {
        "pos": {"task_type": "tagging", "inputs": {"train": {"path": str(SHARED / "conll2003/eng.testa"),
                                                             "tag_column": "pos"}}},
        "chunk": {"task_type": "tagging", "inputs": {"train": {"path": str(SHARED / "conll2003/eng.testa"),
                                                               "tag_column": 2}}}}})
    pos = list(read_examples("pos", cfg.tasks["pos"], "train"))
    chunk = list(read_examples("chunk", cfg.tasks["chunk"], "train"))
    assert len(pos) == len(chunk) == 996  # the sample's sentences (see its README)
    assert sum(len(e.fields["tokens"]) for e in pos) == 14091
    labels = resolve_labels("chunk", cfg.tasks["chunk"])
    assert labels[0] == "O" and "B-NP" in labels and all(t in labels for e in chunk for t in e.fields["tags"])
    assert "NNP" in resolve_labels("pos", cfg.tasks["pos"])


@pytest.mark.parametrize("case,reason,where", [
    ("label_range", "label_out_of_range", "piqa_bad.tsv:3"),
    ("one_choice", "too_few_choices", "mc_bad.jsonl:2"),
    ("empty_choice", "too_few_choices", "mc_bad.jsonl:2"),
    ("bad_letter", "label_out_of_range", "mc_bad.jsonl:2"),
    ("no_column", "missing_column", "eng3.sample:3"),
])
def test_bad_input_names_file_and_line(assets, case, reason, where):
    out, raw = assets
    ok = {"question": "Which is a fruit?", "choices": ["apple", "chair"], "label": 0}
    if case == "label_range":
        (out / "piqa_bad.tsv").write_text("goal\tsol1\tsol2\tlabel\nTo boil water,\tuse a kettle.\tuse a fan.\t0\n"
                                          "To open a can,\tuse an opener.\tuse a spoon.\t2\n")
        task = {"task_type": "multiple_choice", "inputs": {"train": {"path": str(out / "piqa_bad.tsv")}},
                "fields": {"question": "goal", "choices": "sol1,sol2"}}
    elif case == "no_column":
        # CoNLL-2000 layout (word POS chunk): no NER column
        (out / "eng3.sample").write_text("\n".join(" ".join(l.split()[:3]) for l in CONLL.splitlines()) + "\n")
        task = {"task_type": "tagging", "inputs": {"train": {"path": str(out / "eng3.sample"), "format": "conll",
                                                             "tag_column": "ner"}}}
    else:
        bad = dict(ok)
        if case == "one_choice":
            bad["choices"] = ["apple"]
        elif case == "empty_choice":
            bad["choices"] = ["apple", " "]
        else:
            bad["label"] = "apple"
        (out / "mc_bad.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        task = {"task_type": "multiple_choice", "inputs": {"train": {"path": str(out / "mc_bad.jsonl")}}}
    cfg = config_from_dict({"tasks": {"t": task}})
    with pytest.raises(DataError) as e:
        list(read_examples("t", cfg.tasks["t"], "train"))
    assert e.value.reason == reason and str(e.value).split(": ")[0].endswith(where), str(e.value)
    if case != "no_column":  # a bad row can be skipped and counted instead (a missing column is a spec error)
        skips = SkipCounter()
        assert len(list(read_examples("t", cfg.tasks["t"], "train", on_error="skip", skips=skips))) == 1
        assert skips.as_dict() == {reason: 1}


# --------------------------------------------------------------------------- templates and shards


def test_templates_fit_context_and_targets(assets):
    out, raw = assets
    cfg = config_from_dict(raw)
    for name, want_ctx in (("marco", None), ("arc", False)):
        for ex in read_examples(name, cfg.tasks[name], "train"):
            for seed in range(4):
                prompt, target, tpl = render(ex, cfg.tasks[name], random.Random(seed))
                has_ctx = "context" in ex.fields
                assert tpl.startswith(("gqa_read", "gqa_context") if has_ctx else ("gqa_answer", "gqa_plain", "mc_"))
                if name == "arc":
                    assert target == ex.fields["choices"][ex.fields["label"]]
                else:
                    assert target == ex.fields["answers"][0] and (ex.fields.get("context", "") in prompt)
    ex = next(read_examples("pos", cfg.tasks["pos"], "train"))
    _, target, _ = render(ex, cfg.tasks["pos"], example_rng(0, ex))
    assert target == tagging_target(ex.fields["tags"]) == "NNP VBZ JJ NN TO VB JJ NN ."
    assert parse_tagging_target(target, 9) == ex.fields["tags"]
    assert parse_tagging_target("NNP VBZ", 3) == ["NNP", "VBZ", ""] and parse_tagging_target("A B C D", 2) == ["A", "B"]


def test_shards_hold_choice_groups_and_word_tags(assets):
    from megamt.data.shards import load_manifest, read_shard, split_shards

    out, raw = assets
    m = load_manifest(out / "shards")
    arc = list(read_shard(split_shards(m, out / "shards", "arc", "train")[0][0]))
    for s, (q, choices, key) in zip(arc, ARC):
        lens = s["meta"]["choice_lens"]
        assert len(lens) == 4 and sum(lens) == len(s["enc_ids"]) and s["meta"]["class_id"] == "ABCD".index(key)
        assert s["meta"]["references"] == [choices["ABCD".index(key)]]
    pos = next(read_shard(split_shards(m, out / "shards", "pos", "train")[0][0]))
    assert (pos["enc_tags"] != -100).sum() == 9 and m["tasks"]["pos"]["labels"][int(pos["enc_tags"][1])] == "NNP"


# --------------------------------------------------------------------------- packing and the head


def mc_item(task_id, lens, gold, start=10):
    toks = np.concatenate([np.arange(start, start + n) for n in lens])
    return PackItem(toks, task_id, cls=gold, choice_lens=tuple(lens))


def test_packer_keeps_each_choice_group_in_one_row():
    rng = random.Random(0)
    packer = Packer(32, buffer_size=6)
    items = []
    for i in range(40):
        if i % 3:
            lens = [rng.randint(3, 7) for _ in range(rng.randint(2, 4))]
            items.append(mc_item(1, lens, rng.randrange(len(lens))))
        else:
            items.append(PackItem(np.arange(5, 5 + rng.randint(4, 12)), 0, cls=1))
    rows = []
    for it in items:
        packer.add(it)
        if packer.full:
            rows.append(packer.pop_row())
    while len(packer):
        rows.append(packer.pop_row())
    state = packer.state_dict()
    assert state["items"] == []
    batch = collate_rows(rows, 32, 0, "encoder")
    groups = 0
    for b in range(batch["input_ids"].shape[0]):
        choice, seg, pos, cls = (batch[k][b] for k in ("choice_ids", "segment_ids", "position_ids", "cls_labels"))
        marks = (choice != -100).nonzero().flatten().tolist()
        k = 0
        while k < len(marks):  # a group: choices 0, 1, ... on consecutive segments of this row
            assert choice[marks[k]] == 0 and cls[marks[k]] >= 0
            n = 1
            while k + n < len(marks) and choice[marks[k + n]] == n:
                assert seg[marks[k + n]] == seg[marks[k]] + n and pos[marks[k + n]] == 0
                n += 1
            assert cls[marks[k]] < n
            groups += 1
            k += n
    assert groups == sum(1 for it in items if it.choice_lens)
    item = mc_item(1, [30, 6, 12], 2)
    cut = fit_choices(item, 32)  # cap 14: 14 + 6 + 12 = 32
    assert cut.choice_lens == (14, 6, 12) and len(cut) == 32 and cut.cls == 2
    assert list(cut.tokens[:13]) == list(item.tokens[:13]) and cut.tokens[13] == item.tokens[29]  # keeps its last
    assert list(cut.tokens[14:20]) == list(item.tokens[30:36])
    assert fit_choices(mc_item(1, [30] * 20, 0), 32) is None  # 2 tokens per choice do not fit
    assert PackItem.from_state(cut.to_state()).choice_lens == cut.choice_lens


def test_multiple_choice_head_equals_separate_forwards_per_choice(assets):
    """Packed rows (choice groups beside other tasks' examples) give exactly the loss of
    scoring each choice alone and taking the softmax cross-entropy over each example's choices."""
    from megamt.data.pipeline import TrainPipeline
    from megamt.heads import count_loss_terms
    from megamt.model import MultitaskModel

    cfg = config_from_dict(encoder_raw(assets))
    torch.manual_seed(0)
    model = MultitaskModel(cfg).eval()
    enc = model.backbone
    pipe = TrainPipeline(cfg, 0, 1, log=None)
    names = list(cfg.tasks)
    groups = 0
    for _ in range(3):
        batch = pipe.next_batch()
        with torch.no_grad():
            tl = model(batch)
        assert torch.equal(tl.count, count_loss_terms(batch, len(names)))
        for task in ("arc", "piqa"):
            t = names.index(task)
            want, n = 0.0, 0
            starts = ((batch["choice_ids"] == 0) & (batch["task_ids"] == t)).nonzero().tolist()
            for b, s in starts:
                seg0, scores = int(batch["segment_ids"][b, s]), []
                gold = int(batch["cls_labels"][b, s])
                k = 0
                while True:
                    sel = batch["segment_ids"][b] == seg0 + k
                    if not sel.any() or batch["choice_ids"][b][sel][0] != k or (k and batch["choice_ids"][b][sel][0] == 0):
                        break
                    ids = batch["input_ids"][b][sel][None]
                    with torch.no_grad():
                        h = enc.backbone(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                                         token_type_ids=torch.zeros_like(ids)).last_hidden_state
                        scores.append(enc.heads[task](h[0, 0])[0])
                    k += 1
                want += float(F.cross_entropy(torch.stack(scores)[None], torch.tensor([gold])))
                n += 1
                groups += 1
            assert tl.count[t] == n
            assert abs(float(tl.loss_sum[t]) - want) < 1e-4 * max(1.0, want), (task, float(tl.loss_sum[t]), want)
    assert groups >= 3
    # the gradient reaches the multiple-choice heads and the backbone
    model.train()
    model(pipe.next_batch(task="arc")).loss_sum.sum().backward()
    assert enc.heads["arc"].out.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- metrics


def test_metrics_of_the_new_types():
    from seqeval.metrics import f1_score

    gold = [["B-NP", "I-NP", "B-VP", "O"], ["B-NP", "B-PP", "B-NP", "I-NP"]]
    pred = [["B-NP", "I-NP", "B-VP", "O"], ["B-NP", "JJ", "B-NP", "B-NP"]]
    m = M.compute_metrics("tagging", gold, pred)
    assert list(m) == ["chunk_f1", "token_accuracy", "chunk_precision", "chunk_recall"]
    assert m["token_accuracy"] == pytest.approx(100 * 6 / 8)
    clean = [p[:] for p in pred]
    clean[1][1] = "O"
    assert m["chunk_f1"] == pytest.approx(100 * f1_score(gold, clean))
    pos = M.compute_metrics("tagging", [["NN", "VB"], ["DT"]], [["NN", "NN"], ["DT"]])
    assert pos == {"token_accuracy": pytest.approx(200 / 3)} and M.primary_metric("tagging", pos) == "token_accuracy"
    with pytest.raises(M.MetricError, match="chunk_f1"):
        M.compute_metrics("tagging", [["NN"]], [["NN"]], ["chunk_f1"])
    g = M.compute_metrics("generative_qa", [["The Pacific Ocean"], ["Jane Austen", "Austen"]],
                          ["pacific ocean", "Austen wrote it"])
    assert g["exact_match"] == 50.0  # articles and case are normalised away
    assert g["f1"] == pytest.approx(50 * (1 + 2 * (1 / 3) / (1 + 1 / 3)))
    # ROUGE keeps articles: "pacific ocean" vs "the pacific ocean" P 1, R 2/3; "austen" P 1/3, R 1
    assert g["rougeL"] == pytest.approx(50 * (0.8 + 0.5))
    mc = M.compute_metrics("multiple_choice", [0, 1, 2], [{"choice": 0, "choice_norm": 1}, {"choice": 1, "choice_norm": 1},
                                                          {"choice": 0, "choice_norm": 2}])
    assert mc == {"accuracy": pytest.approx(200 / 3), "accuracy_norm": pytest.approx(200 / 3)}
    assert M.compute_metrics("multiple_choice", [1], [{"choice": 1}]) == {"accuracy": 100.0}


# --------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def causal(assets):
    from megamt.model import MultitaskModel

    out, raw = assets
    c = json.loads(json.dumps(raw))
    c["model"] = {"fused_loss": False, "from_config": {
        "model_type": "llama", "vocab_size": vocab(assets), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}}
    torch.manual_seed(0)
    return MultitaskModel(config_from_dict(c))


def test_causal_lm_evaluation_of_every_new_type(assets, causal, tmp_path):
    res = api.evaluate(causal, max_new_tokens=4, out_dir=tmp_path, progress=False)
    assert set(res["tasks"]["arc"]["metrics"]) == {"accuracy", "accuracy_norm"}
    assert set(res["tasks"]["pos"]["metrics"]) == {"token_accuracy"}
    assert set(res["tasks"]["chunk"]["metrics"]) == {"chunk_f1", "token_accuracy", "chunk_precision", "chunk_recall"}
    assert set(res["tasks"]["marco"]["metrics"]) == {"f1", "exact_match", "rougeL"}
    assert res["tasks"]["arc"]["cut_generations"] == 0  # rank classification never generates
    preds = [json.loads(l)["prediction"] for l in (tmp_path / "predictions" / "arc.jsonl").read_text().splitlines()]
    gold = ["ABCD".index(k) for _, _, k in ARC]
    for key, metric in (("choice", "accuracy"), ("choice_norm", "accuracy_norm")):
        assert res["tasks"]["arc"]["metrics"][metric] == pytest.approx(
            100 * sum(p[key] == g for p, g in zip(preds, gold)) / len(gold))
    assert "| arc | multiple_choice |" in (tmp_path / "eval.md").read_text()


def test_rank_classification_sum_and_length_normalised(assets, causal, monkeypatch):
    """Summed log-likelihood favours the short choice; per token, the long one wins."""
    import megamt.eval.generation as G

    def fake_scores(model, prompts, choices, **kw):
        return [[-1.0 * len(c) if len(c) < 3 else -0.5 * len(c) - 2 for c in cs] for cs in choices]

    monkeypatch.setattr(G, "choice_log_likelihoods", fake_scores)
    ex = {"question": "Pick one.", "choices": ["a", "a b c d e f g h"], "label": 1}
    res = api.evaluate_zero_shot(causal, "picker", [ex], "multiple_choice", progress=False)
    e = res["tasks"]["picker"]
    assert e["zero_shot"] and e["metrics"] == {"accuracy": 0.0, "accuracy_norm": 100.0}


@pytest.fixture(scope="module")
def t5(assets):
    from megamt.data.tokenize import load_tokenizer, special_ids
    from megamt.model import MultitaskModel

    out, raw = assets
    ids = special_ids(load_tokenizer(out / "tok"))
    c = json.loads(json.dumps(raw))
    c["tasks"] = {k: v for k, v in c["tasks"].items() if k in ("arc", "piqa")}
    c["model"] = {"from_config": {
        "model_type": "t5", "vocab_size": vocab(assets), "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
        "num_heads": 4, "relative_attention_num_buckets": 8, "dropout_rate": 0.0,
        "decoder_start_token_id": ids["pad"], "pad_token_id": ids["pad"], "eos_token_id": ids["eos"]}}
    torch.manual_seed(0)
    return MultitaskModel(config_from_dict(c))


def test_encoder_decoder_learns_the_gold_choice_and_ranks_the_choices(assets, t5, tmp_path, monkeypatch):
    """T5: a multiple-choice example trains as text to text (decoder target = the gold
    choice's text, from the shard as the trainer reads it) and is evaluated by the decoder's
    scores of every choice (the scorer itself is held to per-choice forwards in
    test_seq2seq_eval.py): both scores reported, nothing generated."""
    from megamt.data.packing import seq2seq_item
    from megamt.data.shards import load_manifest, read_shard, split_shards
    from megamt.data.tokenize import load_tokenizer, special_ids
    import megamt.eval.generation as G

    out, _ = assets
    assert t5.family == "seq2seq"
    tok = load_tokenizer(out / "tok")
    m = load_manifest(out / "shards")
    for s, (_, choices, key) in zip(read_shard(split_shards(m, out / "shards", "arc", "train")[0][0]), ARC):
        item = seq2seq_item(s, 0, special_ids(tok)["eos"])
        target = tok.decode(item.dec.tolist(), skip_special_tokens=True)
        assert choices["ABCD".index(key)] in target, target
        assert not any(c in target for c in choices if c != choices["ABCD".index(key)]), target

    res = api.evaluate(t5, out_dir=tmp_path, progress=False)
    assert res["family"] == "seq2seq"
    for task, rows in (("arc", ARC), ("piqa", PIQA)):
        e = res["tasks"][task]
        assert set(e["metrics"]) == {"accuracy", "accuracy_norm"} and e["cut_generations"] == 0, e
        preds = [json.loads(l)["prediction"] for l in (tmp_path / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        gold = ["ABCD".index(r[2]) for r in rows] if task == "arc" else [r[3] for r in rows]
        for k, metric in (("choice", "accuracy"), ("choice_norm", "accuracy_norm")):
            assert e["metrics"][metric] == pytest.approx(100 * sum(p[k] == g for p, g in zip(preds, gold)) / len(gold))

    def fake_scores(model, prompts, choices, **kw):  # summed favours the short choice, per token the long one
        return [[-1.0 * len(c) if len(c) < 3 else -0.5 * len(c) - 2 for c in cs] for cs in choices]

    monkeypatch.setattr(G, "seq2seq_choice_log_likelihoods", fake_scores)
    ex = {"question": "Pick one.", "choices": ["a", "a b c d e f g h"], "label": 1}
    z = api.evaluate_zero_shot(t5, "picker", [ex], "multiple_choice", progress=False)["tasks"]["picker"]
    assert z["zero_shot"] and z["metrics"] == {"accuracy": 0.0, "accuracy_norm": 100.0}


def test_encoder_evaluation_of_choices_and_tags(assets, tmp_path):
    from megamt.model import MultitaskModel

    cfg = config_from_dict(encoder_raw(assets))
    torch.manual_seed(0)
    model = MultitaskModel(cfg)
    res = api.evaluate(model, out_dir=tmp_path, progress=False)
    assert set(res["tasks"]) == {"arc", "piqa", "pos", "chunk"}
    assert set(res["tasks"]["arc"]["metrics"]) == {"accuracy"}  # an encoder has no length-normalised score
    preds = [json.loads(l)["prediction"] for l in (tmp_path / "predictions" / "piqa.jsonl").read_text().splitlines()]
    assert res["tasks"]["piqa"]["metrics"]["accuracy"] == pytest.approx(
        100 * sum(p["choice"] == r[3] for p, r in zip(preds, PIQA)) / len(PIQA))
    tags = [json.loads(l)["prediction"] for l in (tmp_path / "predictions" / "pos.jsonl").read_text().splitlines()]
    gold = [e.fields["tags"] for e in read_examples("pos", cfg.tasks["pos"], "validation")]
    assert res["tasks"]["pos"]["metrics"]["token_accuracy"] == pytest.approx(M.tagging_metrics(gold, tags)["token_accuracy"])
    from megamt.heads import HeadConfigError

    with pytest.raises(HeadConfigError, match="tasks.marco: a generative_qa task has no encoder head"):
        MultitaskModel(config_from_dict(encoder_raw(assets, drop=())))
