"""Best-fit packing of examples into fixed-length rows, and the packed-batch contract.

An item is one example: its tokens and, for the causal LM objective, the prompt length
(``labels`` are built at emit time: shifted *within* the example, so ``labels[t]`` is the
token at ``t + 1`` when that token is a target token, -100 on prompt tokens, on the last
token and on padding). Encoder items carry their head labels instead.

:class:`Packer` holds up to ``buffer_size`` items. A row starts with the *oldest* item
(no starvation), then repeatedly takes the *longest* buffered item that still fits
(best fit). Examples are never split across rows; an example longer than ``seq_len`` is
truncated (causal: prompt from the left, keeping its first token; then the target from the
right; encoder: from the right, keeping the final special token) or rejected, per
``data.overlong``, and counted in ``Packer.stats``. Encoder extractive QA under
``overlong=truncate`` with ``data.qa_doc_stride > 0`` is split instead, like Hugging Face's
``doc_stride``: windows ``[CLS] question [SEP] context[i:i+room] [SEP]`` whose contexts
overlap by ``qa_doc_stride`` tokens; the windows holding the whole answer are kept (counted
``qa_split`` / ``qa_windows``), the others carry no gold span and are left out, as the
SQuAD v1.1 objective has no "no answer" position.

:func:`collate_rows` turns rows into the batch dict of ARCHITECTURE.md (Packed batch).
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

IGNORE = -100


@dataclass
class PackItem:
    tokens: np.ndarray            # int64 [n]
    task_id: int
    n_prompt: int = 0             # causal: tokens[:n_prompt] are the prompt
    cls: int = IGNORE             # encoder: class id on the first token
    tags: Optional[np.ndarray] = None   # encoder: per-token tag ids (-100 where none)
    span: Optional[tuple[int, int]] = None      # encoder QA: gold start/end token
    ctx: Optional[tuple[int, int]] = None       # encoder QA: first/last context token
    key: str = ""

    def __len__(self) -> int:
        return len(self.tokens)

    def to_state(self) -> dict:
        d = {"tokens": self.tokens.tolist(), "task_id": self.task_id, "n_prompt": self.n_prompt, "cls": self.cls,
             "key": self.key}
        if self.tags is not None:
            d["tags"] = self.tags.tolist()
        if self.span is not None:
            d["span"], d["ctx"] = list(self.span), list(self.ctx)
        return d

    @classmethod
    def from_state(cls, d: dict) -> "PackItem":
        return cls(np.asarray(d["tokens"], dtype=np.int64), int(d["task_id"]), int(d["n_prompt"]), int(d["cls"]),
                   np.asarray(d["tags"], dtype=np.int64) if "tags" in d else None,
                   tuple(d["span"]) if "span" in d else None, tuple(d["ctx"]) if "ctx" in d else None,
                   d.get("key", ""))


def causal_item(sample: dict, task_id: int) -> PackItem:
    """A shard sample → a causal-LM item (prompt + target tokens)."""
    p = np.asarray(sample["prompt_ids"], dtype=np.int64)
    t = np.asarray(sample["target_ids"], dtype=np.int64)
    meta = sample.get("meta") or {}
    return PackItem(np.concatenate([p, t]), task_id, n_prompt=len(p), key=meta.get("key", sample.get("__key__", "")))


def encoder_item(sample: dict, task_id: int) -> PackItem:
    """A shard sample → an encoder item (``enc_ids`` + the head labels of its task type)."""
    meta = sample.get("meta") or {}
    toks = np.asarray(sample["enc_ids"], dtype=np.int64)
    tt = meta.get("task_type")
    item = PackItem(toks, task_id, key=meta.get("key", sample.get("__key__", "")))
    if tt == "classification":
        item.cls = int(meta.get("class_id", IGNORE))
    elif tt == "ner" and "enc_tags" in sample:
        item.tags = np.asarray(sample["enc_tags"], dtype=np.int64)
    elif tt == "extractive_qa" and "span" in meta:
        item.span, item.ctx = tuple(meta["span"]), tuple(meta["ctx_span"])
    return item


def fit_overlong(item: PackItem, seq_len: int, policy: str) -> Optional[PackItem]:
    """Truncate an item to ``seq_len`` (policy truncate) or return None (reject)."""
    n = len(item)
    if n <= seq_len:
        return item
    if policy == "reject":
        return None
    if item.n_prompt > 0:  # causal item
        p, t = item.tokens[:item.n_prompt], item.tokens[item.n_prompt:]
        room = seq_len - len(t)
        if room >= 2:
            p = np.concatenate([p[:1], p[len(p) - (room - 1):]])
        elif room == 1:
            p = p[:1]
        else:
            p, t = p[:1], t[:seq_len - 1]
        return PackItem(np.concatenate([p, t]), item.task_id, n_prompt=len(p), key=item.key)
    toks = np.concatenate([item.tokens[:seq_len - 1], item.tokens[-1:]])
    tags = None if item.tags is None else np.concatenate([item.tags[:seq_len - 1], [IGNORE]])
    span, ctx = item.span, item.ctx
    if span is not None:
        ctx = (ctx[0], min(ctx[1], seq_len - 2))
        span = span if span[1] <= ctx[1] else (-1, -1)  # the answer was cut off: no gold token
    return PackItem(toks, item.task_id, cls=item.cls, tags=tags, span=span, ctx=ctx, key=item.key)


def qa_windows(item: PackItem, seq_len: int, stride: int) -> list[PackItem]:
    """Doc-stride windows of an overlong encoder QA item that hold its whole answer ([] when
    the question leaves no room for ``stride`` + 1 context tokens, or no window holds the
    answer: the caller truncates then). See the module docstring."""
    if item.span is None or item.ctx is None or item.span[0] < 0:
        return []
    c0, c1 = item.ctx
    head, tail = item.tokens[:c0], item.tokens[c1 + 1:]
    room = seq_len - len(head) - len(tail)
    if room <= stride:
        return []
    a, b = item.span
    out, start = [], c0
    while True:
        end = min(start + room, c1 + 1)  # exclusive
        if start <= a and b < end:
            toks = np.concatenate([head, item.tokens[start:end], tail])
            shift = len(head) - start
            out.append(PackItem(toks, item.task_id, span=(a + shift, b + shift),
                                ctx=(len(head), len(head) + end - start - 1),
                                key=f"{item.key}#w{len(out)}" if item.key else ""))
        if end > c1:
            return out
        start += room - stride


class Packer:
    """Best-fit packer over a buffer of items (see module docstring)."""

    def __init__(self, seq_len: int, buffer_size: int = 64, overlong: str = "truncate", qa_doc_stride: int = 0):
        self.seq_len, self.buffer_size, self.overlong = seq_len, buffer_size, overlong
        self.qa_doc_stride = qa_doc_stride
        self._items: dict[int, PackItem] = {}     # arrival number -> item
        self._arrival: deque[int] = deque()       # arrival order (lazy deletion)
        self._sorted: list[tuple[int, int]] = []  # (length, arrival number), ascending
        self._next = 0
        self.stats: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.buffer_size

    def add(self, item: PackItem) -> bool:
        """Buffer an item; False when it was rejected as overlong (counted)."""
        if len(item) > self.seq_len:
            # an overlong QA context: doc-stride windows, each with the answer span or none
            # (falls through to plain truncation when the question alone leaves no room)
            split = item.span is not None and self.qa_doc_stride > 0 and self.overlong == "truncate"
            windows = qa_windows(item, self.seq_len, self.qa_doc_stride) if split else []
            if windows:
                self.stats["qa_split"] += 1
                self.stats["qa_windows"] += len(windows)
                for w in windows:
                    self._insert(w)
                return True
            fitted = fit_overlong(item, self.seq_len, self.overlong)
            self.stats["truncated" if fitted is not None else "overlong"] += 1
            if fitted is None:
                return False
            item = fitted
        if len(item) == 0:
            self.stats["empty"] += 1
            return False
        self._insert(item)
        return True

    def _insert(self, item: PackItem) -> None:
        n = self._next
        self._next += 1
        self._items[n] = item
        self._arrival.append(n)
        bisect.insort(self._sorted, (len(item), n))

    def _take(self, n: int) -> PackItem:
        item = self._items.pop(n)
        i = bisect.bisect_left(self._sorted, (len(item), n))
        del self._sorted[i]
        return item

    def pop_row(self) -> list[PackItem]:
        """One row: the oldest item, then best fit until nothing fits (empty list if no items)."""
        while self._arrival and self._arrival[0] not in self._items:
            self._arrival.popleft()
        if not self._arrival:
            return []
        row = [self._take(self._arrival.popleft())]
        room = self.seq_len - len(row[0])
        while room > 0 and self._sorted:
            i = bisect.bisect_right(self._sorted, (room, 1 << 62)) - 1
            if i < 0:
                break
            length, n = self._sorted[i]
            row.append(self._take(n))
            room -= length
        self.stats["rows"] += 1
        self.stats["tokens"] += self.seq_len - room
        return row

    def state_dict(self) -> dict[str, Any]:
        order = [n for n in self._arrival if n in self._items]
        return {"items": [self._items[n].to_state() for n in order], "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._items, self._arrival, self._sorted, self._next = {}, deque(), [], 0
        for d in state["items"]:
            item = PackItem.from_state(d)
            n = self._next
            self._next += 1
            self._items[n] = item
            self._arrival.append(n)
            bisect.insort(self._sorted, (len(item), n))
        self.stats = Counter(state.get("stats", {}))


def collate_rows(rows: list[list[PackItem]], seq_len: int, pad_id: int, objective: str = "causal_lm",
                 num_rows: Optional[int] = None) -> dict[str, Any]:
    """Rows of items → the packed batch dict (ARCHITECTURE.md, Packed batch).

    ``num_rows``: pad the batch with all-padding rows up to this many rows.
    """
    B, L = max(len(rows), num_rows or 0), seq_len
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE, dtype=np.int64)
    task_ids = np.full((B, L), -1, dtype=np.int64)
    position_ids = np.empty((B, L), dtype=np.int64)
    segment_ids = np.full((B, L), -1, dtype=np.int64)
    enc = objective == "encoder"
    if enc:
        cls_l = np.full((B, L), IGNORE, dtype=np.int64)
        tag_l = np.full((B, L), IGNORE, dtype=np.int64)
        start_l = np.full((B, L), IGNORE, dtype=np.int64)
        end_l = np.full((B, L), IGNORE, dtype=np.int64)
    ar = np.arange(L, dtype=np.int64)
    seglens: list[int] = []
    for b in range(B):
        o = 0
        for j, it in enumerate(rows[b] if b < len(rows) else ()):
            n = len(it.tokens)
            e = o + n
            input_ids[b, o:e] = it.tokens
            task_ids[b, o:e] = it.task_id
            position_ids[b, o:e] = ar[:n]
            segment_ids[b, o:e] = j
            if enc:
                if it.cls != IGNORE:
                    cls_l[b, o] = it.cls
                if it.tags is not None:
                    tag_l[b, o:e] = it.tags
                if it.ctx is not None:
                    c0, c1 = it.ctx
                    start_l[b, o + c0:o + c1 + 1] = 0
                    end_l[b, o + c0:o + c1 + 1] = 0
                    if it.span is not None and it.span[0] >= 0:
                        start_l[b, o + it.span[0]] = 1
                        end_l[b, o + it.span[1]] = 1
            elif n > it.n_prompt:
                # labels[t] = tokens[t + 1] for the target tokens t + 1 >= n_prompt
                p = max(it.n_prompt, 1)
                labels[b, o + p - 1:e - 1] = it.tokens[p:]
            seglens.append(n)
            o = e
        if o < L:
            position_ids[b, o:] = ar[:L - o]
            seglens.append(L - o)
    cu = np.zeros(len(seglens) + 1, dtype=np.int32)
    np.cumsum(seglens, out=cu[1:])
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "task_ids": torch.from_numpy(task_ids), "position_ids": torch.from_numpy(position_ids),
             "segment_ids": torch.from_numpy(segment_ids), "cu_seqlens": torch.from_numpy(cu),
             "max_seqlen": int(max(seglens))}
    if enc:
        batch.update(cls_labels=torch.from_numpy(cls_l), tag_labels=torch.from_numpy(tag_l),
                     start_labels=torch.from_numpy(start_l), end_labels=torch.from_numpy(end_l))
    return batch
