"""Readers and templates: every format round-trips (generated files and the real samples),
IOB1/IOB2 normalisation, field mapping, and each kind of bad input (raise names file+line,
skip counts the reason)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megamt.config import InputConfig, TaskConfig
from megamt.data.errors import DataError, SkipCounter
from megamt.data.formats import normalize_iob2, read_examples, resolve_labels
from megamt.data.templates import ner_target, parse_ner_target, register_template, render, resolve_templates

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def task(ttype, path, fmt="auto", fields=None, labels=None, **inp):
    return TaskConfig(task_type=ttype, inputs={"train": InputConfig(path=str(path), format=fmt, **inp)},
                      fields=fields or {}, labels=labels)


def read(t, on_error="raise", skips=None):
    return list(read_examples("t", t, "train", on_error=on_error, skips=skips))


# --------------------------------------------------------------------------- generated files


def test_tsv_quoting_off_keeps_bare_quotes(tmp_path):
    p = tmp_path / "rte.tsv"
    p.write_text('index\tsentence1\tsentence2\tlabel\n0\tHe said "hi.\tA "quote\tentailment\n'
                 '1\tx\ty\tnot_entailment\n', encoding="utf-8")
    ex = read(task("classification", p, fields={"text": "sentence1", "text_pair": "sentence2"}))
    assert [e.fields for e in ex] == [
        {"text": 'He said "hi.', "text_pair": 'A "quote', "label": "entailment"},
        {"text": "x", "text_pair": "y", "label": "not_entailment"}]
    assert ex[0].key == f"{p}:2"


def test_csv_with_quoting_and_jsonl_dict_literals(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('premise,hypothesis,label\n"a, b",c,yes\n', encoding="utf-8")
    ex = read(task("classification", p, fields={"text": "premise", "text_pair": "hypothesis"}, quoting=True))
    assert ex[0].fields == {"text": "a, b", "text_pair": "c", "label": "yes"}
    q = tmp_path / "d.jsonl"
    q.write_text('{"dialogue": "x y", "summary": "x"}\n\n' "{'dialogue': 'it\\'s', 'summary': 's'}\n", encoding="utf-8")
    ex = read(task("summarization", q, fields={"document": "dialogue"}))
    assert [e.fields for e in ex] == [{"document": "x y", "summary": "x"}, {"document": "it's", "summary": "s"}]
    assert ex[1].key == f"{q}:3"


def test_squad_and_conll_iob1_normalised(tmp_path):
    ctx = "Alice lives in Paris ."
    doc = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "q1", "question": "where?", "answers": [{"text": "Paris", "answer_start": 15}]}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    ex = read(task("extractive_qa", tmp_path / "s.json", "squad"))
    assert ex[0].key == "q1" and ex[0].fields["answers"] == [{"text": "Paris", "answer_start": 15}]
    (tmp_path / "c.conll").write_text("-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n"
                                      "German JJ I-NP I-MISC\nBritish JJ I-NP B-MISC\n\nPeter NNP I-NP B-PER\n"
                                      "Blackburn NNP I-NP I-PER\n")
    ex = read(task("ner", tmp_path / "c.conll"))
    assert ex[0].fields["tags"] == ["B-ORG", "O", "B-MISC", "B-MISC"]
    assert ex[1].fields == {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}
    assert normalize_iob2(["I-PER", "I-PER", "I-LOC", "O", "I-LOC"], "x") == ["B-PER", "I-PER", "B-LOC", "O", "B-LOC"]


def test_hf_save_to_disk_and_load_dataset(tmp_path):
    import datasets

    rows = {"sentence": ["good film", "bad film"], "label": [1, 0]}
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(tmp_path / "hf"))
    ex = read(task("classification", tmp_path / "hf", "hf_disk", fields={"text": "sentence"}))
    assert [(e.fields["text"], e.fields["label"]) for e in ex] == [("good film", "positive"), ("bad film", "negative")]
    ner = datasets.Dataset.from_dict(
        {"words": [["Ann", "in", "Rome"]], "ner_tags": [[1, 0, 2]]},
        features=datasets.Features({"words": datasets.Sequence(datasets.Value("string")),
                                    "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "I-PER", "I-LOC"]))}))
    ner.save_to_disk(str(tmp_path / "ner"))
    ex = read(task("ner", tmp_path / "ner", "hf_disk", fields={"tokens": "words", "tags": "ner_tags"}))
    assert ex[0].fields == {"tokens": ["Ann", "in", "Rome"], "tags": ["B-PER", "O", "B-LOC"]}
    (tmp_path / "x.jsonl").write_text('{"q": "a b", "r": "b a"}\n')
    ex = read(task("instruction", tmp_path / "x.jsonl", "hf", fields={"prompt": "q", "response": "r"}))
    assert ex[0].fields == {"prompt": "a b", "response": "b a"} and ex[0].key.endswith(":#0")


def test_templates_seeded_inline_and_registered():
    from megamt.data.formats import Example

    ex = Example("k", "t", "classification", {"text": "fine", "label": "1"})
    tc = TaskConfig(task_type="classification", labels=["0", "1"], verbalizers={"0": "bad", "1": "good"})
    outs = {render(ex, tc, random.Random(s))[2] for s in range(40)}
    assert outs == {"cls_question", "cls_classify", "cls_plain"}  # single text: no pair templates
    assert render(ex, tc, random.Random(3)) == render(ex, tc, random.Random(3))
    p, t, _ = render(ex, tc, random.Random(0))
    assert t == "good" and "fine" in p and "bad, good" in p
    register_template("classification", "test_mine", "Is '{text}' good? ||| x", "{answer}!")
    tc2 = TaskConfig(task_type="classification", templates=["test_mine", "R: {text} ||| [{answer}]"],
                     instruction="Be brief.")
    names = [t.name for t in resolve_templates(tc2)]
    assert names == ["test_mine", "inline1"]
    got = {render(ex, tc2, random.Random(s))[:2] for s in range(20)}
    assert got == {("Be brief.\nIs 'fine' good? ||| x", "1!"), ("Be brief.\nR: fine\n", "[1]")}
    tags = ["B-PER", "I-PER", "O", "B-LOC"]
    target = ner_target(["Ann", "Lee", "in", "Rome"], tags)
    assert target == "PER: Ann Lee; LOC: Rome" and parse_ner_target(target) == [("PER", "Ann Lee"), ("LOC", "Rome")]
    assert ner_target(["a"], ["O"]) == "none" and parse_ner_target("none") == []


# --------------------------------------------------------------------------- real samples


def _real(rel):
    p = REAL / rel
    if not p.exists():
        pytest.skip(f"real sample {p} absent")
    return p


@pytest.mark.parametrize("rel,ttype,fmt,fields,n_expected", [
    ("sst2/dev.tsv", "classification", "tsv", {"text": "sentence"}, 872),
    ("rte/dev.tsv", "classification", "tsv", {"text": "sentence1", "text_pair": "sentence2"}, 277),
    ("squad_v1.1/dev-v1.1.json", "extractive_qa", "squad", {}, 1057),
    ("conll2003/eng.testb", "ner", "conll", {}, 999),
    ("dialogsum/dialogsum.dev.jsonl", "summarization", "jsonl", {"document": "dialogue"}, 500),
    ("dialogsum/dialogsum.train.jsonl", "summarization", "jsonl", {"document": "dialogue"}, 5000),
])
def test_real_samples_read_completely(rel, ttype, fmt, fields, n_expected):
    t = task(ttype, _real(rel), fmt, fields)
    skips = SkipCounter()
    ex = read(t, "skip", skips)
    assert len(ex) == n_expected and skips.total() == 0, skips.examples
    if ttype == "extractive_qa":
        assert sum(len(e.fields["answers"]) for e in ex) == 3172
    if ttype == "ner":
        assert sum(len(e.fields["tokens"]) for e in ex) == 12137
        assert all(not t.startswith("I-") or i and e.fields["tags"][i - 1][2:] == t[2:]
                   for e in ex for i, t in enumerate(e.fields["tags"]))
        assert resolve_labels("t", t) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


# --------------------------------------------------------------------------- bad input


BAD = {
    "malformed_row": ("a.csv", 'text,label\n"ok",1\n"bro"ken,1\n', "classification", {"quoting": True}, 3),
    "malformed_json": ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label"\n', "classification", {}, 2),
    "missing_field": ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', "classification", {}, 2),
    "extra_field": ("a.tsv", "text\tlabel\na\tx\nb\tx\textra\n", "classification", {}, 3),
    "unknown_label": ("a.tsv", "text\tlabel\na\tx\nb\tz\n", "classification", {"labels": ["x", "y"]}, 3),
    "answer_mismatch": ("a.json", json.dumps({"data": [{"paragraphs": [{"context": "Alice lives in Paris .", "qas": [
        {"id": "ok", "question": "q", "answers": [{"text": "Paris", "answer_start": 15}]},
        {"id": "bad7", "question": "q", "answers": [{"text": "Paris", "answer_start": 3}]}]}]}]}),
        "extractive_qa", {}, "bad7"),
    "bad_columns": ("a.conll", "EU NNP I-NP I-ORG\n\nPeter NNP I-NP I-PER\nx NNP\n", "ner", {}, 4),
    "empty_input": ("a.jsonl", "\n", "summarization", {}, None),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_input_raises_naming_file_and_line_or_is_counted(tmp_path, reason):
    name, text, ttype, extra, line = BAD[reason]
    extra = dict(extra)
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    labels = extra.pop("labels", None) if "labels" in extra else None
    t = task(ttype, p, labels=labels, **extra)
    with pytest.raises(DataError) as e:
        read(t)
    msg = str(e.value)
    assert e.value.reason == reason and str(p) in msg, msg
    if line is not None:
        assert (f":{line}" if isinstance(line, int) else line) in msg, msg
    skips = SkipCounter()
    good = read(t, "skip", skips)
    assert skips.as_dict() == {reason: 1}
    assert len(good) == (0 if reason == "empty_input" else 1)


# --------------------------------------------------------------------------- the files people have


def test_headerless_news_csv_named_columns_joined_text_quoted_commas(tmp_path):
    """AG News ships headerless: label, title, description, with quoted commas in the text.
    `columns` names them; `fields.text: [title, description]` joins two columns; quoting is on
    by default for .csv (today's reader took the first row as a header and split at commas)."""
    p = tmp_path / "news.csv"
    p.write_text('3,"Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, Wall Street\'s '
                 'dwindling band of ultra-cynics, are seeing green again."\n'
                 '4,"Google, Yahoo agree",""" A quote "" inside, too."\n', encoding="utf-8")
    t = task("classification", p, fields={"text": ["title", "description"]}, columns=["label", "title", "description"])
    ex = read(t)
    assert [e.fields["label"] for e in ex] == ["3", "4"]
    assert ex[0].fields["text"] == ("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, "
                                    "Wall Street's dwindling band of ultra-cynics, are seeing green again.")
    assert ex[1].fields["text"] == 'Google, Yahoo agree " A quote " inside, too.'
    assert ex[0].key == f"{p}:1" and ex[1].key == f"{p}:2"
    assert resolve_labels("t", t) == ["3", "4"]
    # a missing column names what the row has and how to name the columns
    t = task("classification", p, fields={"text": ["title", "summary"]}, columns=["label", "title", "description"])
    with pytest.raises(DataError, match=r"\['summary'\].*missing.*columns"):
        read(t)


def test_headerless_without_columns_says_how_to_name_them(tmp_path):
    p = tmp_path / "news.csv"
    p.write_text('3,"a, b",c\n4,d,e\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read(task("classification", p))
    assert "columns: [...]" in str(e.value) and "missing" in str(e.value)


def test_tsv_with_bom_and_crlf_glue_style(tmp_path):
    """A paraphrase TSV saved on Windows: UTF-8 byte-order mark, CRLF, bare quotes (quoting off for tsv)."""
    p = tmp_path / "mrpc.tsv"
    p.write_bytes("\ufeffQuality\t#1 String\t#2 String\r\n1\tHe said \"yes.\tHe agreed.\r\n0\tA\tB\r\n"
                  .encode("utf-8"))
    t = task("classification", p, fields={"label": "Quality", "text": "#1 String", "text_pair": "#2 String"})
    ex = read(t)
    assert [e.fields for e in ex] == [{"text": 'He said "yes.', "text_pair": "He agreed.", "label": "1"},
                                      {"text": "A", "text_pair": "B", "label": "0"}]
    # headerless with a BOM: the first value loses it too
    q = tmp_path / "nohead.tsv"
    q.write_bytes("\ufeff1\tx y\r\n0\tz\r\n".encode("utf-8"))
    ex = read(task("classification", q, columns=["label", "text"]))
    assert [e.fields["label"] for e in ex] == ["1", "0"] and ex[0].fields["text"] == "x y"


def test_quoting_defaults_and_override(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('text,label\n"a, b",x\n', encoding="utf-8")
    assert read(task("classification", p))[0].fields["text"] == "a, b"  # csv: on by default
    with pytest.raises(DataError) as e:  # explicitly off: the quoted comma splits the row
        read(task("classification", p, quoting=False))
    assert e.value.reason == "extra_field"


def test_input_keys_are_checked():
    from megamt.config import ConfigError, config_from_dict

    bad = {"tasks": {"t": {"inputs": {"train": {"path": "x.jsonl", "format": "jsonl", "columns": ["a", "a"]}},
                           "fields": {"label": ["a", "b"]}}}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad)
    msg = str(e.value)
    assert "tasks.t.inputs.train.columns: a column is named twice" in msg
    assert "tasks.t.inputs.train.columns: only for tsv/csv" in msg
    assert "tasks.t.fields.label: a list of source fields" in msg


@pytest.mark.skipif(not (REAL / "sst2").is_dir(), reason="no ../shared/data")
def test_real_sst2_rows_as_headerless_csv(tmp_path):
    """The SST-2 sample rewritten as a headerless, quoted CSV (as users export from pandas)
    reads back to the same examples as the GLUE TSV."""
    import csv

    src = REAL / "sst2" / "dev.tsv"
    rows = [line.rstrip("\n").split("\t") for line in src.read_text(encoding="utf-8").splitlines(True)[1:]]
    p = tmp_path / "dev.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\r\n").writerows([[lab, text] for text, lab in rows])
    from_csv = read(task("classification", p, columns=["label", "text"]))
    from_tsv = read(task("classification", src, fields={"text": "sentence"}))
    assert len(from_csv) == len(from_tsv) == 872
    assert [e.fields for e in from_csv] == [e.fields for e in from_tsv]
