"""Encoder backbone + per-task heads (MT-DNN style) over packed batches.

Any Hugging Face encoder loaded with ``AutoModel`` (BERT, RoBERTa, the packaged MiniLM)
is the shared backbone; each task has its own small head:

- ``sequence_classification``: the hidden state of each example's *first* token (its
  ``[CLS]``) -> dense + tanh (a per-task pooler, as BERT's) -> dropout -> linear to classes;
- ``token_classification``: dropout -> linear to tags, on every token that carries a
  ``tag_labels`` id (the first sub-token of each word);
- ``span``: linear to (start, end) logits; softmax over each example's context tokens;
- ``multiple_choice``: each choice (encoded with its question, its own packed segment) is
  scored from its first token by a per-task pooler + linear to 1; softmax over the choices
  of one example (the packer keeps them in one row, so in one micro-batch), one loss term per
  example (``choice_ids`` marks each choice's first token, ``cls_labels`` holds the gold
  choice on the first choice's first token). Token tagging (POS, chunks) uses
  ``token_classification`` like NER.

Packed rows hold several examples. They must not see each other: encoders whose attention
goes through transformers' ``AttentionInterface`` (BERT, RoBERTa, XLM-R, ELECTRA, ALBERT,
DistilBERT, ModernBERT, ...) run megamt's packed attention (megamt/attention.py) on the
packer's ``cu_seqlens``, bidirectional within each segment, with no mask at all. Encoders
with hand-written attention (DeBERTa-v2: disentangled relative-position terms; MPNet:
relative position bias) cannot take segment boundaries, and DeBERTa-v2 does not even take a
4-D mask (it multiplies its embeddings by the mask); for them each segment becomes its own
row of an ``[S, max_seqlen]`` batch with an ordinary 2-D padding mask (:func:`unpacked_encode`)
and the hidden states go back to their packed places. ``position_ids`` restart at 0 for
each example. Packed forwards equal separate forwards (tested to 1e-5).

``forward(batch) -> TaskLoss(loss_sum[T], count[T])``: per task, the summed loss and the
number of loss terms (classification: examples; NER: tagged words; span: QA examples,
each term the mean of its start and end cross-entropies; multiple choice: examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("sequence_classification", "token_classification", "span", "multiple_choice")
HEADS_FILE, HEADS_META = "heads.safetensors", "heads.json"
_HEAD_BY_TYPE = {"classification": "sequence_classification", "ner": "token_classification",
                 "tagging": "token_classification", "extractive_qa": "span", "multiple_choice": "multiple_choice"}
# Models whose learned position table starts after the padding index (RoBERTa family):
# position p of an example is row p + pad_token_id + 1.
_OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text",
                           "xlm-roberta-xl", "xmod")

try:  # the trainer's per-task loss type (megamt/losses.py), when present
    from megamt.losses import TaskLoss  # type: ignore
except ImportError:  # pragma: no cover - before losses.py exists
    class TaskLoss(NamedTuple):
        loss_sum: torch.Tensor
        """fp32 [T]: summed loss per task over the local micro-batch."""
        count: torch.Tensor
        """fp32 [T]: number of loss terms per task."""


class HeadConfigError(ValueError):
    """A task that cannot get a head (wrong type, unknown label set); the message names it."""


def resolve_head(task_name: str, task_cfg) -> str:
    """The head kind of a task: its ``head`` setting, or the one its type implies."""
    if task_cfg.head != "auto":
        return task_cfg.head
    kind = _HEAD_BY_TYPE.get(task_cfg.task_type)
    if kind is None:
        raise HeadConfigError(
            f"tasks.{task_name}: a {task_cfg.task_type} task has no encoder head; encoder backbones "
            f"support {sorted(_HEAD_BY_TYPE)} (use model.family=causal_lm for generation tasks)")
    return kind


def head_label_names(task_name: str, task_cfg, kind: str) -> list[str]:
    """Class names (sequence classification) or IOB2 tag names (token classification).

    The same list the data pipeline uses for label ids (``megamt.data.formats.resolve_labels``:
    the task's ``labels``, NER entity types expanded to ``[O, B-LOC, I-LOC, ...]``, or the
    set inferred from the train split), so head output ``i`` is label id ``i`` of the shards.
    """
    if kind in ("span", "multiple_choice"):
        return []
    from megamt.data.formats import resolve_labels

    labels = resolve_labels(task_name, task_cfg)
    if not labels:
        raise HeadConfigError(
            f"tasks.{task_name}.labels: an encoder {kind} head needs its label set; list it in the "
            f"task config or give the task a train input to infer it from")
    return list(labels)


def unpacked_encode(backbone: nn.Module, kwargs: dict, bounds: list[int], max_seqlen: int) -> torch.Tensor:
    """Hidden states ``[B, L, H]`` of a packed batch with every segment encoded alone: the
    segments (``bounds``: boundaries in the flattened ``B*L`` tokens) become the rows of an
    ``[S, max_seqlen]`` batch with a 2-D padding mask -- for encoders that take neither
    segment boundaries nor a 4-D mask. ``kwargs``: the backbone's per-token ``[B, L]`` inputs."""
    B, L = kwargs["input_ids"].shape
    device = kwargs["input_ids"].device
    starts = torch.tensor(bounds[:-1], device=device)
    lengths = torch.tensor(bounds[1:], device=device) - starts
    offsets = torch.arange(max_seqlen, device=device)
    valid = offsets[None, :] < lengths[:, None]                       # [S, M]
    index = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # flattened token of each slot
    rows = {k: v.reshape(B * L)[index].masked_fill(~valid, 0) for k, v in kwargs.items()}
    hidden = backbone(attention_mask=valid.long(), **rows).last_hidden_state
    return hidden[valid].view(B, L, -1)  # segments are contiguous and in order


class SequenceClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.tanh(self.dense(h))))


class TokenClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(h))


class SpanHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.out = nn.Linear(hidden, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., 2]: start, end
        return self.out(h)


def build_backbone(model_cfg) -> nn.Module:
    """``AutoModel`` from a local folder (``name_or_path``) or from ``from_config``.

    BERT-style pooler layers are dropped: the heads pool per example themselves, and a
    parameter without gradient would only cost memory. The attention is switched to
    megamt's packed attention by :class:`EncoderWithHeads`.
    """
    from transformers import AutoConfig, AutoModel

    from megamt.attention import construction_kwargs

    kwargs = construction_kwargs(model_cfg.attn_implementation)
    if model_cfg.name_or_path:
        if (Path(model_cfg.name_or_path) / HEADS_META).is_file() and _has_pooling_flag(model_cfg.name_or_path):
            # a megamt export holds no pooler (dropped below): building one would be reported
            # as MISSING weights, randomly initialised, on every load
            kwargs["add_pooling_layer"] = False
        backbone = AutoModel.from_pretrained(model_cfg.name_or_path, **kwargs)
    else:
        raw = dict(model_cfg.from_config)
        backbone = AutoModel.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw), **kwargs)
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


def _has_pooling_flag(folder: str) -> bool:
    """Whether the folder's AutoModel class takes ``add_pooling_layer`` (BERT, RoBERTa ...)."""
    import inspect

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    cls = MODEL_MAPPING.get(type(AutoConfig.from_pretrained(folder)), None)
    return cls is not None and "add_pooling_layer" in inspect.signature(cls.__init__).parameters


class EncoderWithHeads(nn.Module):
    """Shared encoder + one head per task; tasks without a head (zero-shot generation
    tasks of another family) are refused at construction with the task named."""

    def __init__(self, config, backbone: nn.Module | None = None,
                 label_names: dict[str, list[str]] | None = None, head_dropout: float = 0.1):
        super().__init__()
        self.task_names = list(config.tasks)
        self.backbone = backbone if backbone is not None else build_backbone(config.model)
        from megamt.attention import switch_to_packed_attention

        self.packed_attention = switch_to_packed_attention(self.backbone, config.model.attn_implementation,
                                                           encoder=True)
        """True: packed attention on cu_seqlens; False: one row per segment (:func:`unpacked_encode`)."""
        hf = self.backbone.config
        hidden = hf.hidden_size
        self.position_offset = (hf.pad_token_id + 1) if hf.model_type in _OFFSET_POSITION_MODELS else 0
        self.head_kinds: dict[str, str] = {}
        self.label_names: dict[str, list[str]] = {}
        self.heads = nn.ModuleDict()
        problems = []
        for name, task in config.tasks.items():
            try:
                kind = resolve_head(name, task)
                names = (label_names or {}).get(name) or head_label_names(name, task, kind)
            except HeadConfigError as e:
                problems.append(str(e))
                continue
            self.head_kinds[name] = kind
            self.label_names[name] = names
            if kind == "sequence_classification":
                self.heads[name] = SequenceClassificationHead(hidden, len(names), head_dropout)
            elif kind == "token_classification":
                self.heads[name] = TokenClassificationHead(hidden, len(names), head_dropout)
            elif kind == "multiple_choice":  # one score per choice, from its first token
                self.heads[name] = SequenceClassificationHead(hidden, 1, head_dropout)
            else:
                self.heads[name] = SpanHead(hidden)
        if problems:
            raise HeadConfigError("\n".join(problems))
        self.untrained_heads: list[str] = []
        """Tasks whose head was not in the loaded folder (random init): evaluation flags them."""
        folder = Path(config.model.name_or_path) if config.model.name_or_path else None
        if backbone is None and folder is not None and (folder / HEADS_FILE).is_file():
            self._load_heads(folder)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    # ---------------------------------------------------------------- encoding
    def encode(self, batch: dict) -> torch.Tensor:
        """Hidden states [B, L, H] with every packed example isolated (the batch's
        ``cu_seqlens`` and ``max_seqlen``)."""
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"] + self.position_offset}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        elif getattr(self.backbone.config, "type_vocab_size", 0):
            kwargs["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        from megamt.attention import packed_attention_kwargs, packed_forward

        packing = packed_attention_kwargs(batch)
        if not self.packed_attention:
            return unpacked_encode(self.backbone, kwargs, packing["megamt_segments"].get(), packing["max_length_q"])
        with packed_forward():
            return self.backbone(**kwargs, **packing).last_hidden_state

    def task_logits(self, hidden: torch.Tensor, batch: dict, every_head: bool = False) -> dict[str, dict]:
        """Per task, the head's logits on the tokens that matter.

        classification: ``{"index": (b, t) of each example's first token, "logits": [N, C]}``;
        ner: ``{"index": every token of the task, "logits": [N, tags]}``;
        span: ``{"index": every token of the task, "logits": [N, 2]}``;
        multiple choice: ``{"index": each choice's first token, "logits": [N, 1]}``.
        ``every_head``: a head whose task has no token here runs too, on one row (``"index":
        None``), so that every rank calls every head in the same order (see :meth:`forward`).
        """
        task_ids, pos = batch["task_ids"], batch["position_ids"]
        out = {}
        for t, name in enumerate(self.task_names):
            if name not in self.heads:
                continue
            owned = task_ids == t
            if self.head_kinds[name] == "sequence_classification":
                owned = owned & (pos == 0)
            elif self.head_kinds[name] == "multiple_choice":
                owned = owned & (batch["choice_ids"] != -100)
            idx = owned.nonzero(as_tuple=True)
            if idx[0].numel() == 0:
                if every_head:
                    out[name] = {"index": None, "logits": self.heads[name](hidden[:1, 0])}
                continue
            out[name] = {"index": idx, "logits": self.heads[name](hidden[idx])}
        return out

    # ---------------------------------------------------------------- loss
    def forward(self, batch: dict) -> TaskLoss:
        hidden = self.encode(batch)
        T = self.num_tasks
        # 0 * hidden keeps the result differentiable (backward-able) when no example of any
        # task is in the micro-batch (an all-padding batch)
        loss_sum = hidden.new_zeros(T, dtype=torch.float32) + 0.0 * hidden.float().sum()
        count = hidden.new_zeros(T, dtype=torch.float32)
        # Every head runs in every forward, on every rank, in task order: ZeRO-3 gathers each
        # head's parameters with a collective when the head is called, and ZeRO-1/2/3 reduce
        # gradient buckets filled in the order the gradients become ready -- both must match
        # across ranks. A head whose task is absent from a rank's micro-batch used to be skipped
        # there (gloo: "Received data size doesn't match expected size", a few steps into a
        # MiniLM run on mixed micro-batches); it now runs on one row and adds an exact zero.
        for name, res in self.task_logits(hidden, batch, every_head=True).items():
            t = self.task_names.index(name)
            kind = self.head_kinds[name]
            logits, idx = res["logits"].float(), res["index"]
            if idx is None:
                loss_sum = loss_sum.index_add(0, torch.tensor([t], device=loss_sum.device),
                                              (logits.sum() * 0.0).reshape(1))
                continue
            if kind == "span":
                s, c = _span_loss(logits, idx, batch)
            elif kind == "multiple_choice":
                s, c = _choice_loss(logits[:, 0], idx, batch)
            else:
                key = "cls_labels" if kind == "sequence_classification" else "tag_labels"
                labels = batch[key][idx]
                keep = labels != -100
                s = F.cross_entropy(logits[keep], labels[keep], reduction="sum") if keep.any() \
                    else logits.sum() * 0.0
                c = keep.sum()
            loss_sum = loss_sum.index_add(0, torch.tensor([t], device=loss_sum.device), s.reshape(1))
            count[t] += c.float()
        return TaskLoss(loss_sum, count)

    # ---------------------------------------------------------------- saving
    def head_metadata(self) -> dict:
        return {"task_names": self.task_names, "head_kinds": self.head_kinds, "label_names": self.label_names}

    def save_pretrained(self, out_dir) -> Path:
        """A Hugging Face folder of the backbone (LoRA merged into a copy) + ``heads.safetensors``
        and ``heads.json`` (task -> head kind and label names). Loading: build the model with
        ``model.name_or_path`` = this folder; the heads are read back by the constructor."""
        import copy

        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if hasattr(backbone, "merge_and_unload"):  # peft: export a plain HF model
            backbone.save_pretrained(str(out / "adapter"))
            backbone = copy.deepcopy(backbone).merge_and_unload()
        backbone.save_pretrained(out)
        state = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        save_file(state, str(out / HEADS_FILE))
        (out / HEADS_META).write_text(json.dumps(self.head_metadata(), indent=1))
        return out

    def _load_heads(self, folder: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads((folder / HEADS_META).read_text())
        for name, kind in self.head_kinds.items():
            if name in meta["head_kinds"] and (meta["head_kinds"][name] != kind
                                               or meta["label_names"][name] != self.label_names[name]):
                raise HeadConfigError(
                    f"{folder / HEADS_META}: task {name!r} was saved as a {meta['head_kinds'][name]} head with "
                    f"labels {meta['label_names'][name]}, the config asks for {kind} with {self.label_names[name]}")
        state = load_file(str(folder / HEADS_FILE))
        missing, unexpected = self.heads.load_state_dict(state, strict=False)
        self.untrained_heads = sorted({k.split(".")[0] for k in missing})


def count_loss_terms(batch: dict, num_tasks: int) -> torch.Tensor:
    """Per-task number of loss terms of an encoder batch, from its labels alone (fp32 [T]).

    Exactly the ``count`` that :meth:`EncoderWithHeads.forward` returns, without a forward:
    classification examples (``cls_labels`` set), tagged words (``tag_labels`` set), and QA
    examples whose context holds exactly one gold start and one gold end. The trainer sums
    it over a step's micro-batches and ranks (the global per-task count N_t).
    """
    task_ids = batch["task_ids"]
    counts = torch.zeros(num_tasks, dtype=torch.float32, device=task_ids.device)
    for key in ("cls_labels", "tag_labels"):
        if key in batch:
            has = (batch[key] != -100) & (task_ids >= 0)
            counts.index_add_(0, task_ids[has], torch.ones(int(has.sum()), device=task_ids.device))
    if "start_labels" in batch:
        L = task_ids.shape[1]
        rows = torch.arange(task_ids.shape[0], device=task_ids.device)[:, None].expand_as(task_ids)
        example = rows * L + batch["segment_ids"]
        ctx = (batch["start_labels"] != -100) & (task_ids >= 0)
        if ctx.any():
            uniq, inv = torch.unique(example[ctx], return_inverse=True)
            n_start = torch.zeros(len(uniq), device=task_ids.device).index_add_(0, inv, (batch["start_labels"][ctx] == 1).float())
            n_end = torch.zeros(len(uniq), device=task_ids.device).index_add_(0, inv, (batch["end_labels"][ctx] == 1).float())
            task_of = torch.zeros(len(uniq), dtype=torch.long, device=task_ids.device).scatter_(0, inv, task_ids[ctx])
            ok = (n_start == 1) & (n_end == 1)
            counts.index_add_(0, task_of[ok], torch.ones(int(ok.sum()), device=task_ids.device))
    return counts


def _span_loss(logits: torch.Tensor, idx: tuple, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Start/end cross-entropy per QA example over its context tokens (start_labels != -100).

    logits [N, 2] on the task's tokens ``idx``; an example whose gold span is not in its
    context window (no 1 among its labels) adds no term.
    """
    b, t = idx
    starts, ends = batch["start_labels"][idx], batch["end_labels"][idx]
    ctx = starts != -100
    if not ctx.any():
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    L = batch["input_ids"].shape[1]
    example = (b * L + batch["segment_ids"][idx])[ctx]  # unique id per (row, segment)
    uniq, example = torch.unique(example, return_inverse=True)
    E = uniq.numel()
    terms, has_gold = [], torch.ones(E, dtype=torch.bool, device=logits.device)
    for j, gold in enumerate((starts[ctx], ends[ctx])):
        lg = logits[ctx, j]
        # log-softmax within each example: logsumexp by scatter, shifted by the example's max
        gmax = torch.full((E,), float("-inf"), device=lg.device).scatter_reduce(0, example, lg.detach(), "amax")
        lse = torch.zeros(E, device=lg.device).index_add(0, example, (lg - gmax[example]).exp()).log() + gmax
        gold_logit = torch.zeros(E, device=lg.device).index_add(0, example, torch.where(gold == 1, lg, 0.0))
        n_gold = torch.zeros(E, dtype=torch.long, device=lg.device).index_add(0, example, (gold == 1).long())
        has_gold &= n_gold == 1
        terms.append(lse - gold_logit)
    per_example = torch.where(has_gold, 0.5 * (terms[0] + terms[1]), 0.0)
    return per_example.sum(), has_gold.sum()


def _choice_loss(scores: torch.Tensor, idx: tuple, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over each multiple-choice example's choices: one term per example.

    ``scores [M]`` of the task's choice-first tokens ``idx`` in row-major order, so each
    example's choices are consecutive and a new example starts at choice 0 (the packer keeps
    a group in one row). The gold choice is ``cls_labels`` on the group's first token; an
    example whose gold index names no choice adds no term.
    """
    choice = batch["choice_ids"][idx]
    group = torch.cumsum((choice == 0).long(), 0) - 1
    G = int(group[-1]) + 1
    gmax = torch.full((G,), float("-inf"), device=scores.device).scatter_reduce(0, group, scores.detach(), "amax")
    lse = torch.zeros(G, device=scores.device).index_add(0, group, (scores - gmax[group]).exp()).log() + gmax
    gold = batch["cls_labels"][idx][choice == 0]                      # [G]
    n_choices = torch.zeros(G, dtype=torch.long, device=scores.device).index_add(0, group, torch.ones_like(group))
    valid = (gold >= 0) & (gold < n_choices)
    is_gold = choice == gold.clamp_min(0)[group]
    gold_score = torch.zeros(G, device=scores.device).index_add(0, group, torch.where(is_gold, scores, 0.0))
    per_example = torch.where(valid, lse - gold_score, 0.0)
    return per_example.sum(), valid.sum()
