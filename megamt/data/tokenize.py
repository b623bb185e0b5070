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
    """The shard sample (without ``__key__``) of one rendered example."""
    ids = ids or special_ids(tok)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    if ids["bos"] is not None:
        p = [ids["bos"]] + p
    t = tok(target, add_special_tokens=False)["input_ids"] + [ids["eos"]]
    f = ex.fields
    meta: dict[str, Any] = {"key": ex.key, "task": ex.task, "task_type": ex.task_type, "template": template,
                            "target": target}
    sample: dict[str, Any] = {"prompt_ids.npy": _i32(p), "target_ids.npy": _i32(t)}
    if ex.task_type == "classification":
        enc = tok(f["text"], f["text_pair"]) if "text_pair" in f else tok(f["text"])
        sample["enc_ids.npy"] = _i32(enc["input_ids"])
        meta["label"] = f["label"]
        meta["class_id"] = labels.index(f["label"]) if labels and f["label"] in labels else -1
        meta["references"] = [f["label"]]
    elif ex.task_type == "extractive_qa":
        enc = tok(f["question"], f["context"], return_offsets_mapping=True)
        seq = enc.sequence_ids()
        offs = enc["offset_mapping"]
        ctx_tokens = [i for i, s in enumerate(seq) if s == 1]
        a = f["answers"][0]
        c0, c1 = a["answer_start"], a["answer_start"] + len(a["text"])
        start = next((i for i in ctx_tokens if offs[i][0] <= c0 < offs[i][1] or offs[i][0] >= c0), -1)
        end = next((i for i in reversed(ctx_tokens) if offs[i][0] < c1), -1)
        if start < 0 or end < start:
            raise DataError(ex.key, "answer_mismatch", f"answer {a['text']!r} maps to no context token")
        sample["enc_ids.npy"] = _i32(enc["input_ids"])
        meta["span"] = [start, end]
        meta["ctx_span"] = [ctx_tokens[0], ctx_tokens[-1]]
        meta["references"] = [x["text"] for x in f["answers"]]
    elif ex.task_type == "ner":
        enc = tok(f["tokens"], is_split_into_words=True)
        words = enc.word_ids()
        tag_ids = [labels.index(t) if labels and t in labels else IGNORE for t in f["tags"]]
        tags = []
        prev = None
        for w in words:
            tags.append(tag_ids[w] if w is not None and w != prev else IGNORE)
            prev = w
        sample["enc_ids.npy"] = _i32(enc["input_ids"])
        sample["enc_tags.npy"] = _i32(tags)
        meta["references"] = list(f["tags"])
        meta["tokens"] = list(f["tokens"])
    else:
        text = f["document"] if ex.task_type == "summarization" else f["prompt"]
        sample["enc_ids.npy"] = _i32(tok(text)["input_ids"])
        meta["references"] = [f["summary"] if ex.task_type == "summarization" else f["response"]]
    sample["meta.json"] = meta
    return sample
