"""Readers: the formats users have → canonical :class:`Example` records.

Formats: TSV/CSV with a header row (GLUE style; quoting off unless ``quoting: true``),
JSONL (strict JSON per line; a Python dict literal per line is accepted too, as in
DialogSum's train file, parsed with ``ast.literal_eval``, never ``eval``), SQuAD v1.1
JSON, CoNLL column files (token first, tag last; IOB1 and IOB2 accepted, normalised to
IOB2), and Hugging Face ``datasets`` (a ``save_to_disk`` folder, or local files through
``load_dataset``).

Source field names are mapped in the task config (``fields: {text: sentence}``); the
canonical fields per task type are listed in ARCHITECTURE.md (Examples).

Public entry point: :func:`read_examples` (also used by megamt.eval for raw references).
"""

from __future__ import annotations

import ast
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from megamt.data.errors import DataError, SkipCounter, bad_input

csv.field_size_limit(sys.maxsize)


@dataclass
class Example:
    """One canonical example. ``key`` names the source: ``path:line``, ``path:#index`` or the SQuAD id."""

    key: str
    task: str
    task_type: str
    fields: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- raw records


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf_disk"
    name = path.name.lower()
    for suffix, f in ((".tsv", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                      (".json", "squad"), (".conll", "conll"), (".iob", "conll"), (".bio", "conll")):
        if name.endswith(suffix):
            return f
    if name.startswith("eng.") or name.endswith((".train", ".testa", ".testb", ".dev", ".test")):
        return "conll"
    raise DataError(str(path), "unknown_format", "cannot tell the format from the file name; set "
                    "`format:` in the task's input (tsv, csv, jsonl, squad, conll, hf_disk, hf)")


def read_delimited(path: Path, delimiter: str, quoting: bool, on_error: str, skips: SkipCounter | None
                   ) -> Iterator[tuple[str, dict]]:
    """TSV/CSV with a header row. Rows whose column count differs from the header's are bad input."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
                            strict=quoting)
        header: Optional[list[str]] = None
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                bad_input(on_error, skips, f"{path}:{reader.line_num}", "malformed_row", f"cannot parse the row: {e}")
                continue
            if not row:
                continue  # a blank line is not a row
            if header is None:
                header = [h.strip() for h in row]
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) < len(header):
                bad_input(on_error, skips, where, "missing_field",
                          f"{len(row)} columns, the header has {len(header)} ({header}): field(s) "
                          f"{header[len(row):]} missing")
                continue
            if len(row) > len(header):
                bad_input(on_error, skips, where, "extra_field",
                          f"{len(row)} columns, the header has {len(header)} ({header}): extra field(s) "
                          f"{row[len(header):]!r}")
                continue
            yield where, dict(zip(header, row))


def read_jsonl(path: Path, on_error: str, skips: SkipCounter | None) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = None
                if line.startswith("{"):  # a Python dict literal per line (DialogSum train)
                    try:
                        obj = ast.literal_eval(line)
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        obj = None
                if obj is None:
                    bad_input(on_error, skips, where, "malformed_json", f"not a JSON object: {e.msg} at column {e.colno}")
                    continue
            if not isinstance(obj, dict):
                bad_input(on_error, skips, where, "malformed_json", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield where, obj


def read_squad(path: Path, on_error: str, skips: SkipCounter | None) -> Iterator[tuple[str, dict]]:
    """SQuAD v1.1 JSON: one record per question (id, title, context, question, answers)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", "malformed_json", f"not valid SQuAD JSON: {e.msg} at column {e.colno}")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(str(path), "malformed_json", "not SQuAD v1.1 JSON: expected {\"data\": [...], \"version\": ...}")
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            context = para.get("context")
            for q, qa in enumerate(para.get("qas", [])):
                qid = qa.get("id", f"{a}.{p}.{q}")
                where = f"{path}#{qid}"
                if context is None or "question" not in qa or "answers" not in qa:
                    missing = [k for k, v in (("context", context), ("question", qa.get("question")),
                                              ("answers", qa.get("answers"))) if v is None]
                    bad_input(on_error, skips, where, "missing_field", f"missing {missing}")
                    continue
                yield where, {"id": qid, "title": article.get("title", ""), "context": context,
                              "question": qa["question"], "answers": qa["answers"]}


def read_conll(path: Path, on_error: str, skips: SkipCounter | None) -> Iterator[tuple[str, dict]]:
    """CoNLL columns (token first, tag last), blank line between sentences, -DOCSTART- skipped.

    The column count is fixed by the file's first token line; a line with another count is
    bad input and its whole sentence is dropped (under skip).
    """
    ncols: Optional[int] = None
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    bad = False

    def flush():
        nonlocal tokens, tags, bad
        out = None
        if tokens and not bad:
            out = (f"{path}:{start}", {"tokens": tokens, "tags": tags})
        tokens, tags, bad = [], [], False
        return out

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                rec = flush()
                if rec:
                    yield rec
                continue
            if cols[0] == "-DOCSTART-":
                rec = flush()
                if rec:
                    yield rec
                continue
            if ncols is None:
                ncols = len(cols)
                if ncols < 2:
                    raise DataError(f"{path}:{lineno}", "bad_columns",
                                    "a CoNLL line needs at least 2 columns (token ... tag)")
            if not tokens:
                start = lineno
            if len(cols) != ncols:
                if not bad:
                    bad_input(on_error, skips, f"{path}:{lineno}", "bad_columns",
                              f"{len(cols)} columns, the file's first line has {ncols}: {line.rstrip()!r}")
                bad = True
                tokens.append(cols[0])
                continue
            tokens.append(cols[0])
            tags.append(cols[-1])
        rec = flush()
        if rec:
            yield rec


def _hf_records(path: str, inp, on_error, skips) -> Iterator[tuple[str, dict]]:
    import datasets

    if inp.format == "hf_disk":
        ds = datasets.load_from_disk(path)
    else:
        kind = inp.hf_name
        p = Path(path)
        if kind is None and p.exists() and p.is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                    ".txt": "text"}.get(p.suffix.lower())
        if kind is not None and p.exists():
            kw = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(kind, data_files=str(p), split=inp.hf_split or "train", **kw)
        else:  # a hub name (needs a network)
            ds = datasets.load_dataset(path, inp.hf_name, split=inp.hf_split or "train")
    if isinstance(ds, datasets.DatasetDict):
        split = inp.hf_split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise DataError(path, "missing_field", f"no split {split!r} in the dataset (has {list(ds)}); set hf_split")
        ds = ds[split]
    # ClassLabel ints → names, so labels / tags are strings like every other format.
    names: dict[str, list[str]] = {}
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.ClassLabel):
            names[col] = feat.names
        elif isinstance(feat, (datasets.Sequence, getattr(datasets, "List", datasets.Sequence))) and isinstance(getattr(feat, "feature", None), datasets.ClassLabel):
            names[col] = feat.feature.names
    for i, row in enumerate(ds):
        for col, nm in names.items():
            v = row.get(col)
            if isinstance(v, list):
                row[col] = [nm[x] if isinstance(x, int) and 0 <= x < len(nm) else x for x in v]
            elif isinstance(v, int) and 0 <= v < len(nm):
                row[col] = nm[v]
        yield f"{path}:#{i}", row


def read_records(inp, on_error: str = "raise", skips: SkipCounter | None = None) -> Iterator[tuple[str, dict]]:
    """Raw records ``(where, row)`` of one input (an :class:`~megamt.config.InputConfig`)."""
    path = Path(inp.path)
    fmt = inp.format
    if fmt == "hf":
        yield from _hf_records(inp.path, inp, on_error, skips)
        return
    if not path.exists():
        raise DataError(str(path), "missing_file", "input not found (paths in a spec are relative to the spec file)")
    fmt = _detect_format(path, fmt)
    if fmt == "hf_disk":
        yield from _hf_records(str(path), inp, on_error, skips)
    elif fmt in ("tsv", "csv"):
        yield from read_delimited(path, "\t" if fmt == "tsv" else ",", inp.quoting, on_error, skips)
    elif fmt == "jsonl":
        yield from read_jsonl(path, on_error, skips)
    elif fmt == "squad":
        yield from read_squad(path, on_error, skips)
    elif fmt == "conll":
        yield from read_conll(path, on_error, skips)
    else:
        raise DataError(str(path), "unknown_format", f"unknown format {fmt!r}")


# --------------------------------------------------------------------------- tags


def normalize_iob2(tags: list[str], where: str) -> list[str]:
    """IOB1 or IOB2 → IOB2: an ``I-X`` that starts an entity becomes ``B-X``.

    Raises DataError (reason bad_tag) on a tag that is not ``O``, ``B-X`` or ``I-X``.
    """
    out = []
    prev = "O"
    for i, t in enumerate(tags):
        if t != "O" and (len(t) < 3 or t[1] != "-" or t[0] not in "BI"):
            raise DataError(where, "bad_tag", f"tag {t!r} of token {i} is not O, B-TYPE or I-TYPE")
        if t.startswith("I-") and (prev == "O" or prev[2:] != t[2:]):
            t = "B-" + t[2:]
        out.append(t)
        prev = t
    return out


def tag_set(entity_types: Iterable[str]) -> list[str]:
    """The IOB2 tag list for entity types: ``["O", "B-LOC", "I-LOC", ...]`` (types sorted)."""
    out = ["O"]
    for t in sorted(set(entity_types)):
        out += [f"B-{t}", f"I-{t}"]
    return out


def ner_tags_from_labels(labels: list[str]) -> list[str]:
    """``labels`` of a NER task may be entity types (PER, LOC) or a full tag set (O, B-PER, ...)."""
    if any(l == "O" or l[:2] in ("B-", "I-") for l in labels):
        return tag_set(l[2:] for l in labels if l != "O")
    return tag_set(labels)


# --------------------------------------------------------------------------- canonical examples

REQUIRED = {
    "classification": ("text", "label"),
    "extractive_qa": ("context", "question", "answers"),
    "ner": ("tokens", "tags"),
    "summarization": ("document", "summary"),
    "instruction": ("prompt", "response"),
}
OPTIONAL = {"classification": ("text_pair",)}


def _get(row: dict, name: str):
    """A field by name; dotted names reach into nested mappings (``answers.text``)."""
    if name in row:
        return row[name]
    cur: Any = row
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _answers(value) -> Optional[list[dict]]:
    """SQuAD list of {text, answer_start} or HF's {text: [...], answer_start: [...]}."""
    if isinstance(value, dict) and "text" in value:
        texts, starts = value.get("text") or [], value.get("answer_start") or []
        if isinstance(texts, str):
            texts, starts = [texts], [starts]
        return [{"text": t, "answer_start": int(s)} for t, s in zip(texts, starts)]
    if isinstance(value, list) and all(isinstance(a, dict) for a in value):
        return [{"text": a.get("text"), "answer_start": int(a.get("answer_start", -1))} for a in value]
    return None


def canonical(where: str, row: dict, task: str, task_cfg, labels: Optional[list[str]], on_error: str,
              skips: SkipCounter | None) -> Optional[Example]:
    """Map one raw record to an :class:`Example` (None when skipped)."""
    ttype = task_cfg.task_type
    fields = {}
    for name in REQUIRED[ttype] + OPTIONAL.get(ttype, ()):
        src = task_cfg.fields.get(name, name)
        value = _get(row, src)
        if value is None:
            if name in OPTIONAL.get(ttype, ()):
                if name in task_cfg.fields:
                    bad_input(on_error, skips, where, "missing_field",
                              f"field {src!r} (mapped to {name}) is missing; the row has {sorted(row)}")
                    return None
                continue
            bad_input(on_error, skips, where, "missing_field",
                      f"field {src!r} (canonical {name!r}) is missing; the row has {sorted(row)}. "
                      f"Map it in the task's `fields:`")
            return None
        fields[name] = value
    key = str(row["id"]) if ttype == "extractive_qa" and "id" in row else where
    for name in ("text", "text_pair", "context", "question", "document", "summary", "prompt", "response"):
        if name in fields:
            if not isinstance(fields[name], str):
                fields[name] = str(fields[name])
            fields[name] = fields[name].strip()
            if not fields[name]:
                bad_input(on_error, skips, where, "empty_field", f"field {name!r} is empty")
                return None
    if ttype == "classification":
        lab = fields["label"]
        fields["label"] = str(lab).strip()
        if labels is not None and fields["label"] not in labels:
            bad_input(on_error, skips, where, "unknown_label",
                      f"label {fields['label']!r} is not in the task's label set {labels}")
            return None
    elif ttype == "extractive_qa":
        answers = _answers(fields["answers"])
        if not answers:
            bad_input(on_error, skips, where, "missing_field", "no answers (expected a list of {text, answer_start})")
            return None
        ctx = fields["context"]
        # Offsets refer to the raw context; strip() above may have shifted them.
        raw_ctx = str(_get(row, task_cfg.fields.get("context", "context")))
        shift = len(raw_ctx) - len(raw_ctx.lstrip())
        for a in answers:
            a["answer_start"] -= shift
            s, t = a["answer_start"], a["text"]
            if not isinstance(t, str) or not t or s < 0 or ctx[s:s + len(t)] != t:
                bad_input(on_error, skips, where, "answer_mismatch",
                          f"answer {t!r} is not found at answer_start={s + shift} in the context "
                          f"(context there reads {ctx[max(s, 0):max(s, 0) + len(t or '')]!r})")
                return None
        fields["answers"] = answers
    elif ttype == "ner":
        toks, tags = fields["tokens"], fields["tags"]
        if isinstance(toks, str):
            toks = toks.split()
        if isinstance(tags, str):
            tags = tags.split()
        toks, tags = [str(t) for t in toks], [str(t) for t in tags]
        if not toks:
            bad_input(on_error, skips, where, "empty_field", "a sentence without tokens")
            return None
        if len(toks) != len(tags):
            bad_input(on_error, skips, where, "bad_columns", f"{len(toks)} tokens but {len(tags)} tags")
            return None
        try:
            tags = normalize_iob2(tags, where)
        except DataError as e:
            bad_input(on_error, skips, where, "bad_tag", str(e).split(": ", 1)[-1])
            return None
        if labels is not None:
            bad = [t for t in tags if t not in labels]
            if bad:
                bad_input(on_error, skips, where, "unknown_label",
                          f"tag {bad[0]!r} is not in the task's tag set {labels}")
                return None
        fields["tokens"], fields["tags"] = toks, tags
    return Example(key=key, task=task, task_type=ttype, fields=fields)


def resolve_labels(task_name: str, task_cfg, on_error: str = "raise") -> Optional[list[str]]:
    """The label list of a task: class names (classification) or IOB2 tags (ner); None otherwise.

    From ``task_cfg.labels`` when set; else inferred (sorted) from the train split, or the
    first split when there is no train split. Class id / tag id = index in this list.
    """
    ttype = task_cfg.task_type
    if ttype not in ("classification", "ner"):
        return None
    if task_cfg.labels:
        return list(task_cfg.labels) if ttype == "classification" else ner_tags_from_labels(task_cfg.labels)
    if not task_cfg.inputs:
        return None
    split = "train" if "train" in task_cfg.inputs else next(iter(task_cfg.inputs))
    seen: set[str] = set()
    for ex in read_examples(task_name, task_cfg, split, on_error="skip", skips=SkipCounter(), labels=None):
        if ttype == "classification":
            seen.add(ex.fields["label"])
        else:
            seen.update(t[2:] for t in ex.fields["tags"] if t != "O")
    return sorted(seen) if ttype == "classification" else tag_set(seen)


def read_examples(task_name: str, task_cfg, split: str, on_error: str = "raise",
                  skips: SkipCounter | None = None, labels: Optional[list[str]] = None,
                  check_labels: bool = True) -> Iterator[Example]:
    """Canonical examples of one split of one task, in file order.

    ``labels``: the label list to check against (default: :func:`resolve_labels` when
    ``task_cfg.labels`` is set; an inferred set is not re-checked). Bad rows raise
    :class:`DataError` naming file and line, or are counted in ``skips`` (on_error="skip").
    An input without any record is bad input too (reason empty_input).
    """
    if split not in task_cfg.inputs:
        raise DataError(f"tasks.{task_name}.inputs", "missing_split",
                        f"no input for split {split!r} (has {sorted(task_cfg.inputs)})")
    inp = task_cfg.inputs[split]
    if labels is None and check_labels and task_cfg.labels:
        labels = resolve_labels(task_name, task_cfg)
    n_records = 0
    n_yield = 0
    for where, row in read_records(inp, on_error, skips):
        n_records += 1
        ex = canonical(where, row, task_name, task_cfg, labels, on_error, skips)
        if ex is None:
            continue
        yield ex
        n_yield += 1
        if inp.max_examples is not None and n_yield >= inp.max_examples:
            return
    if n_records == 0 and (skips is None or skips.total() == 0 or on_error == "raise"):
        bad_input(on_error, skips, str(inp.path), "empty_input",
                  f"no examples in this input (task {task_name!r}, split {split!r})")
