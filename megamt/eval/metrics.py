"""Per-task metrics, from the field's libraries where one exists.

Every metric returns a number on the 0-100 scale (as the GLUE/SQuAD papers report them):

- classification: ``accuracy``, ``macro_f1`` (scikit-learn ``f1_score(average="macro")``
  over the labels seen in gold or prediction);
- extractive QA: ``exact_match``, ``f1`` with the official SQuAD v1.1 normalisation
  (lower case, strip punctuation, drop the articles a/an/the, squeeze white space) and the
  maximum over the gold answers of each question;
- NER: ``entity_f1`` / ``entity_precision`` / ``entity_recall`` from ``seqeval``
  (entity level, IOB2 tags, conlleval rules);
- summarization: ``rouge1`` / ``rouge2`` / ``rougeL`` F-measure from ``rouge-score`` (Porter
  stemming on, maximum over references);
- multiple choice: ``accuracy`` (causal LMs: the choice with the highest summed
  log-likelihood; encoders: the head's best choice) and, for causal LMs, ``accuracy_norm``
  (the highest log-likelihood per choice token, which does not favour short choices);
- tagging: ``token_accuracy`` (every word's tag); for IOB tags (chunking) also
  ``chunk_f1`` / ``chunk_precision`` / ``chunk_recall`` from ``seqeval``, the primary metric;
- generative QA: SQuAD-normalised ``f1`` / ``exact_match`` and ``rougeL`` (maximum over the
  gold answers).

It also holds the tagged-span text format that causal LMs produce for NER
(``"PER: John Smith; LOC: Paris"``) and its parser back to IOB2 tags over the words.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Callable, Sequence

# task type -> metric names it supports; the first one is the task's primary metric
# (the one the transfer report compares).
METRICS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "extractive_qa": ("f1", "exact_match"),
    "ner": ("entity_f1", "entity_precision", "entity_recall"),
    "summarization": ("rougeL", "rouge1", "rouge2"),
    "instruction": ("rougeL", "rouge1", "rouge2"),
    "multiple_choice": ("accuracy", "accuracy_norm"),
    # chunk F1 first: the primary metric of IOB (chunk) tags; plain tags (POS) have token accuracy only
    "tagging": ("chunk_f1", "token_accuracy", "chunk_precision", "chunk_recall"),
    "generative_qa": ("f1", "exact_match", "rougeL"),
}


class MetricError(ValueError):
    """A metric that cannot be computed on the given inputs; the message says why."""


def primary_metric(task_type: str, metrics: dict | None = None) -> str:
    """The first metric of the type's list (among ``metrics`` when given: a tagging task with
    plain tags has token_accuracy, not chunk_f1)."""
    names = METRICS_BY_TYPE[task_type]
    if metrics:
        return next((m for m in names if m in metrics), names[0])
    return names[0]


def check_metrics(task: str, task_type: str, metrics: Sequence[str]) -> list[str]:
    """Problems (one line each) with the metric names requested for a task."""
    known = METRICS_BY_TYPE.get(task_type)
    if known is None:
        return [f"{task}: task type {task_type!r} has no metrics (known types: {sorted(METRICS_BY_TYPE)})"]
    return [f"{task}: unknown metric {m!r} for a {task_type} task; choose from {list(known)}"
            for m in metrics if m not in known]


# --------------------------------------------------------------------------- classification


def classification_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (over the union of gold and predicted labels), 0-100."""
    from sklearn.metrics import f1_score

    _same_length(gold, pred)
    acc = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    labels = sorted(set(gold) | set(pred))
    f1 = f1_score(list(gold), list(pred), labels=labels, average="macro", zero_division=0)
    return {"accuracy": 100.0 * acc, "macro_f1": 100.0 * float(f1)}


# --------------------------------------------------------------------------- SQuAD


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation: lower, no punctuation, no articles, one space."""
    s = s.lower()
    exclude = set(string.punctuation)
    s = "".join(ch for ch in s if ch not in exclude)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _max_over_gold(fn: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    return max(fn(prediction, g) for g in golds)


def squad_metrics(gold_answers: Sequence[Sequence[str]], pred: Sequence[str]) -> dict[str, float]:
    """Exact match and F1 (0-100), each the maximum over the question's gold answers."""
    _same_length(gold_answers, pred)
    em = f1 = 0.0
    for i, (golds, p) in enumerate(zip(gold_answers, pred)):
        if not golds:
            raise MetricError(f"extractive QA example {i} has no gold answer; SQuAD metrics need at least one")
        em += _max_over_gold(squad_exact_match, p, golds)
        f1 += _max_over_gold(squad_f1, p, golds)
    n = len(pred)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# --------------------------------------------------------------------------- NER


def ner_metrics(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (0-100) with seqeval over IOB2 tag sequences."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    _same_length(gold_tags, pred_tags)
    for i, (g, p) in enumerate(zip(gold_tags, pred_tags)):
        if len(g) != len(p):
            raise MetricError(f"NER example {i}: {len(g)} gold tags but {len(p)} predicted tags")
    gold, pred = [list(t) for t in gold_tags], [list(t) for t in pred_tags]
    return {
        "entity_f1": 100.0 * float(f1_score(gold, pred, zero_division=0)),
        "entity_precision": 100.0 * float(precision_score(gold, pred, zero_division=0)),
        "entity_recall": 100.0 * float(recall_score(gold, pred, zero_division=0)),
    }


def tags_to_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """IOB2 tags -> ``(type, start, end)`` word spans (end exclusive). A stray I- starts a span."""
    spans: list[tuple[str, int, int]] = []
    cur: list | None = None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-")
        if cur is not None and (prefix != "I" or typ != cur[0]):
            spans.append((cur[0], cur[1], i))
            cur = None
        if prefix in ("B", "I") and cur is None:
            cur = [typ, i]
    return spans


def format_entities(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """Words + IOB2 tags -> the tagged-span text a causal LM learns to write.

    ``["John", "Smith", "visited", "Paris"]``, ``[B-PER, I-PER, O, B-LOC]`` ->
    ``"PER: John Smith; LOC: Paris"``; no entity -> ``"none"``.
    """
    parts = [f"{typ}: {' '.join(tokens[s:e])}" for typ, s, e in tags_to_spans(tags)]
    return "; ".join(parts) if parts else "none"


def parse_entities(text: str, tokens: Sequence[str], entity_types: Sequence[str] | None = None) -> list[str]:
    """Tagged-span text -> IOB2 tags over ``tokens`` (what seqeval scores).

    Each ``TYPE: words`` part is matched to the first not-yet-tagged occurrence of those
    words in the sentence, left to right. Parts with an unknown type, words not found in
    the sentence or a malformed shape are dropped (they count as missed entities, never
    as an error: generated text is whatever the model wrote).
    """
    tags = ["O"] * len(tokens)
    text = text.strip()
    if not text or text.lower() == "none":
        return tags
    for part in text.split(";"):
        typ, sep, words = part.partition(":")
        typ, words = typ.strip(), words.split()
        if not sep or not typ or not words or " " in typ:
            continue
        if entity_types is not None and typ not in entity_types:
            continue
        n = len(words)
        for s in range(len(tokens) - n + 1):
            if list(tokens[s:s + n]) == words and all(t == "O" for t in tags[s:s + n]):
                tags[s] = f"B-{typ}"
                for k in range(s + 1, s + n):
                    tags[k] = f"I-{typ}"
                break
    return tags


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """CoNLL-2003's IOB1 (I- starts an entity unless it continues one) -> IOB2."""
    out = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


# --------------------------------------------------------------------------- new task types


def multiple_choice_metrics(gold: Sequence[int], pred: Sequence) -> dict[str, float]:
    """Accuracy (0-100). ``pred``: per example ``{"choice": i[, "choice_norm": j]}`` (or an
    int); ``accuracy_norm`` when every prediction has the length-normalised pick."""
    _same_length(gold, pred)
    picks = [p if isinstance(p, dict) else {"choice": p} for p in pred]
    out = {"accuracy": 100.0 * sum(int(p["choice"]) == int(g) for g, p in zip(gold, picks)) / len(gold)}
    if all("choice_norm" in p for p in picks):
        out["accuracy_norm"] = 100.0 * sum(int(p["choice_norm"]) == int(g) for g, p in zip(gold, picks)) / len(gold)
    return out


def tagging_metrics(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Per-token accuracy (0-100) over every word; when the gold tags are IOB (chunks), also
    seqeval's chunk-level F1 / precision / recall (predicted tags that are not O/B-X/I-X
    count as O there)."""
    from megamt.data.formats import looks_iob

    _same_length(gold_tags, pred_tags)
    for i, (g, p) in enumerate(zip(gold_tags, pred_tags)):
        if len(g) != len(p):
            raise MetricError(f"tagging example {i}: {len(g)} gold tags but {len(p)} predicted tags")
    n = sum(len(g) for g in gold_tags)
    if n == 0:
        raise MetricError("tagging: no words to score")
    out = {"token_accuracy": 100.0 * sum(a == b for g, p in zip(gold_tags, pred_tags) for a, b in zip(g, p)) / n}
    if looks_iob(t for g in gold_tags for t in g):
        clean = [[t if looks_iob([t]) else "O" for t in p] for p in pred_tags]
        chunks = ner_metrics(gold_tags, clean)
        out.update(chunk_f1=chunks["entity_f1"], chunk_precision=chunks["entity_precision"],
                   chunk_recall=chunks["entity_recall"])
    return out


def generative_qa_metrics(gold_answers: Sequence[Sequence[str]], pred: Sequence[str]) -> dict[str, float]:
    """SQuAD-normalised F1 / exact match and ROUGE-L, each the maximum over the gold answers."""
    out = squad_metrics(gold_answers, pred)
    out["rougeL"] = rouge_metrics([list(g) for g in gold_answers], pred)["rougeL"]
    return out


# --------------------------------------------------------------------------- ROUGE


def rouge_metrics(references: Sequence[str | Sequence[str]], pred: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (0-100, Porter stemmer), maximum over each example's references."""
    from rouge_score import rouge_scorer

    _same_length(references, pred)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    total = dict.fromkeys(keys, 0.0)
    for refs, p in zip(references, pred):
        refs = [refs] if isinstance(refs, str) else list(refs)
        scores = scorer.score_multi(refs, p) if len(refs) > 1 else scorer.score(refs[0], p)
        for k in keys:
            total[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(pred) for k, v in total.items()}


# --------------------------------------------------------------------------- dispatch


def compute_metrics(task_type: str, references: Sequence, predictions: Sequence,
                    metrics: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics of one task type; ``metrics`` selects a subset (unknown names raise).

    references/predictions by type: classification ``str`` labels; extractive_qa
    ``list[str]`` gold answers / ``str`` prediction; ner IOB2 tag lists; summarization and
    instruction ``str`` (or a list of reference strings) / ``str``; multiple_choice gold
    choice index / ``{"choice", "choice_norm"}``; tagging tag lists; generative_qa
    ``list[str]`` answers / ``str``.
    """
    problems = check_metrics("<task>", task_type, metrics or [])
    if problems:
        raise MetricError("; ".join(problems))
    if len(predictions) == 0:
        raise MetricError(f"no examples to score for a {task_type} task (empty eval split?)")
    fn = {
        "classification": classification_metrics,
        "extractive_qa": squad_metrics,
        "ner": ner_metrics,
        "summarization": rouge_metrics,
        "instruction": rouge_metrics,
        "multiple_choice": multiple_choice_metrics,
        "tagging": tagging_metrics,
        "generative_qa": generative_qa_metrics,
    }[task_type]
    out = fn(references, predictions)
    if metrics:
        missing = [m for m in metrics if m not in out]
        if missing:
            raise MetricError(f"{missing} cannot be computed here (available: {sorted(out)}): e.g. chunk_f1 needs "
                              f"IOB tags, accuracy_norm a causal LM")
        return {m: out[m] for m in metrics}
    return {m: out[m] for m in METRICS_BY_TYPE[task_type] if m in out}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise MetricError(f"{len(a)} references but {len(b)} predictions")
    if len(a) == 0:
        raise MetricError("no examples to score (empty eval split?)")
