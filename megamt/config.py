"""One typed config tree for megamt.

The tree is made of dataclasses. It is loaded from YAML, then dotted CLI overrides
(``data.seq_len=1024``) are applied (CLI > YAML > defaults). Unknown keys, wrong types
and impossible values are errors that name the dotted key; all problems are collected
and raised together as one :class:`ConfigError`.

Functions receive their section (``DataConfig``, ``TrainConfig`` ...), not the root.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

TASK_TYPES = ("classification", "extractive_qa", "ner", "summarization", "instruction",
              "multiple_choice", "tagging", "generative_qa")
JOINABLE_FIELDS = ("text", "text_pair", "context", "question", "document", "summary", "prompt", "response")
INPUT_FORMATS = ("auto", "tsv", "csv", "jsonl", "squad", "conll", "hf_disk", "hf")
# CoNLL-2003 columns (word POS chunk NER); CoNLL-2000 has the first three in the same places
TAG_COLUMNS = {"pos": 1, "chunk": 2, "ner": 3}


class ConfigError(ValueError):
    """A configuration problem; the message names every offending dotted key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid megamt config:\n  - " + "\n  - ".join(self.problems))


# --------------------------------------------------------------------------- sections


@dataclass
class InputConfig:
    """Where one split of one task comes from."""

    path: str = ""
    """File or folder. Relative paths are resolved against the spec file's folder."""
    format: str = "auto"
    """tsv | csv | jsonl | squad | conll | hf_disk (save_to_disk folder) | hf (load_dataset) | auto (by suffix:
    .tsv .csv .jsonl/.ndjson .json (SQuAD) .conll/.iob/.bio and eng.train-style names (CoNLL), a folder (hf_disk))."""
    hf_split: Optional[str] = None
    """For ``hf``/``hf_disk``: which split of a DatasetDict to read."""
    hf_name: Optional[str] = None
    """For ``hf``: the builder name or data-file type given to ``datasets.load_dataset``."""
    quoting: Optional[bool] = None
    """TSV/CSV: honour quote characters (``"a, b"`` is one field). Unset: on for csv (quoted commas are
    the norm there), off for tsv (GLUE's text holds bare quotes)."""
    columns: Optional[list[str]] = None
    """TSV/CSV without a header row (AG News, Yelp, DBpedia): the names of its columns, in order
    (``[label, title, description]``); every line is then data. Map them in the task's ``fields``."""
    max_examples: Optional[int] = None
    """Read at most this many examples (the first ones, in file order)."""
    tag_column: Optional[int | str] = None
    """CoNLL column files (tagging, ner): the column holding the tags, a 0-based index (``"1"``,
    ``"-1"`` = last) or a name of the CoNLL-2003 / CoNLL-2000 layout ``word POS chunk [NER]``:
    ``pos`` (1), ``chunk`` (2), ``ner`` (3). Unset: the last column."""

    def problems(self, key: str) -> list[str]:
        out = []
        if isinstance(self.tag_column, str) and self.tag_column not in TAG_COLUMNS:
            try:
                int(self.tag_column)
            except ValueError:
                out.append(f"{key}.tag_column: {self.tag_column!r} is neither a column index nor one of "
                           f"{sorted(TAG_COLUMNS)}")
        if not self.path:
            out.append(f"{key}.path: required")
        if self.format not in INPUT_FORMATS:
            out.append(f"{key}.format: {self.format!r} is not one of {INPUT_FORMATS}")
        if self.max_examples is not None and self.max_examples < 1:
            out.append(f"{key}.max_examples: must be >= 1, got {self.max_examples}")
        if self.columns is not None:
            if not self.columns or any(not str(c).strip() for c in self.columns):
                out.append(f"{key}.columns: a list of non-empty column names, got {self.columns}")
            elif len(set(self.columns)) != len(self.columns):
                out.append(f"{key}.columns: a column is named twice in {self.columns}")
            if self.format not in ("auto", "tsv", "csv"):
                out.append(f"{key}.columns: only for tsv/csv inputs (format is {self.format!r})")
        return out


@dataclass
class TaskConfig:
    """One task: its type, inputs per split, field mapping, labels and templates."""

    task_type: str = "classification"
    """classification | extractive_qa | ner | summarization | instruction | multiple_choice |
    tagging (POS, chunking: one tag per word) | generative_qa (free-text answers)."""
    inputs: dict[str, InputConfig] = field(default_factory=dict)
    """Split name (train, validation, test) -> input."""
    fields: dict[str, Union[str, list[str]]] = field(default_factory=dict)
    """Canonical field -> field name in the source (default: the canonical name itself). Canonical
    fields by type: classification: text, text_pair (optional), label; extractive_qa: context,
    question, answers (SQuAD JSON needs none); ner: tokens, tags (CoNLL needs none);
    summarization: document, summary; instruction: prompt, response; multiple_choice: question,
    context (optional), choices (a list field, or numbered fields joined by commas:
    ``"sol1,sol2"``), label (0-based index, letter A-Z, or a choice's own label);
    tagging: tokens, tags (CoNLL needs none); generative_qa: question, context (optional),
    answers (a string or a list of strings). A text field may join several source fields with a
    space: ``text: [title, description]``."""
    labels: Optional[list[str]] = None
    """Label set (classification) or entity types / tag set (ner). Inferred from train data when unset."""
    verbalizers: Optional[dict[str, str]] = None
    """classification: label -> target text for text-to-text (default: the label itself)."""
    templates: list[str] = field(default_factory=list)
    """Template names from the built-in registry or inline templates with {field} slots;
    empty = every built-in template of the task type."""
    weight: Optional[float] = None
    """Explicit mixture weight (mixture.strategy=explicit), or a multiplier otherwise."""
    head: str = "auto"
    """Encoder backbones: auto | sequence_classification | token_classification | span | multiple_choice."""
    zero_shot: bool = False
    """Held out of training: only evaluated (zero-shot transfer). Causal LMs score its verbalised
    labels / generate; encoders predict it with the trained head of the same label set."""
    instruction: Optional[str] = None
    """Free-text instruction prepended to prompts of this task (used for unseen tasks)."""

    def problems(self, key: str) -> list[str]:
        out = []
        if self.task_type not in TASK_TYPES:
            out.append(f"{key}.task_type: {self.task_type!r} is not one of {TASK_TYPES}")
        for split, inp in self.inputs.items():
            out += inp.problems(f"{key}.inputs.{split}")
        if self.weight is not None and (self.weight < 0 or not math.isfinite(self.weight)):
            out.append(f"{key}.weight: must be a finite number >= 0, got {self.weight}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            out.append(f"{key}.labels: labels must be unique")
        if self.head not in ("auto", "sequence_classification", "token_classification", "span", "multiple_choice"):
            out.append(f"{key}.head: {self.head!r} is not a known head")
        for name, src in self.fields.items():
            if isinstance(src, list) and (name not in JOINABLE_FIELDS or not src):
                out.append(f"{key}.fields.{name}: a list of source fields (joined with a space) is only for the "
                           f"text fields {list(JOINABLE_FIELDS)}, and must not be empty")
        return out


@dataclass
class DataConfig:
    """Shards, tokenizer, packing and the input pipeline."""

    shards_dir: str = "runs/shards"
    """Folder of webdataset shards and their manifest.json (written by build-shards)."""
    tokenizer: str = ""
    """Local folder of a Hugging Face tokenizer."""
    seq_len: int = 512
    """Tokens per packed sequence (encoder-decoders: per encoder row, the prompts)."""
    target_len: int = 128
    """Encoder-decoders (model.family=seq2seq): decoder tokens per packed row, the targets
    with their EOS. Each row holds the same examples on both sides; a row is closed when
    either side would overflow. Unused by the other families."""
    pack_buffer: int = 64
    """Examples held by the best-fit packer before it must emit a sequence."""
    overlong: Literal["truncate", "reject"] = "truncate"
    """An example longer than seq_len: truncate (prompt from the left) or reject; both are counted.
    Encoder-decoders: also a target longer than target_len (truncated from the right), counted apart."""
    qa_doc_stride: Optional[int] = None
    """Encoder extractive QA longer than seq_len (overlong=truncate): split into windows over
    the context overlapping by this many tokens, as Hugging Face's doc_stride; training keeps
    the windows holding the answer, evaluation takes the best span over all windows. 0 =
    truncate like any other example; unset = min(128, seq_len // 4)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad input rows: raise naming file/line, or skip and count per reason in the manifest."""
    shard_max_examples: int = 10000
    """A shard holds at most this many examples ..."""
    shard_max_bytes: int = 64 * 1024 * 1024
    """... and at most this many bytes."""
    build_workers: int = 1
    """Processes for build-shards (one task/split per process)."""
    num_workers: int = 0
    """DataLoader workers per rank."""
    seed: int = 1234
    """Seed of template choice, stream shuffling and mixture sampling."""
    shuffle_buffer: int = 1000
    """Training streams shuffle windows of consecutive shards (in each epoch's shuffled shard
    order) holding at least this many examples, per task and rank (memory: about this many examples per task)."""
    prefetch_windows: bool = True
    """Training streams read their next shuffle window (shard bytes, decoding, shuffle) in a
    background thread while the current one is consumed, so reading overlaps the step; the
    order is the same either way (memory: about two windows per task)."""
    objective: Literal["auto", "causal_lm", "encoder", "seq2seq"] = "auto"
    """What packed batches carry: text-to-text in one sequence (causal LM), encoder inputs with
    head labels, or prompts and targets in two aligned rows (seq2seq). auto: by model family."""

    def doc_stride(self) -> int:
        """``qa_doc_stride`` resolved (unset: min(128, seq_len // 4))."""
        return min(128, self.seq_len // 4) if self.qa_doc_stride is None else self.qa_doc_stride

    def problems(self, key: str) -> list[str]:
        out = []
        if self.seq_len < 8:
            out.append(f"{key}.seq_len: must be >= 8, got {self.seq_len}")
        if self.target_len < 2:
            out.append(f"{key}.target_len: must be >= 2, got {self.target_len}")
        if self.pack_buffer < 1:
            out.append(f"{key}.pack_buffer: must be >= 1, got {self.pack_buffer}")
        if self.qa_doc_stride is not None and not 0 <= self.qa_doc_stride < self.seq_len // 2:
            out.append(f"{key}.qa_doc_stride: must be >= 0 and < seq_len / 2 ({self.seq_len // 2}), "
                       f"got {self.qa_doc_stride}")
        if self.shard_max_examples < 1:
            out.append(f"{key}.shard_max_examples: must be >= 1")
        if self.shard_max_bytes < 1024:
            out.append(f"{key}.shard_max_bytes: must be >= 1024")
        if self.build_workers < 1:
            out.append(f"{key}.build_workers: must be >= 1")
        if self.num_workers < 0:
            out.append(f"{key}.num_workers: must be >= 0")
        if self.shuffle_buffer < 1:
            out.append(f"{key}.shuffle_buffer: must be >= 1")
        return out


@dataclass
class PhaseConfig:
    """A curriculum phase: from ``start_step`` on, sample these tasks with these weights."""

    start_step: int = 0
    """First optimizer step of the phase (the first phase starts at 0)."""
    tasks: list[str] = field(default_factory=list)
    """Tasks active in this phase (empty = all training tasks)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Per-task weight overrides in this phase (else the strategy's rates)."""


DYNAMIC_METHODS = ("exp3", "group_dro", "target_gap")


@dataclass
class DynamicMixtureConfig:
    """Loss-driven mixing (``mixture.strategy=dynamic``): rates that follow training.

    Every method works from numbers that are already identical on every rank (the step's
    all-reduced per-task mean losses; the evaluation results), so every rank computes the
    same rates without another collective. Rates are ``min_prob + (1 - K * min_prob) * q``
    over the K tasks active in the curriculum phase, ``q`` the method's distribution.
    """

    method: Literal["exp3", "group_dro", "target_gap"] = "exp3"
    """exp3: Online Data Mixing (Albalak et al. 2023), a multi-armed bandit over tasks whose
    reward is the task's training loss (smoothed, importance-weighted), with a decaying
    exploration rate; group_dro: exponentiated-gradient task weights on the per-task losses
    (Sagawa et al. 2020) used as sampling rates; target_gap: rates proportional to each task's
    relative gap to a target score, updated at every evaluation (Gottumukkala et al. 2020)."""
    every: int = 1
    """exp3, group_dro: optimizer steps between rate updates (the losses of the steps in
    between are averaged). target_gap updates at every validation point (train.eval_every)."""
    min_prob: float = 0.02
    """Floor of every active task's rate (min_prob * active tasks must be <= 1)."""
    warmup_steps: int = 0
    """The initial rates (``init``) hold for this many optimizer steps."""
    init: Literal["uniform", "proportional", "capped", "temperature", "explicit"] = "uniform"
    """Starting distribution (and, for exp3 and group_dro, the prior the updates multiply):
    uniform or one of the static strategies (with mixture.temperature / mixture.cap; a task's
    ``weight`` multiplies its rate, or is the rate with ``explicit``)."""
    smoothing: float = 0.9
    """exp3: EMA factor of the reward estimate (the paper's alpha)."""
    eta: float = 0.1
    """group_dro: step size of the exponentiated-gradient update of the task weights."""
    target_signal: Literal["metric", "loss"] = "metric"
    """target_gap: metric = each task's primary validation metric (needs eval.during_training;
    gap = (target - score) / target); loss = its validation loss (gap = (loss - target) / target)."""
    targets: dict[str, float] = field(default_factory=dict)
    """target_gap: task -> target (metric on the 0-100 scale, or loss). Tasks not listed take
    theirs from ``targets_from``."""
    targets_from: list[str] = field(default_factory=list)
    """target_gap: result files to read targets from: a ``transfer.json`` of ``megamt experiment
    transfer`` (the single-task score of each task), or an ``eval.json`` / ``run_summary.json``
    (the primary metric, or ``eval_loss`` with target_signal=loss). Later files win."""

    def problems(self, key: str, task_names: list[str], n_train: int) -> list[str]:
        out = []
        if self.every < 1:
            out.append(f"{key}.every: must be >= 1, got {self.every}")
        if self.warmup_steps < 0:
            out.append(f"{key}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not (0 <= self.min_prob and self.min_prob * max(1, n_train) <= 1):
            out.append(f"{key}.min_prob: must be in [0, 1 / training tasks] = [0, {1 / max(1, n_train):.4g}], "
                       f"got {self.min_prob}")
        if not 0 <= self.smoothing < 1:
            out.append(f"{key}.smoothing: must be in [0, 1), got {self.smoothing}")
        if not (self.eta > 0 and math.isfinite(self.eta)):
            out.append(f"{key}.eta: must be a finite number > 0, got {self.eta}")
        for t, v in self.targets.items():
            if t not in task_names:
                out.append(f"{key}.targets.{t}: unknown task")
            elif not (math.isfinite(v) and (v > 0 if self.target_signal == "loss" else v >= 0)):
                out.append(f"{key}.targets.{t}: must be a finite number "
                           f"{'> 0 (a loss)' if self.target_signal == 'loss' else '>= 0'}, got {v}")
        return out


@dataclass
class MixtureConfig:
    """How tasks are sampled into the packed stream."""

    strategy: Literal["explicit", "proportional", "capped", "temperature", "dynamic"] = "temperature"
    """explicit (task weights) | proportional (to size) | capped (T5 examples-proportional, cap K) |
    temperature | dynamic (loss-driven rates, see ``dynamic``)."""
    temperature: float = 2.0
    """Temperature T: rates proportional to size ** (1/T)."""
    cap: int = 2 ** 16
    """Cap K of the capped strategy (examples)."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Curriculum / progressive introduction of tasks, by step. Under ``dynamic`` a phase fixes
    the task set and the method sets the rates within it (phase ``weights`` are refused)."""
    level: Literal["example", "batch"] = "example"
    """example: every example is drawn from the mixture, so the tasks share packed rows;
    batch: every micro-batch holds one task, drawn from the mixture (MT-DNN's scheme; the
    ranks' micro-batches of one step may hold different tasks)."""
    dynamic: DynamicMixtureConfig = field(default_factory=DynamicMixtureConfig)
    """Loss-driven rates (``strategy: dynamic``)."""

    def problems(self, key: str, task_names: list[str], n_train: int | None = None) -> list[str]:
        out = []
        if self.temperature <= 0:
            out.append(f"{key}.temperature: must be > 0, got {self.temperature}")
        if self.cap < 1:
            out.append(f"{key}.cap: must be >= 1, got {self.cap}")
        last = -1
        for i, ph in enumerate(self.phases):
            if ph.start_step <= last:
                out.append(f"{key}.phases.{i}.start_step: phases must start at increasing steps")
            last = ph.start_step
            if len(set(ph.tasks)) != len(ph.tasks):
                out.append(f"{key}.phases.{i}.tasks: a task is listed twice")
            for t in list(ph.tasks) + list(ph.weights):
                if t not in task_names:
                    out.append(f"{key}.phases.{i}: unknown task {t!r}")
            for t, w in ph.weights.items():
                if w < 0:
                    out.append(f"{key}.phases.{i}.weights.{t}: must be >= 0")
            if self.strategy == "dynamic" and ph.weights:
                out.append(f"{key}.phases.{i}.weights: a phase fixes the task set under strategy=dynamic; the "
                           f"method sets the rates (drop the weights or use a static strategy)")
        if self.phases and self.phases[0].start_step != 0:
            out.append(f"{key}.phases.0.start_step: the first phase must start at step 0")
        if self.strategy == "dynamic":
            out += self.dynamic.problems(f"{key}.dynamic", task_names,
                                         len(task_names) if n_train is None else n_train)
        return out


@dataclass
class LoraConfig:
    """LoRA adapters through peft."""

    enabled: bool = False
    """Train LoRA adapters instead of the full backbone (merged into the weights at export)."""
    r: int = 8
    """Rank of the adapters."""
    alpha: int = 16
    """Scaling numerator: the adapter update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: Optional[list[str]] = None
    """None = peft's default for the architecture."""


@dataclass
class ModelConfig:
    """The shared backbone."""

    name_or_path: Optional[str] = None
    """Local folder of a Hugging Face model. None = build from ``from_config``."""
    family: Literal["auto", "causal_lm", "encoder", "seq2seq"] = "auto"
    """causal_lm (AutoModelForCausalLM), encoder (AutoModel + task heads) or seq2seq
    (AutoModelForSeq2SeqLM: T5, FLAN-T5, mT5, BART, mBART). auto: seq2seq when the model's
    config says ``is_encoder_decoder``, encoder for BERT-like types, else causal_lm."""
    from_config: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config keys for a model built from scratch (needs model_type)."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 with flash-attn on CUDA, else sdpa) | sdpa | eager | flex_attention | flash_attention_2."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute each decoder layer's activations in the backward instead of keeping them.
    auto: on when megamt.plan's memory estimate says the activations of a micro-batch would
    not fit on the device next to the model states (decided at start-up, printed with the
    derived numbers; off for small models). true / false: always / never."""
    fused_loss: bool = True
    """Per-task loss through megamt.kernels.fused_linear_task_cross_entropy (causal LMs; the
    decoder of encoder-decoders)."""
    loss_chunk_tokens: int = 2048
    """Tokens per chunk of the fused loss."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def problems(self, key: str) -> list[str]:
        out = []
        if self.name_or_path is None and not self.from_config:
            out.append(f"{key}: set name_or_path (a local model folder) or from_config")
        if self.from_config and "model_type" not in self.from_config:
            out.append(f"{key}.from_config.model_type: required when building from a config")
        if self.loss_chunk_tokens < 1:
            out.append(f"{key}.loss_chunk_tokens: must be >= 1")
        return out


@dataclass
class TrainConfig:
    """The training loop."""

    run_dir: str = "runs/default"
    """Checkpoints (checkpoints/), train_log.jsonl and TensorBoard logs (tensorboard/) go here."""
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Packed sequences per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient methods set their own: one per task)."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), reached after the warm-up."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio at max_steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to lr over this many steps."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warm-up."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    seed: int = 0
    """Seed of model initialisation and dropout."""
    ds_config: str = "zero3"
    """A template in ds_configs/ (zero3, zero3_offload, zero2, zero2_offload) or a path to a DeepSpeed JSON."""
    log_every: int = 10
    """Plain log line every N steps (also the TensorBoard scalar cadence)."""
    eval_every: int = 0
    """Validation loss every N steps (0 = only at the end)."""
    eval_batches: int = 8
    """Micro-batches per task for validation loss."""
    eval_at_start: bool = True
    """Validation loss before the first step too (the start of the loss table)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are removed after a new one is written."""
    elastic_resume: bool = True
    """Resume a checkpoint written by another number of ranks: weights, optimizer and
    scheduler through a DeepSpeed universal checkpoint (``step_N/universal/``, made by
    ``megamt convert-checkpoint``); the data streams restart reshuffled, so the examples after
    the checkpoint differ from an uninterrupted run's (said at start-up). False: refuse."""
    elastic_convert_max_gb: float = 20.0
    """Elastic resume of a checkpoint of at most this many GB that is not converted yet: rank 0
    converts it at start-up (several processes) while the other ranks wait for the completion
    marker. A larger one is refused with the `megamt convert-checkpoint` command to run
    beforehand (at 8B-70B scale a planned, offline step). 0 = never convert at start-up."""
    checkpoint_timeout_s: int = 3600
    """Timeout (s) of the collectives around checkpoint I/O (saving, rank 0's rename and
    pruning; DeepSpeed's own barriers while it saves) and of the wait for a universal
    checkpoint's completion marker. dist_timeout_s stays the limit everywhere else."""
    max_nonfinite_steps: int = 5
    """Consecutive non-finite steps before the run stops."""
    stop_at_step: int = 0
    """Checkpoint and exit after this step (a time slice of a longer run; the schedule still
    follows max_steps, and the next launch resumes). 0 = run to max_steps."""
    progress_bar: bool = True
    """tqdm bar with ETA on rank 0 (only when stdout is a terminal)."""
    dist_timeout_s: int = 600
    """Timeout of collectives (s): a dead rank ends the job instead of hanging it."""
    prefetch: bool = True
    """Build the next optimizer step's micro-batches in a background thread while this step
    runs (into pinned memory on CUDA). Checkpoints still hold the data state of the batches
    consumed, not of the prefetched ones, so resume stays exact. false: build them in the step."""
    grad_comm_dtype: Literal["fp32", "model"] = "fp32"
    """Dtype of the gradient reduce-scatter / all-reduce (DeepSpeed's ``communication_data_type``):
    fp32 (sums of bf16 gradients over many ranks lose their low bits) or model (the model's
    dtype: half the gradient traffic, DeepSpeed's default)."""

    def tokens_per_step(self, seq_len: int, world_size: int) -> int:
        # micro_batch sequences * seq_len tokens * accumulation * ranks
        return self.micro_batch_size * seq_len * self.grad_accum * world_size

    def problems(self, key: str) -> list[str]:
        out = []
        for name in ("max_steps", "micro_batch_size", "grad_accum", "keep_last", "eval_batches", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                out.append(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "eval_every", "save_every", "warmup_steps", "stop_at_step"):
            if getattr(self, name) < 0:
                out.append(f"{key}.{name}: must be >= 0")
        if self.lr <= 0:
            out.append(f"{key}.lr: must be > 0")
        if self.grad_clip < 0:
            out.append(f"{key}.grad_clip: must be >= 0")
        if self.dist_timeout_s < 1:
            out.append(f"{key}.dist_timeout_s: must be >= 1")
        if self.checkpoint_timeout_s < 1:
            out.append(f"{key}.checkpoint_timeout_s: must be >= 1")
        if self.elastic_convert_max_gb < 0:
            out.append(f"{key}.elastic_convert_max_gb: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"{key}.min_lr_ratio: must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"{key}.betas: two numbers in [0, 1)")
        return out


GRADIENT_METHODS = ("none", "sum", "pcgrad", "cagrad", "mgda", "aligned_mtl", "gradvac")
LOSS_WEIGHTINGS = ("equal", "static", "uncertainty", "dwa", "gradnorm", "famo")


@dataclass
class GradientConfig:
    """Loss balancing, gradient surgery and interference monitoring."""

    method: str = "none"
    """none | sum | pcgrad | cagrad | mgda | aligned_mtl | gradvac. Anything but none runs
    one task-homogeneous micro-batch per task in each optimizer step (any ZeRO stage 1-3)."""
    loss_weighting: str = "equal"
    """equal | static | uncertainty | dwa | gradnorm | famo. GradNorm takes its per-task
    gradient norms from G where a step measures it, else from the shared hidden states."""
    static_weights: dict[str, float] = field(default_factory=dict)
    """static: task -> loss weight (tasks not listed: 1)."""
    monitor_every: int = 0
    """Measure the task-gradient cosine matrix every N steps (0 = never)."""
    monitor_sketch_dim: int = 0
    """Monitoring-only steps (method none): 0 = the exact Gram matrix from a [train tasks,
    n_local] fp32 snapshot buffer (allocated for the step, then freed); k > 0 = a random-
    projection estimate (CountSketch, a sparse Johnson-Lindenstrauss transform) from a
    k-dimensional projection of each task's gradient partition: T*k float64 numbers per rank,
    one all-reduce of T x k. Unbiased; entry (i, j) has standard deviation at most
    sqrt((G_ii G_jj + G_ij^2) / k): a cosine's standard error is about sqrt(2/k) (k=1024: 0.044).
    Gradient methods (method != none) always use the exact buffer."""
    cagrad_c: float = 0.5
    """CAGrad: radius c of the conflict-averse ball (0 = mean gradient)."""
    gradnorm_alpha: float = 1.5
    """GradNorm: asymmetry alpha (strength of the pull towards equal training rates)."""
    dwa_temperature: float = 2.0
    """DWA: softmax temperature of the loss ratios."""
    famo_lr: float = 0.025
    """FAMO: Adam learning rate of the task logits."""
    gradvac_beta: float = 0.01
    """GradVac: EMA rate of the cosine targets, in (0, 1]."""
    seed: int = 0
    """Seed of PCGrad's / GradVac's random projection order (the same on every rank)."""
    balancer_lr: float = 0.025
    """Adam learning rate of the learned loss weights (uncertainty log-variances, GradNorm weights)."""
    dwa_window: int = 1
    """DWA: optimizer steps per period whose average task losses form the ratio L(k-1)/L(k-2)."""
    famo_gamma: float = 0.001
    """FAMO: weight decay of the task logits."""
    grad_backend: str = "auto"
    """Kernels of the Gram/combine passes: auto (Triton on CUDA, torch elsewhere) | torch | triton."""
    affinity_every: int = 0
    """Measure the inter-task affinity (TAG) every N steps (0 = never): on those steps one
    task-homogeneous micro-batch per task, then for each task i the lookahead
    ``Z[i->j] = 1 - L_j(theta - lr g_i) / L_j(theta)`` on every task j's micro-batch
    (TensorBoard ``affinity/<i>/<j>``, the running means in ``<run_dir>/affinity.json``), and
    the first-order ``lr * G[i,j] / L_j`` from the Gram matrix (``affinity_first_order/<i>/<j>``).
    See megamt.gradients.affinity."""
    affinity_lr: Optional[float] = None
    """Step size of the affinity lookahead (an SGD step); unset = train.lr."""
    affinity_lookahead: bool = True
    """Run the lookahead forwards (T * (T + 1) forwards without gradients per measuring step;
    needs ZeRO-3). false: only the first-order affinity from the Gram matrix (any ZeRO stage)."""

    def problems(self, key: str, task_names: list[str]) -> list[str]:
        out = []
        for name in ("cagrad_c", "gradnorm_alpha", "famo_gamma"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                out.append(f"{key}.{name}: must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("dwa_temperature", "famo_lr", "balancer_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                out.append(f"{key}.{name}: must be a finite number > 0, got {getattr(self, name)}")
        if not 0 < self.gradvac_beta <= 1:
            out.append(f"{key}.gradvac_beta: must be in (0, 1], got {self.gradvac_beta}")
        if self.dwa_window < 1:
            out.append(f"{key}.dwa_window: must be >= 1, got {self.dwa_window}")
        if self.grad_backend not in ("auto", "torch", "triton"):
            out.append(f"{key}.grad_backend: {self.grad_backend!r} is not one of auto, torch, triton")
        if self.method not in GRADIENT_METHODS:
            out.append(f"{key}.method: {self.method!r} is not one of {GRADIENT_METHODS}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            out.append(f"{key}.loss_weighting: {self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        for t, w in self.static_weights.items():
            if t not in task_names:
                out.append(f"{key}.static_weights.{t}: unknown task")
            elif w < 0:
                out.append(f"{key}.static_weights.{t}: must be >= 0")
        if self.monitor_every < 0:
            out.append(f"{key}.monitor_every: must be >= 0")
        if self.monitor_sketch_dim < 0:
            out.append(f"{key}.monitor_sketch_dim: must be >= 0 (0 = exact Gram), got {self.monitor_sketch_dim}")
        if self.affinity_every < 0:
            out.append(f"{key}.affinity_every: must be >= 0")
        if self.affinity_lr is not None and not (self.affinity_lr > 0 and math.isfinite(self.affinity_lr)):
            out.append(f"{key}.affinity_lr: must be a finite number > 0, got {self.affinity_lr}")
        return out


META_METHODS = ("none", "reptile", "fomaml")


@dataclass
class MetaConfig:
    """First-order meta-learning (megamt.gradients.meta): each optimizer step is one *outer* step
    on one task drawn by the mixture (the same on every rank), made of ``inner_steps`` inner
    updates on that task's micro-batches, on each rank's ZeRO-1, 2 or 3 partitions (not stage 0)."""

    method: str = "none"
    """none | reptile | fomaml. reptile: theta <- theta0 + eps (theta_k - theta0). fomaml (first-order
    MAML): the gradient of one more (query) micro-batch at the adapted theta_k, applied at theta0 by
    DeepSpeed's optimizer (train.lr, train.lr_schedule, train.grad_clip)."""
    inner_steps: int = 4
    """Inner updates per outer step, one micro-batch (train.micro_batch_size rows per rank) each."""
    inner_lr: float = 1e-3
    """Learning rate of the inner updates (constant; no clipping, no weight decay inside a task)."""
    inner_optimizer: str = "sgd"
    """sgd | adam. adam keeps its moments across outer steps (in the checkpoint)."""
    inner_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    """Inner Adam's betas (beta1 = 0: no momentum inside a task, as in Nichol et al. 2018)."""
    outer_lr: float = 0.1
    """Reptile's outer step size eps, in (0, 1] (fomaml's outer learning rate is train.lr)."""
    outer_lr_schedule: str = "linear"
    """Reptile's eps over the run: linear (annealed to 0 at train.max_steps, the paper's) | constant."""
    tasks_per_step: int = 1
    """Batched Reptile: tasks per outer step, trained one after another from the same theta0; the
    update moves by eps times the mean of their displacements (fomaml: 1 only)."""
    seed: int = 0
    """Seed of the outer steps' task draws (identical on every rank)."""

    def problems(self, key: str) -> list[str]:
        out = []
        if self.tasks_per_step < 1:
            out.append(f"{key}.tasks_per_step: must be >= 1, got {self.tasks_per_step}")
        elif self.tasks_per_step > 1 and self.method == "fomaml":
            out.append(f"{key}.tasks_per_step={self.tasks_per_step}: batched outer steps are defined for reptile "
                       f"only (fomaml takes one task per outer step); set it to 1")
        if self.method not in META_METHODS:
            out.append(f"{key}.method: {self.method!r} is not one of {META_METHODS}")
        if self.inner_steps < 1:
            out.append(f"{key}.inner_steps: must be >= 1, got {self.inner_steps}")
        if not (self.inner_lr > 0 and math.isfinite(self.inner_lr)):
            out.append(f"{key}.inner_lr: must be a finite number > 0, got {self.inner_lr}")
        if self.inner_optimizer not in ("sgd", "adam"):
            out.append(f"{key}.inner_optimizer: {self.inner_optimizer!r} is not one of sgd, adam")
        if len(self.inner_betas) != 2 or not all(0 <= b < 1 for b in self.inner_betas):
            out.append(f"{key}.inner_betas: two numbers in [0, 1), got {self.inner_betas}")
        if not 0 < self.outer_lr <= 1:
            out.append(f"{key}.outer_lr: Reptile's eps must be in (0, 1], got {self.outer_lr}")
        if self.outer_lr_schedule not in ("linear", "constant"):
            out.append(f"{key}.outer_lr_schedule: {self.outer_lr_schedule!r} is not one of linear, constant")
        return out


@dataclass
class EvalConfig:
    """Evaluation (``megamt eval``, ``model.evaluate``, metrics during training)."""

    max_new_tokens: int = 64
    """Bound on greedy generation (tokens); a generation cut there is counted in the results."""
    num_beams: int = 1
    """Encoder-decoders: beam width of generation (1 = greedy). Causal LMs decode greedily."""
    batch_size: int = 8
    """Examples (or label choices, for rank classification) per forward."""
    max_examples: Optional[int] = None
    """Per task (the first ones)."""
    split: str = "validation"
    """The split evaluated (a key of each task's inputs)."""
    tasks: list[str] = field(default_factory=list)
    """Tasks to evaluate (empty = every task with an input for ``split``)."""
    metrics: dict[str, list[str]] = field(default_factory=dict)
    """Per task, the metrics to report (empty = every metric of its type; see megamt.eval.metrics)."""
    max_answer_tokens: int = 30
    """Encoder span heads: the longest answer (tokens) considered when decoding QA spans."""
    all_templates: bool = False
    """Causal LMs: score every template that fits each task (its own and the task type's
    built-ins), not only the first: per-template metrics, and ``metrics`` = their mean with
    std / min / max beside it (prompt robustness). Costs one evaluation per template."""
    during_training: bool = False
    """Also compute per-task metrics (TensorBoard ``eval/<task>/<metric>``, ``eval.json`` under
    ``<run_dir>/eval/step_N``) at every validation point of training (``train.eval_every`` and
    the end). Generation is slow on CPUs: bound it with ``eval.max_examples``."""
    max_live_parameters: int = 0
    """ZeRO-3 evaluation (validation and metrics during training, ``megamt eval`` under a
    launcher): parameter elements gathered at once. 0: two ZeRO-3 prefetch buckets (then the
    largest module plus what is being prefetched: the memory-safe choice at 70B); N > 0: at
    most N; -1: the ds_config's own ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance``
    (1e9 in the templates: measured, the training engine then keeps the whole model gathered
    on every rank during evaluation -- 3x faster on the CPU, where it fits; BENCHMARKS.md,
    "Evaluation memory")."""

    def problems(self, key: str, task_names: list[str]) -> list[str]:
        out = []
        if self.max_live_parameters < -1:
            out.append(f"{key}.max_live_parameters: 0 (two prefetch buckets), N > 0 or -1 (the ds_config's own), "
                       f"got {self.max_live_parameters}")
        for name in ("max_new_tokens", "num_beams", "batch_size", "max_answer_tokens"):
            if getattr(self, name) < 1:
                out.append(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_examples is not None and self.max_examples < 1:
            out.append(f"{key}.max_examples: must be >= 1, got {self.max_examples}")
        for t in list(self.tasks) + list(self.metrics):
            if t not in task_names:
                out.append(f"{key}: unknown task {t!r} (tasks: {task_names})")
        return out


@dataclass
class MultitaskConfig:
    """The root of the config tree.

    Besides the sections, the constructor accepts the flat names users know from
    multitask libraries, as aliases of one field each (they are not stored twice):
    ``model_name_or_path`` -> ``model.name_or_path``,
    ``task_sampling_strategy`` -> ``mixture.strategy``,
    ``loss_weighting_strategy`` -> ``gradients.loss_weighting``,
    ``gradient_method`` -> ``gradients.method``.
    """

    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)

    def __init__(self, tasks=None, model=None, data=None, mixture=None, train=None, gradients=None,
                 eval=None, meta=None, **aliases):
        self.tasks = dict(tasks or {})
        self.model = model or ModelConfig()
        self.data = data or DataConfig()
        self.mixture = mixture or MixtureConfig()
        self.train = train or TrainConfig()
        self.gradients = gradients or GradientConfig()
        self.eval = eval or EvalConfig()
        self.meta = meta or MetaConfig()
        for name, value in aliases.items():
            if name not in ALIASES:
                raise ConfigError([f"{name}: unknown config key (sections: {[f.name for f in dataclasses.fields(self)]}, "
                                   f"aliases: {sorted(ALIASES)})"])
            section, attr = ALIASES[name]
            setattr(getattr(self, section), attr, value)
        validate(self)

    # Derived numbers -------------------------------------------------------------
    @property
    def train_task_names(self) -> list[str]:
        return [n for n, t in self.tasks.items() if not t.zero_shot]

    def tokens_per_step(self, world_size: int) -> int:
        return self.train.tokens_per_step(self.data.seq_len, world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


ALIASES = {
    "model_name_or_path": ("model", "name_or_path"),
    "task_sampling_strategy": ("mixture", "strategy"),
    "loss_weighting_strategy": ("gradients", "loss_weighting"),
    "gradient_method": ("gradients", "method"),
}


def _alias_property(section: str, attr: str):
    return property(lambda self: getattr(getattr(self, section), attr),
                    lambda self, v: setattr(getattr(self, section), attr, v))


for _name, (_section, _attr) in ALIASES.items():
    setattr(MultitaskConfig, _name, _alias_property(_section, _attr))


def validate(cfg: MultitaskConfig) -> MultitaskConfig:
    """Collect every problem of the tree and raise them together."""
    problems: list[str] = []
    names = list(cfg.tasks)
    for name, task in cfg.tasks.items():
        if not isinstance(task, TaskConfig):
            problems.append(f"tasks.{name}: expected a TaskConfig, got {type(task).__name__}")
            continue
        problems += task.problems(f"tasks.{name}")
    if cfg.model.name_or_path is not None or cfg.model.from_config:
        # a pure task spec (build-shards) has no model; whatever is given must be right
        problems += cfg.model.problems("model")
    problems += cfg.data.problems("data")
    problems += cfg.mixture.problems("mixture", names, len(cfg.train_task_names))
    if cfg.mixture.strategy == "dynamic" and cfg.mixture.dynamic.method == "target_gap":
        problems += _target_gap_problems(cfg)
    if cfg.gradients.method != "none" and (cfg.mixture.strategy == "dynamic" or cfg.mixture.level == "batch"):
        problems.append(f"mixture: gradients.method={cfg.gradients.method} trains one micro-batch of every task in "
                        f"each step, so mixture.level=batch and strategy=dynamic would have no effect; use them with "
                        f"gradients.method=none")
    problems += cfg.train.problems("train")
    problems += cfg.gradients.problems("gradients", names)
    problems += cfg.eval.problems("eval", names)
    problems += cfg.meta.problems("meta")
    if cfg.meta.method != "none":
        problems += _meta_problems(cfg)
    if cfg.mixture.strategy == "explicit" or (cfg.mixture.strategy == "dynamic" and cfg.mixture.dynamic.init == "explicit"):
        for name in cfg.train_task_names:
            if cfg.tasks[name].weight is None:
                problems.append(f"tasks.{name}.weight: required by mixture."
                                f"{'strategy' if cfg.mixture.strategy == 'explicit' else 'dynamic.init'}=explicit")
    if problems:
        raise ConfigError(problems)
    return cfg


def _meta_problems(cfg: MultitaskConfig) -> list[str]:
    """Combinations meta-learning does not define (the ZeRO stage and offload device, which live in
    the DeepSpeed template, are checked by the trainer: megamt.trainer.meta_ds_problems)."""
    m = f"meta.method={cfg.meta.method}"
    out = []
    if cfg.gradients.method != "none":
        out.append(f"gradients.method={cfg.gradients.method}: not defined together with {m} (an outer step trains "
                   f"one task, there is nothing to combine); set one of them to none")
    if cfg.gradients.monitor_every:
        out.append(f"gradients.monitor_every: per-task gradient monitoring is not available with {m}; set it to 0")
    if getattr(cfg.gradients, "affinity_every", 0):
        out.append(f"gradients.affinity_every: inter-task affinity is measured on multitask steps, not with {m}; "
                   "set it to 0")
    if cfg.gradients.loss_weighting != "equal":
        out.append(f"gradients.loss_weighting={cfg.gradients.loss_weighting}: an outer step trains one task, so task "
                   f"loss weights do not apply with {m}; use equal")
    if cfg.model.dtype == "fp16":
        out.append(f"model.dtype=fp16: {m} needs gradient partitions without a loss scale; use bf16 or fp32")
    if cfg.train.grad_accum != 1:
        out.append(f"train.grad_accum={cfg.train.grad_accum}: {m} runs one micro-batch per inner step "
                   f"(meta.inner_steps sets the step's micro-batches); leave it at 1")
    if not cfg.train_task_names:
        out.append(f"tasks: {m} needs at least one training task")
    return out


def _target_gap_problems(cfg: MultitaskConfig) -> list[str]:
    """target_gap updates from evaluation during training: it needs validation points."""
    out = []
    if cfg.train.eval_every < 1:
        out.append("mixture.dynamic.method=target_gap: updates at every validation point; set train.eval_every >= 1")
    if cfg.mixture.dynamic.target_signal == "metric" and not cfg.eval.during_training:
        out.append("mixture.dynamic.target_signal=metric: needs eval.during_training=true (per-task metrics at "
                   "each validation point), or use target_signal=loss")
    if not cfg.mixture.dynamic.targets and not cfg.mixture.dynamic.targets_from:
        out.append("mixture.dynamic: target_gap needs targets (mixture.dynamic.targets, or targets_from: a "
                   "transfer.json / eval.json with each task's single-task score)")
    return out


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a task listed twice would otherwise vanish)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError([f"{key}: listed twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1} "
                               f"of {key_node.start_mark.name})"])
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    """Read YAML with duplicate keys refused (errors name the file)."""
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return {"bool": "true/false"}.get(getattr(tp, "__name__", None), None) or getattr(tp, "__name__", None) or \
        str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; record a problem naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, problems)
        for a in inner:
            sub: list[str] = []
            out = _coerce(value, a, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_coerce(v, args[0] if args else Any, f"{key}.{i}", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return value
        kt, vt = args if args else (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-3` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or '<root>'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return cls() if cls is not MultitaskConfig else None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if cls is MultitaskConfig and k in ALIASES:
            continue
        if k not in names:
            close = difflib.get_close_matches(str(k), sorted(names), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: unknown config key{hint}; known keys: {sorted(names)}")
            continue
        kwargs[k] = _coerce(v, hints[k], key, problems)
    if cls is MultitaskConfig:
        return kwargs
    try:
        return cls(**kwargs)
    except TypeError as e:  # a wrongly typed value already recorded
        problems.append(f"{prefix}: {e}")
        return cls()


def build_section(cls, raw: Any, prefix: str, problems: list[str]):
    """Any config-style dataclass from a mapping, with this module's checks (unknown keys and
    wrong types recorded in ``problems`` naming the dotted key). For specs that are not part of
    the training tree (megamt.experiments)."""
    return _build(cls, raw, prefix, problems)


def config_from_dict(raw: dict) -> MultitaskConfig:
    """Build and validate the tree from a plain mapping (YAML's)."""
    problems: list[str] = []
    raw = dict(raw or {})
    aliases = {k: raw.pop(k) for k in list(raw) if k in ALIASES}
    kwargs = _build(MultitaskConfig, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    return MultitaskConfig(**kwargs, **aliases)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"{text}: an override must look like section.key=value"])
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"{text}: bad dotted key"])
    return key.split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw mapping (values parsed as YAML scalars)."""
    raw = dict(raw or {})
    for text in overrides:
        path, value = parse_override(text)
        if path[0] in ALIASES and len(path) == 1:
            section, attr = ALIASES[path[0]]
            path = [section, attr]
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError([f"{'.'.join(path)}: {part!r} is not a section"])
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(raw: Any, key: str = "", problems: list[str] | None = None) -> Any:
    """``${VAR}`` in string values -> the environment variable VAR (an unset one is a problem
    naming the key). Lets a shared spec point at per-machine folders (a model, a tokenizer)."""
    import os

    if isinstance(raw, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k), problems) for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand_env(v, f"{key}.{i}", problems) for i, v in enumerate(raw)]
    if isinstance(raw, str) and "${" in raw:
        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                if problems is not None:
                    problems.append(f"{key}: {m.group(0)} is not set in the environment")
                return m.group(0)
            return os.environ[m.group(1)]

        return _ENV_RE.sub(sub, raw)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MultitaskConfig:
    """YAML file (optional) + dotted overrides -> validated config.

    ``${VAR}`` in a YAML string value is replaced by the environment variable VAR. Relative
    input paths of tasks are resolved against the YAML file's folder.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"{path}: config file not found"])
        raw = load_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: the top level must be a mapping"])
        env_problems: list[str] = []
        raw = expand_env(raw, "", env_problems)
        if env_problems:
            raise ConfigError([f"{path}: {p}" for p in env_problems])
        for task in (raw.get("tasks") or {}).values():
            for inp in ((task or {}).get("inputs") or {}).values():
                if isinstance(inp, dict) and isinstance(inp.get("path"), str):
                    p = Path(inp["path"])
                    if not p.is_absolute() and inp.get("format") != "hf":
                        inp["path"] = str((path.parent / p).resolve())
        dyn = (raw.get("mixture") or {}).get("dynamic") or {}
        if isinstance(dyn, dict) and isinstance(dyn.get("targets_from"), list):
            dyn["targets_from"] = [str((path.parent / f).resolve()) if isinstance(f, str) and not Path(f).is_absolute()
                                   else f for f in dyn["targets_from"]]
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def load_command_config(prog: str, path: str | Path, overrides: list[str] | None = None) -> MultitaskConfig | None:
    """``load_config`` for a command line: a bad config is printed as one message naming every
    problem (no traceback) and None returned; the command then exits with status 2."""
    import sys

    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
