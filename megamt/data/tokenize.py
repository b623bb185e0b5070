"""Tokenization: (example, prompt, target) → the arrays of one shard sample.

Text-to-text (causal LMs): ``prompt_ids`` = [BOS] + prompt tokens, ``target_ids`` =
target tokens + [EOS]; no other special tokens, so prompt + target concatenate cleanly.

Encoder inputs: ``enc_ids`` is what the tokenizer itself produces with its special tokens
(a BERT-style post-processor gives ``[CLS] a [SEP] b [SEP]``): the text (pair) for
classification, ``(question, context)`` for QA with the answer's character span mapped to a
token span through the offsets, and the words of a NER sentence with ``enc_tags`` = tag id
on each word's first sub-token and -100 on the others.

Needs a *fast* (Rust) tokenizer for offsets and word ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megamt.data.errors import DataError
from megamt.data.formats import Example

IGNORE = -100


def load_tokenizer(path: str | Path):
    """A Hugging Face fast tokenizer from a local folder (no hub access)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(str(path), "missing_tokenizer", "tokenizer folder not found (build the demo one with "
                        "`megamt demo-corpus OUT`, or point data.tokenizer at a local HF tokenizer folder)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise DataError(str(path), "slow_tokenizer", "megamt needs a fast tokenizer (tokenizer.json) for offsets")
    return tok


def vocab_hash(tok) -> str:
    """SHA-256 of the vocabulary (token → id) and the special tokens: identifies a tokenizer."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(special_ids(tok), sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def special_ids(tok) -> dict[str, Optional[int]]:
    """bos / eos / pad ids as megamt uses them (pad falls back to eos, eos to sep)."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None or pad is None:
        raise DataError(str(getattr(tok, "name_or_path", "tokenizer")), "missing_special",
                        "the tokenizer has neither an eos nor a sep token; add one")
    return {"bos": tok.bos_token_id, "eos": int(eos), "pad": int(pad)}


def tokenizer_info(tok, path: str | Path) -> dict[str, Any]:
    ids = special_ids(tok)
    return {"name": Path(str(path)).name, "path": str(path), "vocab_hash": vocab_hash(tok),
            "vocab_size": len(tok), **{f"{k}_id": v for k, v in ids.items()}}


def _i32(xs) -> np.ndarray:
    return np.asarray(xs, dtype=np.int32)


def encode_example(ex: Example, prompt: str, target: str, template: str, tok, labels: Optional[list[str]],
                   ids: Optional[dict] = None) -> dict[str, Any]:
    """The shard sample (without ``__key__``) of one rendered example (raises DataError)."""
    out = encode_examples([(ex, prompt, target, template)], tok, labels, ids)[0]
    if isinstance(out, DataError):
        raise out
    return out


def encode_examples(rendered: list[tuple[Example, str, str, str]], tok, labels: Optional[list[str]],
                    ids: Optional[dict] = None) -> list[dict[str, Any] | DataError]:
    """Shard samples of rendered examples ``(example, prompt, target, template)`` of one task,
    tokenized in batches (the Rust tokenizer's batch encode). A sample that cannot be built
    comes back as a :class:`DataError` in its place."""
    if not rendered:
        return []
    ids = ids or special_ids(tok)
    bos = [ids["bos"]] if ids["bos"] is not None else []
    prompts = tok([r[1] for r in rendered], add_special_tokens=False)["input_ids"]
    targets = tok([r[2] for r in rendered], add_special_tokens=False)["input_ids"]
    ttype = rendered[0][0].task_type
    fields = [r[0].fields for r in rendered]
    out: list[dict[str, Any] | DataError] = []
    for (ex, _, target, template), p, t in zip(rendered, prompts, targets):
        meta = {"key": ex.key, "task": ex.task, "task_type": ex.task_type, "template": template, "target": target}
        out.append({"prompt_ids.npy": _i32(bos + p), "target_ids.npy": _i32(t + [ids["eos"]]), "meta.json": meta})
    if ttype == "classification":
        for has_pair in (False, True):
            idx = [i for i, f in enumerate(fields) if ("text_pair" in f) == has_pair]
            if not idx:
                continue
            texts = [fields[i]["text"] for i in idx]
            enc = tok(texts, [fields[i]["text_pair"] for i in idx]) if has_pair else tok(texts)
            for i, e in zip(idx, enc["input_ids"]):
                lab = fields[i]["label"]
                out[i]["enc_ids.npy"] = _i32(e)
                out[i]["meta.json"].update(label=lab, references=[lab],
                                           class_id=labels.index(lab) if labels and lab in labels else -1)
    elif ttype == "extractive_qa":
        enc = tok([f["question"] for f in fields], [f["context"] for f in fields], return_offsets_mapping=True)
        for i, f in enumerate(fields):
            seq, offs = enc.sequence_ids(i), enc["offset_mapping"][i]
            ctx_tokens = [k for k, sid in enumerate(seq) if sid == 1]
            a = f["answers"][0]
            c0, c1 = a["answer_start"], a["answer_start"] + len(a["text"])
            start = next((k for k in ctx_tokens if offs[k][0] <= c0 < offs[k][1] or offs[k][0] >= c0), -1)
            end = next((k for k in reversed(ctx_tokens) if offs[k][0] < c1), -1)
            if start < 0 or end < start:
                out[i] = DataError(rendered[i][0].key, "answer_mismatch", f"answer {a['text']!r} maps to no context token")
                continue
            out[i]["enc_ids.npy"] = _i32(enc["input_ids"][i])
            out[i]["meta.json"].update(span=[start, end], ctx_span=[ctx_tokens[0], ctx_tokens[-1]],
                                       references=[x["text"] for x in f["answers"]])
    elif ttype == "ner":
        enc = tok([f["tokens"] for f in fields], is_split_into_words=True)
        index = {t: k for k, t in enumerate(labels or [])}
        for i, f in enumerate(fields):
            tag_ids = [index.get(t, IGNORE) for t in f["tags"]]
            tags, prev = [], None
            for w in enc.word_ids(i):
                tags.append(tag_ids[w] if w is not None and w != prev else IGNORE)
                prev = w
            out[i]["enc_ids.npy"] = _i32(enc["input_ids"][i])
            out[i]["enc_tags.npy"] = _i32(tags)
            out[i]["meta.json"].update(references=list(f["tags"]), tokens=list(f["tokens"]))
    else:
        key, ref = ("document", "summary") if ttype == "summarization" else ("prompt", "response")
        enc = tok([f[key] for f in fields])
        for i, f in enumerate(fields):
            out[i]["enc_ids.npy"] = _i32(enc["input_ids"][i])
            out[i]["meta.json"]["references"] = [f[ref]]
    return out
