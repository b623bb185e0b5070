"""Readers: the formats users have → canonical :class:`Example` records.

Formats: TSV/CSV with a header row, or headerless with the columns named in the input
(``columns: [label, title, description]``, as AG News, Yelp and DBpedia ship); CSV quoting
on by default for ``.csv`` and off for ``.tsv`` (GLUE's text holds bare quotes; the input's
``quoting:`` overrides), a UTF-8 byte-order mark dropped, CRLF line ends accepted;
JSONL (strict JSON per line; a Python dict literal per line is accepted too, as in
DialogSum's train file, parsed with ``ast.literal_eval``, never ``eval``), SQuAD v1.1
JSON, CoNLL column files (token first, tag last; IOB1 and IOB2 accepted, normalised to
IOB2), and Hugging Face ``datasets`` (a ``save_to_disk`` folder, or local files through
``load_dataset``).

Source field names are mapped in the task config (``fields: {text: sentence}``); a text
field may join several source columns with a space (``fields: {text: [title, description]}``).
The canonical fields per task type are listed in ARCHITECTURE.md (Examples).

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

from megamt.config import JOINABLE_FIELDS
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


def read_delimited(path: Path, delimiter: str, quoting: bool, on_error: str, skips: SkipCounter | None,
                   columns: Optional[list[str]] = None) -> Iterator[tuple[str, dict]]:
    """TSV/CSV rows as ``{column: value}``. The column names come from ``columns`` (a
    headerless file: every line is data) or from the first row (the header). A UTF-8
    byte-order mark is dropped; CR, LF and CRLF line ends are all accepted. Rows whose
    column count differs from the header's are bad input."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
                            strict=quoting)
        header: Optional[list[str]] = list(columns) if columns else None
        named = "the input's `columns`" if columns else "the header"
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
                          f"{len(row)} columns, {named} has {len(header)} ({header}): field(s) "
                          f"{header[len(row):]} missing")
                continue
            if len(row) > len(header):
                bad_input(on_error, skips, where, "extra_field",
                          f"{len(row)} columns, {named} has {len(header)} ({header}): extra field(s) "
                          f"{row[len(header):]!r}" + ("" if columns or quoting or delimiter != "," else
                                                      "; a comma inside unquoted text? set `quoting: true`"))
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


def read_conll(path: Path, on_error: str, skips: SkipCounter | None, tag_column: int = -1
               ) -> Iterator[tuple[str, dict]]:
    """CoNLL columns (token first, tag in ``tag_column``, default the last), blank line between
    sentences, -DOCSTART- skipped.

    The column count is fixed by the file's first token line; a line with another count is
    bad input and its whole sentence is dropped (under skip). A ``tag_column`` the file does
    not have raises (reason missing_column) at its first token line.
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
                if not (0 < tag_column < ncols or -ncols < tag_column < 0):
                    raise DataError(f"{path}:{lineno}", "missing_column",
                                    f"tag column {tag_column} does not exist: the file has {ncols} columns "
                                    f"({line.rstrip()!r}); set the input's tag_column to a column index 1..{ncols - 1} "
                                    f"(or pos / chunk / ner where the file has that column)")
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
            tags.append(cols[tag_column])
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
        quoting = (fmt == "csv") if inp.quoting is None else inp.quoting
        yield from read_delimited(path, "\t" if fmt == "tsv" else ",", quoting, on_error, skips, inp.columns)
    elif fmt == "jsonl":
        yield from read_jsonl(path, on_error, skips)
    elif fmt == "squad":
        yield from read_squad(path, on_error, skips)
    elif fmt == "conll":
        yield from read_conll(path, on_error, skips, conll_tag_column(inp))
    else:
        raise DataError(str(path), "unknown_format", f"unknown format {fmt!r}")


def conll_tag_column(inp) -> int:
    """``inputs.*.tag_column`` as a column index (names: the CoNLL-2003 layout; unset: the last)."""
    from megamt.config import TAG_COLUMNS

    col = getattr(inp, "tag_column", None)
    if col is None:
        return -1
    return TAG_COLUMNS[col] if col in TAG_COLUMNS else int(col)


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


def looks_iob(tags: Iterable[str]) -> bool:
    """Whether every tag is ``O``, ``B-X`` or ``I-X`` (chunk / entity tags, scored by span)."""
    return all(t == "O" or (len(t) > 2 and t[1] == "-" and t[0] in "BI") for t in tags)


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
    "tagging": ("tokens", "tags"),
    "generative_qa": ("question", "answers"),
    "multiple_choice": ("question", "choices", "label"),
}
OPTIONAL = {"classification": ("text_pair",), "generative_qa": ("context",), "multiple_choice": ("context",)}


TEXT_FIELDS = JOINABLE_FIELDS  # the text fields; each may join several source fields


def _get(row: dict, name):
    """A field by name; dotted names reach into nested mappings (``answers.text``); a list of
    names joins those columns' values with a space (None when one of them is missing)."""
    if isinstance(name, list):
        parts = [_get(row, n) for n in name]
        if any(p is None for p in parts):
            return None
        return " ".join(str(p).strip() for p in parts if str(p).strip())
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
    if ttype == "multiple_choice":
        return multiple_choice_example(where, row, task, task_cfg, on_error, skips)
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
            absent = [n for n in src if _get(row, n) is None] if isinstance(src, list) else src
            bad_input(on_error, skips, where, "missing_field",
                      f"field {absent!r} (canonical {name!r}) is missing; the row has {sorted(row)}. "
                      f"Map it in the task's `fields:` (a file without a header row: name its columns "
                      f"with the input's `columns: [...]`)")
            return None
        fields[name] = value
    key = str(row["id"]) if ttype == "extractive_qa" and "id" in row else where
    if ttype == "generative_qa" and not str(fields.get("context", "x")).strip():
        del fields["context"]  # an empty optional context: a closed-book question
    for name in TEXT_FIELDS:
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
    elif ttype in ("ner", "tagging"):
        words = tagged_words(where, fields, ttype, labels, on_error, skips)
        if words is None:
            return None
        fields["tokens"], fields["tags"] = words
    elif ttype == "generative_qa":
        answers = generative_answers(fields["answers"])
        if not answers:
            bad_input(on_error, skips, where, "missing_field",
                      f"no answer text (expected a string or a list of strings, got {fields['answers']!r})")
            return None
        fields["answers"] = answers
    return Example(key=key, task=task, task_type=ttype, fields=fields)


def tagged_words(where: str, fields: dict, ttype: str, labels: Optional[list[str]], on_error: str,
                 skips: SkipCounter | None) -> Optional[tuple[list[str], list[str]]]:
    """The (tokens, tags) of a ner / tagging example, checked (None when skipped). NER tags
    and IOB-looking tagging tags (chunks) are normalised to IOB2; plain tags (POS) stay."""
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
    if ttype == "ner" or looks_iob(labels if labels else tags):
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
    return toks, tags


def generative_answers(value) -> list[str]:
    """Free-text answers: a string, a list of strings, or SQuAD-style ``{text: ...}`` records."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, dict) and "text" in value:
        value = value["text"] if isinstance(value["text"], list) else [value["text"]]
    if not isinstance(value, list):
        return []
    out = [str(a["text"] if isinstance(a, dict) else a).strip() for a in value
           if (a.get("text") if isinstance(a, dict) else a) is not None]
    return [a for a in out if a]


def _choice_list(row: dict, src: str) -> tuple[Optional[list], Optional[list[str]], Optional[str]]:
    """(choice texts, their own labels or None, the first missing field) of a multiple-choice
    record: a list field (strings, or ``{text, label}`` records), HF's ``{text: [...], label:
    [...]}``, or numbered fields named together (``"sol1,sol2"``)."""
    if "," in src:
        names = [n.strip() for n in src.split(",") if n.strip()]
        values = [_get(row, n) for n in names]
        missing = [n for n, v in zip(names, values) if v is None]
        return (None, None, missing[0]) if missing else (values, None, None)
    value = _get(row, src)
    if value is None:
        return None, None, src
    if isinstance(value, dict) and "text" in value:
        texts, labs = value.get("text"), value.get("label")
        return list(texts or []), [str(x) for x in labs] if isinstance(labs, list) else None, None
    if isinstance(value, list) and value and all(isinstance(c, dict) for c in value):
        return [c.get("text") for c in value], [str(c.get("label")) for c in value] if all(
            "label" in c for c in value) else None, None
    if isinstance(value, str):  # a JSON list inside a TSV/CSV cell
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return parsed, None, None
        return [value], None, None
    return list(value) if isinstance(value, (list, tuple)) else [value], None, None


def choice_index(label, n: int, choice_labels: Optional[list[str]]) -> tuple[Optional[int], str]:
    """A multiple-choice label -> (0-based choice index, "") or (None, why). A choice's own
    label wins (ARC's "1".."4"); else an integer is a 0-based index and a single letter A-Z
    counts from A."""
    text = str(label).strip()
    if choice_labels and text in choice_labels:
        return choice_labels.index(text), ""
    if isinstance(label, bool) or not text:
        return None, f"label {label!r} is neither a choice index nor a letter"
    if text.lstrip("-").isdigit():
        idx = int(text)
    elif len(text) == 1 and text.isalpha():
        idx = ord(text.upper()) - ord("A")
    else:
        return None, (f"label {label!r} is neither a 0-based choice index, a letter A-Z, nor one of the "
                      f"choices' labels {choice_labels}" if choice_labels else
                      f"label {label!r} is neither a 0-based choice index nor a letter A-Z")
    if not 0 <= idx < n:
        return None, f"label {label!r} (choice {idx}) is out of range for {n} choices"
    return idx, ""


def multiple_choice_example(where: str, row: dict, task: str, task_cfg, on_error: str,
                            skips: SkipCounter | None) -> Optional[Example]:
    """A multiple-choice record -> Example(question, [context], choices: list[str], label: int)."""
    fmap = task_cfg.fields
    fields: dict[str, Any] = {}
    for name in ("question", "context"):
        src = fmap.get(name, name)
        value = _get(row, src)
        if value is None:
            if name == "context" and name not in fmap:
                continue
            bad_input(on_error, skips, where, "missing_field",
                      f"field {src!r} (canonical {name!r}) is missing; the row has {sorted(row)}. "
                      f"Map it in the task's `fields:`")
            return None
        value = str(value).strip()
        if value:
            fields[name] = value
        elif name == "question":
            bad_input(on_error, skips, where, "empty_field", "field 'question' is empty")
            return None
    src = fmap.get("choices", "choices")
    choices, choice_labels, missing = _choice_list(row, src)
    if missing is not None:
        bad_input(on_error, skips, where, "missing_field",
                  f"choice field {missing!r} is missing; the row has {sorted(row)}. Map `choices:` to a list "
                  f"field or to numbered fields joined by commas (\"sol1,sol2\")")
        return None
    choices = [None if c is None else str(c).strip() for c in choices]
    if len(choices) < 2 or any(not c for c in choices):
        why = (f"{len(choices)} choice(s) {choices!r}: a multiple-choice example needs at least 2"
               if len(choices) < 2 else f"choice {[i for i, c in enumerate(choices) if not c][0]} is empty")
        bad_input(on_error, skips, where, "too_few_choices", why)
        return None
    lsrc = fmap.get("label", "label")
    label = _get(row, lsrc)
    if label is None:
        bad_input(on_error, skips, where, "missing_field",
                  f"field {lsrc!r} (canonical 'label') is missing; the row has {sorted(row)}")
        return None
    idx, why = choice_index(label, len(choices), choice_labels)
    if idx is None:
        bad_input(on_error, skips, where, "label_out_of_range", why)
        return None
    fields["choices"], fields["label"] = choices, idx
    return Example(key=where, task=task, task_type="multiple_choice", fields=fields)


def resolve_labels(task_name: str, task_cfg, on_error: str = "raise") -> Optional[list[str]]:
    """The label list of a task: class names (classification) or IOB2 tags (ner); None otherwise.

    From ``task_cfg.labels`` when set; else inferred (sorted) from the train split, or the
    first split when there is no train split. Class id / tag id = index in this list.
    """
    ttype = task_cfg.task_type
    if ttype not in ("classification", "ner", "tagging"):
        return None
    if task_cfg.labels:
        return ner_tags_from_labels(task_cfg.labels) if ttype == "ner" else list(task_cfg.labels)
    if not task_cfg.inputs:
        return None
    split = "train" if "train" in task_cfg.inputs else next(iter(task_cfg.inputs))
    seen: set[str] = set()
    for ex in read_examples(task_name, task_cfg, split, on_error="skip", skips=SkipCounter(), labels=None):
        if ttype == "classification":
            seen.add(ex.fields["label"])
        elif ttype == "tagging":
            seen.update(ex.fields["tags"])
        else:
            seen.update(t[2:] for t in ex.fields["tags"] if t != "O")
    if ttype == "tagging":  # chunk tags: the IOB2 set of their types; plain tags (POS): sorted
        return tag_set(t[2:] for t in seen if t != "O") if looks_iob(seen) else sorted(seen)
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
