"""Metrics against values computed by hand (the arithmetic is in each comment)."""

import pytest

from megamt.eval import metrics as M


def test_classification_accuracy_and_macro_f1():
    # gold a a b b, pred a b b b -> 3/4 right.
    # class a: P = 1/1, R = 1/2 -> F1 = 2/3; class b: P = 2/3, R = 2/2 -> F1 = 0.8.
    out = M.classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert out["accuracy"] == pytest.approx(75.0)
    assert out["macro_f1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)


def test_squad_normalisation_and_max_over_gold():
    assert M.normalize_answer("  The  Denver Broncos!! ") == "denver broncos"
    assert M.normalize_answer("an apple, a pear") == "apple pear"
    # "Broncos of Denver" vs "Denver Broncos": 2 common tokens, P = 2/3, R = 2/2 -> F1 = 0.8;
    # vs "Broncos": P = 1/3, R = 1 -> 0.5; the max over gold answers is 0.8.
    out = M.squad_metrics([["Denver Broncos", "Broncos"], ["the Panthers"]],
                          ["Broncos of Denver", "Panthers."])
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (0.8 + 1.0) / 2)


def test_seqeval_entity_f1():
    # gold entities: PER[0:2], LOC[3], ORG[0] of sentence 2 -> 3; predicted: PER[0:2], ORG[3], ORG[0]
    # -> 2 of 3 right each way: P = R = F1 = 2/3.
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    out = M.ner_metrics(gold, pred)
    for k in ("entity_f1", "entity_precision", "entity_recall"):
        assert out[k] == pytest.approx(200 / 3)


def test_rouge_scores():
    # ref "the cat sat on the mat", pred "the cat lay on the mat": 5 of 6 unigrams shared
    # (R1 = 5/6); bigrams the-cat, on-the, the-mat of 5 (R2 = 3/5); LCS "the cat on the mat" (RL = 5/6).
    out = M.rouge_metrics(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert out["rouge1"] == pytest.approx(100 * 5 / 6)
    assert out["rouge2"] == pytest.approx(60.0)
    assert out["rougeL"] == pytest.approx(100 * 5 / 6)
    # several references: the best one counts
    multi = M.rouge_metrics([["a dog barked", "the cat lay on the mat"]], ["the cat lay on the mat"])
    assert multi["rouge1"] == pytest.approx(100.0)


def test_tagged_span_format_round_trip():
    tokens = ["John", "Smith", "visited", "Paris", "and", "Paris", "Hilton"]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-PER", "I-PER"]
    text = M.format_entities(tokens, tags)
    assert text == "PER: John Smith; LOC: Paris; PER: Paris Hilton"
    assert M.parse_entities(text, tokens) == tags
    assert M.format_entities(["a"], ["O"]) == "none"
    assert M.parse_entities("none", ["a", "b"]) == ["O", "O"]
    # garbage, unknown types and words not in the sentence are dropped, never an error
    assert M.parse_entities("PER: Nobody; FOO: Paris; :; LOC Paris; LOC: Paris", tokens,
                            entity_types=["PER", "LOC"]) == ["O", "O", "O", "B-LOC", "O", "O", "O"]


def test_iob1_to_iob2():
    assert M.iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]


def test_compute_metrics_selects_and_rejects():
    out = M.compute_metrics("classification", ["x", "y"], ["x", "x"], metrics=["accuracy"])
    assert out == {"accuracy": pytest.approx(50.0)}
    with pytest.raises(M.MetricError, match="unknown metric 'bleu'"):
        M.compute_metrics("classification", ["x"], ["x"], metrics=["bleu"])
    with pytest.raises(M.MetricError, match="empty eval split"):
        M.compute_metrics("ner", [], [])
    assert M.primary_metric("extractive_qa") == "f1"


REAL = __import__("pathlib").Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.mark.skipif(not (REAL / "conll2003" / "eng.testa").is_file(), reason="real data samples absent")
def test_tagged_span_round_trip_on_real_conll():
    """Gold tags -> tagged-span text -> parsed tags scores 100 on real CoNLL sentences
    (entities repeated in a sentence, adjacent entities, IOB1 input)."""
    from megamt.config import InputConfig, TaskConfig
    from megamt.data.formats import read_examples

    task = TaskConfig(task_type="ner", inputs={"validation": InputConfig(path=str(REAL / "conll2003" / "eng.testa"),
                                                                          format="conll")})
    exs = list(read_examples("conll", task, "validation"))[:300]
    gold = [e.fields["tags"] for e in exs]
    pred = [M.parse_entities(M.format_entities(e.fields["tokens"], e.fields["tags"]), e.fields["tokens"]) for e in exs]
    assert M.ner_metrics(gold, pred)["entity_f1"] == pytest.approx(100.0)
    # dropping every prediction: recall 0
    assert M.ner_metrics(gold, [["O"] * len(g) for g in gold])["entity_recall"] == 0.0
