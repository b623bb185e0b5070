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

A multiple-choice example on the encoder objective is one item holding its N choice
encodings back to back (``choice_lens``): the packer places it whole, so **an example's
choices always share one row, hence one micro-batch**, and the multiple-choice head's softmax
over them never spans micro-batches or ranks. Each choice is its own segment (own positions,
no attention to the other choices). Too long for ``seq_len``, the choices are cut from the
right (each keeping its final special token), longest first, until the group fits.

:func:`collate_rows` turns rows into the batch dict of ARCHITECTURE.md (Packed batch).

Encoder-decoders (``objective=seq2seq``): an item is an example's encoder tokens (its prompt +
EOS) and its decoder tokens (``dec``: the target with its EOS). :class:`Seq2SeqPacker` fills an
encoder row of ``seq_len`` and a decoder row of ``target_len`` together: the oldest item
first, then the item with the longest prompt that fits the encoder row *and* whose target
fits the decoder row, until none does (a row is closed when either side would overflow).
Overlong prompts are cut like causal prompts (the first token and the end kept), overlong
targets from the right; both counted apart (``truncated`` / ``truncated_target``; rejected:
``overlong`` / ``overlong_target``). :func:`collate_seq2seq_rows` writes both sides (see
ARCHITECTURE.md, "Packed seq2seq batch").
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
    choice_lens: Optional[tuple[int, ...]] = None  # encoder multiple choice: tokens of each choice
                                                   # (cls = the gold choice)
    dec: Optional[np.ndarray] = None    # seq2seq: decoder tokens (target + EOS); ``tokens`` = prompt + EOS

    def __len__(self) -> int:
        return len(self.tokens)

    def to_state(self) -> dict:
        d = {"tokens": self.tokens.tolist(), "task_id": self.task_id, "n_prompt": self.n_prompt, "cls": self.cls,
             "key": self.key}
        if self.tags is not None:
            d["tags"] = self.tags.tolist()
        if self.span is not None:
            d["span"], d["ctx"] = list(self.span), list(self.ctx)
        if self.choice_lens is not None:
            d["choice_lens"] = list(self.choice_lens)
        if self.dec is not None:
            d["dec"] = self.dec.tolist()
        return d

    @classmethod
    def from_state(cls, d: dict) -> "PackItem":
        return cls(np.asarray(d["tokens"], dtype=np.int64), int(d["task_id"]), int(d["n_prompt"]), int(d["cls"]),
                   np.asarray(d["tags"], dtype=np.int64) if "tags" in d else None,
                   tuple(d["span"]) if "span" in d else None, tuple(d["ctx"]) if "ctx" in d else None,
                   d.get("key", ""), choice_lens=tuple(d["choice_lens"]) if "choice_lens" in d else None,
                   dec=np.asarray(d["dec"], dtype=np.int64) if "dec" in d else None)


def causal_item(sample: dict, task_id: int) -> PackItem:
    """A shard sample → a causal-LM item (prompt + target tokens)."""
    p = np.asarray(sample["prompt_ids"], dtype=np.int64)
    t = np.asarray(sample["target_ids"], dtype=np.int64)
    meta = sample.get("meta") or {}
    return PackItem(np.concatenate([p, t]), task_id, n_prompt=len(p), key=meta.get("key", sample.get("__key__", "")))


def seq2seq_item(sample: dict, task_id: int, eos_id: int) -> PackItem:
    """A shard sample → an encoder-decoder item: encoder tokens = ``prompt_ids`` + EOS (what
    evaluation encodes too), decoder tokens = ``target_ids`` (they end with EOS)."""
    p = np.asarray(sample["prompt_ids"], dtype=np.int64)
    meta = sample.get("meta") or {}
    return PackItem(np.concatenate([p, [eos_id]]), task_id, key=meta.get("key", sample.get("__key__", "")),
                    dec=np.asarray(sample["target_ids"], dtype=np.int64))


def encoder_item(sample: dict, task_id: int) -> PackItem:
    """A shard sample → an encoder item (``enc_ids`` + the head labels of its task type)."""
    meta = sample.get("meta") or {}
    toks = np.asarray(sample["enc_ids"], dtype=np.int64)
    tt = meta.get("task_type")
    item = PackItem(toks, task_id, key=meta.get("key", sample.get("__key__", "")))
    if tt == "classification":
        item.cls = int(meta.get("class_id", IGNORE))
    elif tt == "multiple_choice":
        item.cls, item.choice_lens = int(meta["class_id"]), tuple(int(n) for n in meta["choice_lens"])
    elif tt in ("ner", "tagging") and "enc_tags" in sample:
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
        if room >= 1:
            p = cut_prompt(p, room)
        else:
            p, t = p[:1], t[:seq_len - 1]
        return PackItem(np.concatenate([p, t]), item.task_id, n_prompt=len(p), key=item.key)
    if item.choice_lens is not None:
        return fit_choices(item, seq_len)
    toks = np.concatenate([item.tokens[:seq_len - 1], item.tokens[-1:]])
    tags = None if item.tags is None else np.concatenate([item.tags[:seq_len - 1], [IGNORE]])
    span, ctx = item.span, item.ctx
    if span is not None:
        ctx = (ctx[0], min(ctx[1], seq_len - 2))
        span = span if span[1] <= ctx[1] else (-1, -1)  # the answer was cut off: no gold token
    return PackItem(toks, item.task_id, cls=item.cls, tags=tags, span=span, ctx=ctx, key=item.key)


def fit_choices(item: PackItem, seq_len: int) -> Optional[PackItem]:
    """A multiple-choice group cut to ``seq_len``: every choice longer than a cap ``c`` keeps its
    first ``c - 1`` tokens and its last one, ``c`` the largest cap with which the group fits
    (None when even 2 tokens per choice do not fit)."""
    lens = list(item.choice_lens)
    if 2 * len(lens) > seq_len:
        return None
    lo, hi = 2, max(lens)  # the largest cap c with sum(min(l, c)) <= seq_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lens) <= seq_len:
            lo = mid
        else:
            hi = mid - 1
    parts, o = [], 0
    for n in lens:
        choice = item.tokens[o:o + n]
        parts.append(choice if n <= lo else np.concatenate([choice[:lo - 1], choice[-1:]]))
        o += n
    return PackItem(np.concatenate(parts), item.task_id, cls=item.cls, key=item.key,
                    choice_lens=tuple(len(p) for p in parts))


def cut_prompt(tokens: np.ndarray, length: int) -> np.ndarray:
    """The first token and the last ``length - 1`` tokens (prompts are cut from the left, the
    leading BOS and the closing instruction / EOS kept)."""
    if len(tokens) <= length:
        return tokens
    return np.concatenate([tokens[:1], tokens[len(tokens) - (length - 1):]]) if length > 1 else tokens[:1]


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

    def _oldest(self) -> Optional[PackItem]:
        """Take the oldest buffered item (None when the buffer is empty)."""
        while self._arrival and self._arrival[0] not in self._items:
            self._arrival.popleft()
        return self._take(self._arrival.popleft()) if self._arrival else None

    def _best_fit(self, room: int, fits=None) -> Optional[PackItem]:
        """Take the longest buffered item of at most ``room`` tokens (for which ``fits(item)``
        holds, when given); None when there is none."""
        i = bisect.bisect_right(self._sorted, (room, 1 << 62)) - 1
        while i >= 0 and fits is not None and not fits(self._items[self._sorted[i][1]]):
            i -= 1
        return self._take(self._sorted[i][1]) if i >= 0 else None

    def pop_row(self) -> list[PackItem]:
        """One row: the oldest item, then best fit until nothing fits (empty list if no items)."""
        first = self._oldest()
        if first is None:
            return []
        row = [first]
        room = self.seq_len - len(first)
        while room > 0 and (item := self._best_fit(room)) is not None:
            row.append(item)
            room -= len(item)
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
        choice_l = np.full((B, L), IGNORE, dtype=np.int64)
    ar = np.arange(L, dtype=np.int64)
    seglens: list[int] = []
    for b in range(B):
        o = 0
        j = 0  # segment index within the row
        for it in rows[b] if b < len(rows) else ():
            n = len(it.tokens)
            e = o + n
            input_ids[b, o:e] = it.tokens
            task_ids[b, o:e] = it.task_id
            if it.choice_lens is not None:
                # one segment per choice: own positions, choice index on its first token, the
                # gold choice's index on the group's first token
                c0 = o
                for k, m in enumerate(it.choice_lens):
                    position_ids[b, c0:c0 + m] = ar[:m]
                    segment_ids[b, c0:c0 + m] = j
                    choice_l[b, c0] = k
                    seglens.append(m)
                    c0 += m
                    j += 1
                cls_l[b, o] = it.cls
                o = e
                continue
            position_ids[b, o:e] = ar[:n]
            segment_ids[b, o:e] = j
            j += 1
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
                     start_labels=torch.from_numpy(start_l), end_labels=torch.from_numpy(end_l),
                     choice_ids=torch.from_numpy(choice_l))
    return batch


# --------------------------------------------------------------------------- encoder-decoders


class Seq2SeqPacker(Packer):
    """Best fit on two rows at once: encoder tokens into ``seq_len``, decoder tokens into
    ``target_len`` (module docstring). ``stats``: ``rows``, ``tokens`` (encoder),
    ``target_tokens`` (decoder) and the overlong counts of each side."""

    def __init__(self, seq_len: int, target_len: int, buffer_size: int = 64, overlong: str = "truncate"):
        super().__init__(seq_len, buffer_size, overlong, qa_doc_stride=0)
        self.target_len = target_len

    def add(self, item: PackItem) -> bool:
        """Buffer an item; False when it was rejected (overlong on either side, counted)."""
        if item.dec is None:
            raise ValueError(f"{item.key or 'item'}: a seq2seq item needs decoder tokens (megamt.data.packing.seq2seq_item)")
        long_enc, long_dec = len(item.tokens) > self.seq_len, len(item.dec) > self.target_len
        if long_enc or long_dec:
            if self.overlong == "reject":
                self.stats["overlong" if long_enc else "overlong_target"] += 1
                return False
            self.stats["truncated"] += long_enc
            self.stats["truncated_target"] += long_dec
            item = PackItem(cut_prompt(item.tokens, self.seq_len), item.task_id, key=item.key,
                            dec=item.dec[:self.target_len])
        if len(item.tokens) == 0 or len(item.dec) == 0:
            self.stats["empty"] += 1
            return False
        self._insert(item)
        return True

    def pop_row(self) -> list[PackItem]:
        """One row pair: the oldest item, then the longest prompt whose target fits too."""
        first = self._oldest()
        if first is None:
            return []
        row = [first]
        room, room_dec = self.seq_len - len(first), self.target_len - len(first.dec)
        while room > 0 and room_dec > 0 and (
                item := self._best_fit(room, lambda x: len(x.dec) <= room_dec)) is not None:
            row.append(item)
            room, room_dec = room - len(item), room_dec - len(item.dec)
        self.stats["rows"] += 1
        self.stats["tokens"] += self.seq_len - room
        self.stats["target_tokens"] += self.target_len - room_dec
        return row


def _side(B: int, L: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"ids": np.full((B, L), pad_id, dtype=np.int64), "pos": np.empty((B, L), dtype=np.int64),
            "seg": np.full((B, L), -1, dtype=np.int64)}


def _cu(lengths: list[int]) -> torch.Tensor:
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return torch.from_numpy(cu)


def collate_seq2seq_rows(rows: list[list[PackItem]], seq_len: int, target_len: int, pad_id: int,
                         num_rows: Optional[int] = None) -> dict[str, Any]:
    """Row pairs of encoder-decoder items → the packed seq2seq batch (ARCHITECTURE.md).

    Encoder side (``seq_len``): ``input_ids``, ``position_ids``, ``segment_ids``, ``cu_seqlens``,
    ``max_seqlen``. Decoder side (``target_len``): ``labels`` (the target tokens, -100 on
    padding; the model shifts them right within each example), ``task_ids`` (-1 on padding),
    ``decoder_position_ids``, ``decoder_segment_ids``, ``decoder_cu_seqlens``,
    ``decoder_max_seqlen``. Cross-attention pairs (``cross_cu_seqlens_q`` over the decoder
    tokens, ``cross_cu_seqlens_k`` over the encoder tokens, ``cross_max_seqlen_q/k``): one pair
    per example; a row's decoder padding joins its last example's queries when the encoder row
    has no padding (queries attend independently, and padding outputs are never read), else
    the two padding runs pair up; encoder padding alone pairs with no query.
    """
    B = max(len(rows), num_rows or 0)
    enc, dec = _side(B, seq_len, pad_id), _side(B, target_len, pad_id)
    labels = np.full((B, target_len), IGNORE, dtype=np.int64)
    task_ids = np.full((B, target_len), -1, dtype=np.int64)
    ar = np.arange(max(seq_len, target_len), dtype=np.int64)
    enc_lens: list[int] = []
    dec_lens: list[int] = []
    pair_q: list[int] = []
    pair_k: list[int] = []
    for b in range(B):
        oe = od = 0
        for j, it in enumerate(rows[b] if b < len(rows) else ()):
            ne, nd = len(it.tokens), len(it.dec)
            enc["ids"][b, oe:oe + ne], enc["pos"][b, oe:oe + ne], enc["seg"][b, oe:oe + ne] = it.tokens, ar[:ne], j
            dec["pos"][b, od:od + nd], dec["seg"][b, od:od + nd] = ar[:nd], j
            labels[b, od:od + nd] = it.dec
            task_ids[b, od:od + nd] = it.task_id
            enc_lens.append(ne)
            dec_lens.append(nd)
            pair_q.append(nd)
            pair_k.append(ne)
            oe, od = oe + ne, od + nd
        pe, pd = seq_len - oe, target_len - od
        for side, o, n, lens in ((enc, oe, pe, enc_lens), (dec, od, pd, dec_lens)):
            if n:
                side["pos"][b, o:] = ar[:n]
                lens.append(n)
        if pd and not pe:
            pair_q[-1] += pd
        elif pd or pe:
            pair_q.append(pd)
            pair_k.append(pe)
    t = torch.from_numpy
    return {"input_ids": t(enc["ids"]), "position_ids": t(enc["pos"]), "segment_ids": t(enc["seg"]),
            "cu_seqlens": _cu(enc_lens), "max_seqlen": int(max(enc_lens)),
            "labels": t(labels), "task_ids": t(task_ids), "decoder_position_ids": t(dec["pos"]),
            "decoder_segment_ids": t(dec["seg"]), "decoder_cu_seqlens": _cu(dec_lens),
            "decoder_max_seqlen": int(max(dec_lens)),
            "cross_cu_seqlens_q": _cu(pair_q), "cross_cu_seqlens_k": _cu(pair_k),
            "cross_max_seqlen_q": int(max(pair_q)), "cross_max_seqlen_k": int(max(pair_k))}


def non_pad_tokens(batch: dict[str, Any]) -> int:
    """Tokens of a packed batch that belong to an example (both sides of a seq2seq batch)."""
    n = int((batch["segment_ids"] >= 0).sum())
    if "decoder_segment_ids" in batch:
        n += int((batch["decoder_segment_ids"] >= 0).sum())
    return n
