"""Encoder backbone + per-task heads (MT-DNN style) over packed batches.

Any Hugging Face encoder loaded with ``AutoModel`` (BERT, RoBERTa, the packaged MiniLM)
is the shared backbone; each task has its own small head:

- ``sequence_classification``: the hidden state of each example's *first* token (its
  ``[CLS]``) -> dense + tanh (a per-task pooler, as BERT's) -> dropout -> linear to classes;
- ``token_classification``: dropout -> linear to tags, on every token that carries a
  ``tag_labels`` id (the first sub-token of each word);
- ``span``: linear to (start, end) logits; softmax over each example's context tokens.

Packed rows hold several examples. They must not see each other: the 4-D block-diagonal
additive mask built by :func:`block_diagonal_mask` from ``segment_ids`` keeps attention
inside each example (a bool mask is honoured by SDPA but *added as 0/1* by the eager
attention of transformers 5, so the mask is additive float), and ``position_ids``
restart at 0 for each example. Packed forwards equal separate forwards (tested to 1e-5).

``forward(batch) -> TaskLoss(loss_sum[T], count[T])``: per task, the summed loss and the
number of loss terms (classification: examples; NER: tagged words; span: QA examples,
each term the mean of its start and end cross-entropies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("sequence_classification", "token_classification", "span")
HEADS_FILE, HEADS_META = "heads.safetensors", "heads.json"
_HEAD_BY_TYPE = {"classification": "sequence_classification", "ner": "token_classification",
                 "extractive_qa": "span"}
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
    if kind == "span":
        return []
    from megamt.data.formats import resolve_labels

    labels = resolve_labels(task_name, task_cfg)
    if not labels:
        raise HeadConfigError(
            f"tasks.{task_name}.labels: an encoder {kind} head needs its label set; list it in the "
            f"task config or give the task a train input to infer it from")
    return list(labels)


def block_diagonal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, L]`` example index per token (-1 = padding) -> additive mask ``[B, 1, L, L]``.

    0 where query and key belong to the same example, the dtype's minimum elsewhere.
    Padding tokens attend to padding only (never an all-masked row, so no NaN).
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = torch.zeros(same.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~same, torch.finfo(dtype).min)[:, None]


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
    parameter without gradient would only cost memory.
    """
    from transformers import AutoConfig, AutoModel

    attn = model_cfg.attn_implementation
    kwargs = {"attn_implementation": attn} if attn in ("sdpa", "eager") else {}
    if model_cfg.name_or_path:
        backbone = AutoModel.from_pretrained(model_cfg.name_or_path, **kwargs)
    else:
        raw = dict(model_cfg.from_config)
        backbone = AutoModel.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw), **kwargs)
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


class EncoderWithHeads(nn.Module):
    """Shared encoder + one head per task; tasks without a head (zero-shot generation
    tasks of another family) are refused at construction with the task named."""

    def __init__(self, config, backbone: nn.Module | None = None,
                 label_names: dict[str, list[str]] | None = None, head_dropout: float = 0.1):
        super().__init__()
        self.task_names = list(config.tasks)
        self.backbone = backbone if backbone is not None else build_backbone(config.model)
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
        """Hidden states [B, L, H] with every packed example isolated."""
        seg = batch["segment_ids"]
        dtype = next(self.backbone.parameters()).dtype
        kwargs = {"input_ids": batch["input_ids"],
                  "attention_mask": block_diagonal_mask(seg, dtype),
                  "position_ids": batch["position_ids"] + self.position_offset}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        elif getattr(self.backbone.config, "type_vocab_size", 0):
            kwargs["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return self.backbone(**kwargs).last_hidden_state

    def task_logits(self, hidden: torch.Tensor, batch: dict) -> dict[str, dict]:
        """Per task, the head's logits on the tokens that matter.

        classification: ``{"index": (b, t) of each example's first token, "logits": [N, C]}``;
        ner: ``{"index": every token of the task, "logits": [N, tags]}``;
        span: ``{"index": every token of the task, "logits": [N, 2]}``.
        """
        task_ids, pos = batch["task_ids"], batch["position_ids"]
        out = {}
        for t, name in enumerate(self.task_names):
            if name not in self.heads:
                continue
            owned = task_ids == t
            if self.head_kinds[name] == "sequence_classification":
                owned = owned & (pos == 0)
            idx = owned.nonzero(as_tuple=True)
            if idx[0].numel() == 0:
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
        # Heads of tasks absent from this micro-batch get no gradient (None): DeepSpeed ZeRO
        # treats that as zero. Touching their parameters here to force a zero gradient would
        # read ZeRO-3's empty partitions outside the heads' forward and break their backward.
        for name, res in self.task_logits(hidden, batch).items():
            t = self.task_names.index(name)
            kind = self.head_kinds[name]
            logits, idx = res["logits"].float(), res["index"]
            if kind == "span":
                s, c = _span_loss(logits, idx, batch)
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
