"""Per-task evaluation on the Python API: ``evaluate`` and ``evaluate_zero_shot``.

``megamt eval`` and ``MultitaskModel.evaluate`` / ``evaluate_zero_shot`` all land here.

For each evaluated task: read the split's raw examples (``megamt.data.formats.read_examples``:
the references are the source's, never re-derived from tokens), give every rank the
examples ``i`` with ``i % world_size == rank`` (each example exactly once), predict, gather
the predictions on rank 0 and score them with :mod:`megamt.eval.metrics`.

Predictions by model family:

- causal LM: the task's evaluation template renders the prompt (one fixed template per
  task, recorded in the results); classification is T0 rank classification over the
  verbalised labels; multiple choice is rank classification over the choices' texts
  (``accuracy`` by summed log-likelihood, ``accuracy_norm`` by log-likelihood per choice
  token); QA, NER (tagged-span text, parsed back to IOB2 tags), tagging (one tag per word),
  generative QA and summarization/instruction use batched greedy generation bounded by
  ``max_new_tokens`` (generations cut at the bound are counted, ``cut_generations``);
- encoder-decoder (T5, BART): the same templates; the prompt (+ EOS, cut to ``data.seq_len``
  as training cuts it) goes to the encoder; classification by rank classification over the
  decoder's scores of each verbalised label, the other types by the model's own
  ``generate`` (greedy, or beam search with ``eval.num_beams``), batched over padded (not
  packed) batches and bounded by ``max_new_tokens`` (:func:`_predict_seq2seq`);
- encoder + heads: each example is encoded alone (one per row, same special tokens as the
  shards); class = argmax of its head at the first token, NER tag = argmax at each word's
  first sub-token (words cut by ``seq_len`` count as ``O``; tagging the same), QA answer = the
  best context span (start <= end, at most ``max_answer_tokens``) mapped back to the text,
  multiple choice = the choice (encoded with its question, as in training) the head scores highest.

A task held out of training (``zero_shot``) is evaluated the same way; with a supervised
reference (``supervised=``: an ``eval.json`` path or ``{task: {metric: value}}``), each
of its metrics gets ``supervised`` and ``ratio`` = zero-shot / supervised (T0/FLAN style).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from megamt import comm
from megamt.config import InputConfig, MultitaskConfig, TaskConfig
from megamt.eval import metrics as M


class EvalError(ValueError):
    """Bad evaluation input (unknown task or metric, empty split, wrong tokenizer ...)."""


@dataclass
class EvalTask:
    """One task to evaluate: its config (for reading and templates) and what to measure."""

    name: str
    task: TaskConfig
    split: str = "validation"
    metrics: list[str] = field(default_factory=list)
    """Empty = every metric of the task type."""
    template: Optional[str] = None
    """Causal LMs: the template that renders prompts (name or inline); None = the first fitting one."""
    max_examples: Optional[int] = None


# --------------------------------------------------------------------------- model access


def model_family(model) -> tuple[str, Any]:
    """(family, module): ``encoder`` -> the EncoderWithHeads, ``causal_lm`` -> the HF causal LM,
    ``seq2seq`` -> the HF encoder-decoder."""
    from megamt.heads import EncoderWithHeads

    if isinstance(model, EncoderWithHeads):
        return "encoder", model
    inner = getattr(model, "backbone", None)
    if isinstance(inner, EncoderWithHeads):
        return "encoder", inner
    if getattr(model, "family", None) == "seq2seq" and inner is not None:
        return "seq2seq", inner
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "seq2seq", model
    if getattr(model, "family", None) == "causal_lm" and inner is not None:
        return "causal_lm", inner
    return "causal_lm", model


def gather_plain_copy(module, config: MultitaskConfig):
    """A plain (non-partitioned, CPU, eval-mode) MultitaskModel with ``module``'s weights.

    Not needed to evaluate: :func:`evaluate` takes the ZeRO-3 partitioned model itself
    (``engine.module``) and gathers module by module. This builds a full copy on every
    rank (all parameters gathered at once first) -- kept as the reference the partitioned
    evaluation is tested against, and for the memory benchmark (tools/bench_eval_memory.py).
    Collective under ZeRO-3: every rank must call it.
    """
    import copy

    import deepspeed

    from megamt.model import MultitaskModel

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        state = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    try:  # build the copy outside zero.Init (transformers keeps a global HfDeepSpeedConfig)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover
        pass
    plain = MultitaskModel(copy.deepcopy(config))
    missing, unexpected = plain.load_state_dict(state, strict=False)
    bad = [m for m in missing if "lm_head" not in m] + list(unexpected)
    if bad:
        raise RuntimeError(f"plain copy of the trained model: state mismatch {bad[:5]}")
    return plain.to(torch.device("cpu")).eval()


def _dist() -> tuple[int, int]:
    return comm.rank(), comm.world_size()


class RoutedModel:
    """A submodule called through the root MultitaskModel (``root(ModuleCall(...))``), so that
    ZeRO-3 counts every evaluation forward as one step of the partitioned root module (see
    :class:`megamt.model.ModuleCall`). Exposes what megamt.eval.generation uses."""

    through_root = True  # what megamt.eval.generation's encoder-decoder functions look for

    def __init__(self, root, module):
        self.root, self.module = root, module

    def __call__(self, *args, **kwargs):
        from megamt.model import ModuleCall

        return self.root(ModuleCall(self.module.__call__, args, kwargs))

    def run(self, fn, *args):
        """``fn(*args)`` inside one root forward (several submodule calls as one step)."""
        from megamt.model import ModuleCall

        return self.root(ModuleCall(fn, args, {}))

    def parameters(self):
        return self.module.parameters()

    def get_base_model(self):
        return self.module.get_base_model() if hasattr(self.module, "get_base_model") else self.module


def _routed(model, module) -> RoutedModel:
    from megamt.model import MultitaskModel

    if isinstance(model, MultitaskModel):
        return RoutedModel(model, module)
    return RoutedModel(_Direct(), module)


class _Direct:
    """The root of a model that is not a MultitaskModel: calls run as they are."""

    def __call__(self, call):
        return call.fn(*call.args, **call.kwargs)


def check_tokenizer_matches(tok, model, where: str = "", manifest_dir: str | None = None) -> None:
    """Refuse a tokenizer the model was not trained with.

    Two checks: the tokenizer's ids must fit the model's vocabulary, and, when the shards
    manifest is at hand, its vocabulary hash must equal the one the shards were built with.
    """
    from megamt.data.tokenize import vocab_hash

    _, inner = model_family(model)
    hf_cfg = getattr(getattr(inner, "backbone", inner), "config", None)
    vocab = getattr(hf_cfg, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise EvalError(f"{where or 'model'}: the tokenizer {getattr(tok, 'name_or_path', '')!r} has {len(tok)} "
                        f"tokens but the model's vocabulary holds {vocab}: the checkpoint was trained with another "
                        f"tokenizer; use the tokenizer saved with it (data.tokenizer)")
    if manifest_dir and (Path(manifest_dir) / "manifest.json").is_file():
        manifest = json.loads((Path(manifest_dir) / "manifest.json").read_text())
        want = manifest.get("tokenizer", {}).get("vocab_hash")
        have = vocab_hash(tok)
        if want and have != want:
            raise EvalError(f"{Path(manifest_dir) / 'manifest.json'}: the model was trained on shards tokenized with "
                            f"{manifest['tokenizer'].get('path')!r} (vocab hash {want[:12]}…) but the evaluation "
                            f"tokenizer {getattr(tok, 'name_or_path', '')!r} has hash {have[:12]}…; evaluate with the "
                            f"training tokenizer")


# --------------------------------------------------------------------------- task resolution


def resolve_tasks(config: MultitaskConfig, tasks=None, *, split: str | None = None,
                  max_examples: int | None = None) -> list[EvalTask]:
    """Normalise ``tasks`` (None = every task of the config that has the split) to EvalTasks.

    Entries may be task names of the config, EvalTask objects, or a mapping
    ``{name: {metrics, template, split, max_examples, <TaskConfig fields for a new task>}}``.
    Unknown task names and unknown metrics raise one EvalError listing every problem.
    """
    ecfg = config.eval
    split = split or ecfg.split
    max_examples = max_examples if max_examples is not None else ecfg.max_examples
    problems: list[str] = []
    out: list[EvalTask] = []
    if tasks is None:
        names = list(ecfg.tasks) or [n for n, t in config.tasks.items() if split in t.inputs]
        if not names:
            raise EvalError(f"no task of the config has a {split!r} input; name the tasks to evaluate "
                            f"or the split (eval.split)")
        tasks = names
    if isinstance(tasks, (str, EvalTask)):
        tasks = [tasks]
    if isinstance(tasks, dict):
        items = list(tasks.items())
    else:
        items = [(t.name, t) if isinstance(t, EvalTask) else (t, {}) for t in tasks]
    for name, entry in items:
        if isinstance(entry, EvalTask):
            et = entry
        else:
            entry = dict(entry or {})
            eval_keys = {k: entry.pop(k) for k in ("metrics", "template", "split", "max_examples") if k in entry}
            if name in config.tasks and not entry:
                task = config.tasks[name]
            elif entry:
                from megamt.config import _build

                sub: list[str] = []
                base = dataclasses.asdict(config.tasks[name]) if name in config.tasks else {}
                task = _build(TaskConfig, {**base, **entry}, f"tasks.{name}", sub)
                sub += task.problems(f"tasks.{name}") if not sub else []
                if sub:
                    problems += sub
                    continue
            else:
                problems.append(f"tasks.{name}: unknown task (the model's config has {sorted(config.tasks)}); "
                                f"to evaluate a task held out of training give its task_type and inputs")
                continue
            et = EvalTask(name, task, split=eval_keys.get("split", split),
                          metrics=list(eval_keys.get("metrics") or ecfg.metrics.get(name, [])),
                          template=eval_keys.get("template"),
                          max_examples=eval_keys.get("max_examples", max_examples))
        problems += M.check_metrics(f"tasks.{name}", et.task.task_type, et.metrics)
        if et.split not in et.task.inputs:
            problems.append(f"tasks.{name}.inputs: no {et.split!r} split to evaluate (has {sorted(et.task.inputs)})")
        out.append(et)
    if problems:
        raise EvalError("invalid evaluation request:\n  - " + "\n  - ".join(problems))
    return out


def _read(et: EvalTask, on_error: str = "raise") -> tuple[list, dict[str, int]]:
    """The split's examples and the skip counts per reason. An example is checked as
    build-shards checks it, against the same label set (``resolve_labels``): a label the
    model cannot predict raises naming file and line, or is counted under ``on_error="skip"``."""
    from megamt.data.errors import DataError, SkipCounter
    from megamt.data.formats import read_examples, resolve_labels

    skips = SkipCounter()
    examples = []
    try:
        labels = resolve_labels(et.name, et.task, on_error)
        for ex in read_examples(et.name, et.task, et.split, on_error=on_error, skips=skips, labels=labels):
            examples.append(ex)
            if et.max_examples is not None and len(examples) >= et.max_examples:
                break
    except DataError as e:
        if getattr(e, "reason", "") == "empty_input":
            raise EvalError(f"tasks.{et.name}.inputs.{et.split}: the eval split is empty ({e})") from None
        raise
    if not examples:
        raise EvalError(f"tasks.{et.name}.inputs.{et.split}: the eval split is empty "
                        f"({et.task.inputs[et.split].path}); nothing to evaluate"
                        + (f" (skipped: {skips.as_dict()})" if skips.total() else ""))
    return examples, skips.as_dict()


# --------------------------------------------------------------------------- evaluation


def evaluate(model, tasks=None, *, config: MultitaskConfig | None = None, tokenizer=None,
             split: str | None = None, max_examples: int | None = None, max_new_tokens: int | None = None,
             batch_size: int | None = None, out_dir: str | Path | None = None,
             supervised: dict | str | Path | None = None, zero_shot: Sequence[str] = (),
             progress: bool = True, write_predictions: bool = True, all_templates: bool | None = None,
             on_error: str | None = None) -> dict:
    """Per-task metrics of ``model`` (a MultitaskModel, EncoderWithHeads or HF causal LM).

    ``model`` may be partitioned by ZeRO-3 (``engine.module`` during training, ``megamt eval``
    under a launcher): every forward then gathers one module's parameters at a time on the
    rank's device, and the ranks run their forwards in lockstep
    (:class:`megamt.eval.generation.Lockstep`). Collective then: every rank must call it.

    Returns ``{"tasks": {name: {...}}, ...}`` on every rank (rank 0 computes the metrics and
    broadcasts them); rank 0 writes ``eval.json`` + ``eval.md`` into ``out_dir`` when given.
    ``all_templates`` (default ``eval.all_templates``): causal LMs are scored with every
    fitting template, ``metrics`` being their mean (see megamt.eval.report).
    ``on_error`` (default ``data.on_error``, as build-shards): an example build-shards would
    reject (a label outside the task's label set ...) raises (``"raise"``) or is skipped and
    counted in the task's ``skipped`` (``"skip"``).
    """
    config = config if config is not None else getattr(model, "config", None)
    if not isinstance(config, MultitaskConfig):
        raise EvalError("evaluate: pass config= (the MultitaskConfig the model was built with)")
    ecfg = config.eval
    max_new_tokens = max_new_tokens or ecfg.max_new_tokens
    batch_size = batch_size or ecfg.batch_size
    all_templates = ecfg.all_templates if all_templates is None else bool(all_templates)
    family, module = model_family(model)
    if tokenizer is None:
        from megamt.data.tokenize import load_tokenizer

        if not config.data.tokenizer:
            raise EvalError("evaluate: no tokenizer (set data.tokenizer or pass tokenizer=)")
        tokenizer = load_tokenizer(config.data.tokenizer)
    eval_tasks = resolve_tasks(config, tasks, split=split, max_examples=max_examples)
    rank, world = _dist()
    was_training = module.training
    module.eval()
    results: dict[str, Any] = {"family": family, "world_size": world, "tasks": {}}
    try:
        for et in eval_tasks:
            t0 = time.perf_counter()
            examples, skipped = _read(et, on_error or config.data.on_error)
            mine = list(range(rank, len(examples), world))
            routed = _routed(model, module)
            if family == "encoder":
                runs = [_predict_encoder(routed, tokenizer, config, et, examples, mine, batch_size, progress)]
            elif family == "seq2seq":
                templates = _templates(et, examples[0]) if all_templates else [None]
                runs = [_predict_seq2seq(routed, tokenizer, config, et, examples, mine, batch_size, max_new_tokens,
                                         progress, tpl=tpl) for tpl in templates]
            else:
                templates = _templates(et, examples[0]) if all_templates else [None]
                runs = [_predict_causal(routed, tokenizer, config, et, examples, mine, batch_size, max_new_tokens,
                                        progress, tpl=tpl) for tpl in templates]
            gathered = [(_gather(local, world), template) for local, template in runs]
            entry: dict[str, Any] = {"task_type": et.task.task_type, "split": et.split, "template": runs[0][1],
                                     "zero_shot": bool(et.task.zero_shot or et.name in zero_shot)}
            if skipped:
                entry["skipped"] = skipped
            if rank == 0:
                scored = [_score(et, examples, g) for g, _ in gathered]
                entry.update(scored[0])
                if len(scored) > 1:
                    entry.update(_over_templates(scored, [t for _, t in gathered]))
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                if out_dir is not None and write_predictions:
                    for k, (g, template) in enumerate(gathered):
                        _write_predictions(Path(out_dir), et.name if k == 0 else f"{et.name}.{template}", examples, g)
            results["tasks"][et.name] = entry
    finally:
        module.train(was_training)
    if rank == 0:
        _attach_supervised(results, supervised)
        if out_dir is not None:
            from megamt.eval.report import write_report

            write_report(results, out_dir)
    return _broadcast(results, world)


def evaluate_zero_shot(model, task_name: str, test_dataset, task_type: str, *, labels: list[str] | None = None,
                       instruction: str | None = None, templates: list[str] | None = None,
                       fields: dict[str, str] | None = None, verbalizers: dict[str, str] | None = None,
                       metrics: list[str] | None = None, template: str | None = None, split: str = "test",
                       config: MultitaskConfig | None = None, **kwargs) -> dict:
    """Evaluate a task the model never trained on.

    ``test_dataset``: a file path (any megamt input format), an ``InputConfig``, a
    ``datasets.Dataset`` or a list of records (dicts with the task type's fields, mapped by
    ``fields``). ``instruction`` (free text) is prepended to every prompt; ``templates``
    may hold the new task's own instruction template(s) (``"... {text} ... ||| {answer}"``).
    Other keyword arguments go to :func:`evaluate` (``supervised=`` for the ratio).
    """
    config = config if config is not None else getattr(model, "config", None)
    if not isinstance(config, MultitaskConfig):
        raise EvalError("evaluate_zero_shot: pass config= (the MultitaskConfig the model was built with)")
    if task_type not in M.METRICS_BY_TYPE:
        raise EvalError(f"evaluate_zero_shot: task_type {task_type!r} is not one of {sorted(M.METRICS_BY_TYPE)}")
    # an encoder predicts it with a trained head of the same label set (encoder_head_for)
    inp = _dataset_input(task_name, test_dataset, kwargs.get("out_dir"))
    task = TaskConfig(task_type=task_type, inputs={split: inp}, fields=dict(fields or {}), labels=labels,
                      verbalizers=verbalizers, templates=list(templates or []), zero_shot=True,
                      instruction=instruction)
    problems = task.problems(f"tasks.{task_name}")
    if problems:
        raise EvalError("; ".join(problems))
    et = EvalTask(task_name, task, split=split, metrics=list(metrics or []), template=template,
                  max_examples=kwargs.pop("max_examples", None))
    return evaluate(model, [et], config=config, zero_shot=[task_name], **kwargs)


def _dataset_input(task_name: str, test_dataset, out_dir) -> InputConfig:
    if isinstance(test_dataset, InputConfig):
        return test_dataset
    if isinstance(test_dataset, (str, Path)):
        if not Path(test_dataset).exists():
            raise EvalError(f"evaluate_zero_shot({task_name!r}): test_dataset {str(test_dataset)!r} does not exist")
        return InputConfig(path=str(test_dataset))
    records = list(test_dataset)  # a datasets.Dataset iterates as dicts too
    if not records:
        raise EvalError(f"evaluate_zero_shot({task_name!r}): test_dataset is empty; nothing to evaluate")
    import tempfile

    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="megamt-zeroshot-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task_name}.zero_shot.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
    return InputConfig(path=str(path), format="jsonl")


# --------------------------------------------------------------------------- causal LM


def _template(et: EvalTask, example) -> Any:
    return _templates(et, example)[0]


def _templates(et: EvalTask, example) -> list:
    """The templates that fit the task (the configured one alone when ``template`` is set)."""
    from megamt.data.templates import fitting_templates, resolve_templates

    if et.template:
        return [_named_template(et)]
    return fitting_templates(resolve_templates(et.task), example)


def _named_template(et: EvalTask) -> Any:
    from megamt.data.templates import REGISTRY, Template

    if et.template in REGISTRY:
        return REGISTRY[et.template]
    if "{" not in et.template:
        raise EvalError(f"tasks.{et.name}.template: {et.template!r} is neither a registered template "
                        f"nor an inline one with {{slots}}")
    prompt, _, target = et.template.partition("|||")
    return Template("eval_inline", et.task.task_type, prompt.strip() + "\n", target.strip() or "{answer}")


def _encode_text(tok, text: str, bos: int | None) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ([bos] if bos is not None else []) + ids


def _render_inputs(tok, et: EvalTask, examples, mine, tpl, labels, ids) -> tuple[list, list]:
    """Token ids of each example's prompt ([BOS] + prompt, as the shards hold it) and, for
    classification, of every label's target (+ EOS) -- for multiple choice every choice's --
    through template ``tpl``."""
    from megamt.data.formats import Example
    from megamt.data.templates import render

    rng = random.Random(0)  # unused: a single template is always chosen
    prompts, choices = [], []
    for i in mine:
        ex = examples[i]
        prompt, _, _ = render(ex, et.task, rng, labels=labels, templates=[tpl])
        prompts.append(_encode_text(tok, prompt, ids["bos"]))
        if et.task.task_type == "classification":
            opts = []
            for lab in labels:
                _, target, _ = render(Example(ex.key, ex.task, ex.task_type, {**ex.fields, "label": lab}),
                                      et.task, rng, labels=labels, templates=[tpl])
                opts.append(tok(target, add_special_tokens=False)["input_ids"] + [ids["eos"]])
            choices.append(opts)
        elif et.task.task_type == "multiple_choice":
            choices.append(_choice_targets(ex, et.task, tok, tpl, ids["eos"]))
    return prompts, choices


def _predict_causal(lm, tok, config, et: EvalTask, examples, mine, batch_size, max_new_tokens, progress, tpl=None):
    from megamt.data.formats import resolve_labels
    from megamt.data.tokenize import special_ids
    from megamt.eval.generation import greedy_generate, rank_classify

    ids = special_ids(tok)
    ttype = et.task.task_type
    labels = resolve_labels(et.name, et.task)
    # the progress bar names the template only when one of several is being swept (all_templates)
    label = f"eval {et.name}" + (f" [{tpl.name}]" if tpl is not None else "")
    tpl = tpl or _template(et, examples[0])
    prompts, choices = _render_inputs(tok, et, examples, mine, tpl, labels, ids)
    bar = _bar(len(mine), label, progress)
    local = []
    if ttype == "classification":
        picks = rank_classify(lm, prompts, choices, pad_id=ids["pad"], batch_size=batch_size,
                              max_length=config.data.seq_len, progress=bar)
        local = [(i, labels[p], True) for i, p in zip(mine, picks)]
    elif ttype == "multiple_choice":
        from megamt.eval.generation import choice_log_likelihoods

        scores = choice_log_likelihoods(lm, prompts, choices, pad_id=ids["pad"], batch_size=batch_size,
                                        max_length=config.data.seq_len, progress=bar)
        local = _choice_predictions(mine, scores, choices)
    else:
        gens = greedy_generate(lm, prompts, eos_id=ids["eos"], pad_id=ids["pad"], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, max_length=config.data.seq_len, progress=bar)
        for i, g in zip(mine, gens):
            text = tok.decode(g.ids, skip_special_tokens=True).strip()
            local.append((i, text, g.stopped))
    if bar is not None:
        bar.close()
    return local, tpl.name


def _choice_predictions(mine, scores, choices) -> list[tuple]:
    """Rank classification of multiple choice: the best choice by summed log-likelihood and by
    log-likelihood per token (length-normalised), both reported (accuracy / accuracy_norm)."""
    return [(i, {"choice": _argmax(s), "choice_norm": _argmax([v / len(c) for v, c in zip(s, opts)])}, True)
            for i, s, opts in zip(mine, scores, choices)]


def _choice_targets(ex, task_cfg, tok, tpl, eos: int) -> list[list[int]]:
    """Each choice's target ids (EOS included, as in training) under template ``tpl``."""
    import dataclasses as dc

    from megamt.data.templates import render

    out = []
    for c in range(len(ex.fields["choices"])):
        _, target, _ = render(dc.replace(ex, fields={**ex.fields, "label": c}), task_cfg, random.Random(0),
                              templates=[tpl])
        out.append(tok(target, add_special_tokens=False)["input_ids"] + [eos])
    return out


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value (the first on ties)."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def _predict_seq2seq(model, tok, config, et: EvalTask, examples, mine, batch_size, max_new_tokens, progress,
                     tpl=None):
    """An encoder-decoder's predictions: encoder input = [BOS] + prompt + EOS (training's
    ``seq2seq_item``), cut to ``data.seq_len`` like training; decoder scores for
    classification and multiple choice, the model's own ``generate`` (``eval.num_beams``) otherwise."""
    from megamt.data.formats import resolve_labels
    from megamt.data.packing import cut_prompt
    from megamt.data.tokenize import special_ids
    from megamt.eval.generation import seq2seq_choice_log_likelihoods, seq2seq_generate, seq2seq_rank_classify

    ids = special_ids(tok)
    labels = resolve_labels(et.name, et.task)
    label = f"eval {et.name}" + (f" [{tpl.name}]" if tpl is not None else "")
    tpl = tpl or _template(et, examples[0])
    prompts, choices = _render_inputs(tok, et, examples, mine, tpl, labels, ids)
    prompts = [[int(x) for x in cut_prompt(p + [ids["eos"]], config.data.seq_len)] for p in prompts]
    bar = _bar(len(mine), label, progress)
    if et.task.task_type == "classification":
        picks = seq2seq_rank_classify(model, prompts, choices, pad_id=ids["pad"], batch_size=batch_size, progress=bar)
        local = [(i, labels[p], True) for i, p in zip(mine, picks)]
    elif et.task.task_type == "multiple_choice":  # decoder scores of each choice's text, as trained
        scores = seq2seq_choice_log_likelihoods(model, prompts, choices, pad_id=ids["pad"], batch_size=batch_size,
                                                progress=bar)
        local = _choice_predictions(mine, scores, choices)
    else:
        gens = seq2seq_generate(model, prompts, eos_id=ids["eos"], pad_id=ids["pad"], max_new_tokens=max_new_tokens,
                                num_beams=config.eval.num_beams, batch_size=batch_size, progress=bar)
        local = [(i, tok.decode(g.ids, skip_special_tokens=True).strip(), g.stopped) for i, g in zip(mine, gens)]
    if bar is not None:
        bar.close()
    return local, tpl.name


# --------------------------------------------------------------------------- encoder + heads


def _encoder_features(tok, ex, ttype: str, max_len: int) -> dict:
    f = ex.fields
    if ttype == "classification":
        enc = tok(f["text"], f["text_pair"], truncation="longest_first", max_length=max_len) if "text_pair" in f \
            else tok(f["text"], truncation=True, max_length=max_len)
        return {"input_ids": enc["input_ids"]}
    if ttype == "multiple_choice":  # one row per choice, the tokens training packs (same cut)
        import numpy as np

        from megamt.data.packing import PackItem, fit_overlong
        from megamt.data.tokenize import choice_pairs

        pairs = choice_pairs(f)
        ids = tok([a for a, _ in pairs], [b for _, b in pairs])["input_ids"]
        item = fit_overlong(PackItem(np.asarray([t for x in ids for t in x]), 0, choice_lens=tuple(map(len, ids))),
                            max_len, "truncate")
        if item is None:
            raise EvalError(f"{ex.key}: {len(ids)} choices cannot fit data.seq_len={max_len} (2 tokens each at least)")
        bounds = np.cumsum((0,) + item.choice_lens)
        return {"choices": [item.tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]}
    if ttype in ("ner", "tagging"):
        enc = tok(f["tokens"], is_split_into_words=True, truncation=True, max_length=max_len)
        words, first, prev = enc.word_ids(), [], None
        for pos, w in enumerate(words):
            if w is not None and w != prev:
                first.append((w, pos))
            prev = w
        return {"input_ids": enc["input_ids"], "first_subtokens": first}
    raise ValueError(f"_encoder_features: {ttype} (extractive QA goes through _qa_windows)")


def _qa_windows(tok, ex, max_len: int, stride: int) -> list[dict]:
    """(question, context) features; a context too long for ``max_len`` gives several windows
    overlapping by ``stride`` tokens (the tokenizer's own overflow, as training's
    ``data.qa_doc_stride``; stride 0 = the first window only, truncated)."""
    f = ex.fields
    try:
        enc = tok(f["question"], f["context"], truncation="only_second", max_length=max_len, stride=stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True)
    except Exception as e:  # the question alone does not fit max_len
        raise EvalError(f"{ex.key}: cannot fit question + context windows into data.seq_len={max_len} "
                        f"with data.qa_doc_stride={stride} ({e}); raise data.seq_len") from e
    n = len(enc["input_ids"]) if stride > 0 else 1
    return [{"input_ids": enc["input_ids"][w], "offsets": enc["offset_mapping"][w],
             "context_tokens": [p for p, sid in enumerate(enc.sequence_ids(w)) if sid == 1]} for w in range(n)]


def _encoder_batch(rows_ids: list[list[int]], task_id: int, pad: int, device) -> dict:
    from megamt.attention import cu_seqlens_from_segment_ids

    L = max(len(x) for x in rows_ids)
    batch = {"input_ids": torch.full((len(rows_ids), L), pad, dtype=torch.long),
             "segment_ids": torch.full((len(rows_ids), L), -1, dtype=torch.long),
             "task_ids": torch.full((len(rows_ids), L), -1, dtype=torch.long),
             "position_ids": torch.arange(L).repeat(len(rows_ids), 1)}
    for r, x in enumerate(rows_ids):
        n = len(x)
        batch["input_ids"][r, :n] = torch.tensor(x)
        batch["segment_ids"][r, :n] = 0
        batch["task_ids"][r, :n] = task_id
    cu_seqlens, max_seqlen = cu_seqlens_from_segment_ids(batch["segment_ids"])  # one example (+ padding) per row
    return {**{k: v.to(device) for k, v in batch.items()}, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}


def _predict_encoder(routed: RoutedModel, tok, config, et: EvalTask, examples, mine, batch_size, progress):
    """Head predictions of this rank's examples: one forward (encoder + the task's head, in
    one routed call) per batch of rows, each row one example or one QA window; the number of
    forwards is the same on every rank of a partitioned model (stand-in rounds)."""
    from megamt.eval.generation import Lockstep, model_device

    enc_model = routed.module
    name, ttype = et.name, et.task.task_type
    hname = encoder_head_for(enc_model, config, et)
    t = enc_model.task_names.index(hname)
    labels = enc_model.label_names[hname]
    device = model_device(enc_model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    max_answer = config.eval.max_answer_tokens
    head = enc_model.heads[hname]
    # batches of similar length: rows are padded to the longest one (unsorted SST-2 dev: 61 % more
    # padded tokens); the predictions are keyed by example index, so the order is free
    from megamt.data.tokenize import example_texts

    mine = sorted(mine, key=lambda i: sum(len(text) for text in example_texts(examples[i])))
    if ttype == "extractive_qa":  # every window of every example is a row; the best span wins
        stride = config.data.doc_stride()
        rows = [(i, w) for i in mine for w in _qa_windows(tok, examples[i], config.data.seq_len, stride)]
    else:
        rows = [(i, _encoder_features(tok, examples[i], ttype, config.data.seq_len)) for i in mine]
    batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]

    def row_ids(f: dict) -> list[list[int]]:  # multiple choice: every choice its own row
        return f["choices"] if ttype == "multiple_choice" else [f["input_ids"]]

    def head_logits(ids: list[list[int]]) -> torch.Tensor:  # [rows, L, outputs]
        return head(enc_model.encode(_encoder_batch(ids, t, pad, device)))

    bar = _bar(len(rows), f"eval {name}", progress)
    preds: dict[int, Any] = {}
    best: dict[int, tuple[float, str]] = {}
    lockstep = Lockstep(enc_model)
    with torch.no_grad():
        for b in range(lockstep.rounds(len(batches))):
            batch = batches[b] if b < len(batches) else []
            logits = routed.run(head_logits, [x for _, f in batch for x in row_ids(f)] or [[pad]])
            k = 0
            for i, f in batch:
                if ttype == "multiple_choice":  # the best-scored choice
                    n = len(f["choices"])
                    preds[i] = {"choice": _argmax(logits[k:k + n, 0, 0].tolist())}
                    k += n
                    continue
                row, k = logits[k], k + 1
                if ttype == "extractive_qa":
                    score, text = _best_span(row, f, examples[i].fields["context"], max_answer)
                    if i not in best or score > best[i][0]:
                        best[i] = (score, text)
                elif ttype == "classification":
                    preds[i] = labels[int(row[0].argmax())]
                else:  # ner, tagging: the tag of each word's first sub-token; words cut by seq_len stay O
                    pred = ["O"] * len(examples[i].fields["tokens"])
                    if f["first_subtokens"]:
                        pos = torch.tensor([p for _, p in f["first_subtokens"]], device=row.device)
                        for (w, _), tag in zip(f["first_subtokens"], row[pos].argmax(-1).tolist()):
                            pred[w] = labels[tag]
                    preds[i] = pred
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if ttype == "extractive_qa":
        preds = {i: best[i][1] if i in best else "" for i in mine}
    return [(i, preds[i], True) for i in mine], "encoder head" if hname == name else f"encoder head of {hname}"


def encoder_head_for(enc_model, config, et: EvalTask) -> str:
    """The trained head that predicts task ``et``: its own, or -- for a task held out of
    training (zero-shot, or unknown to the model) -- the trained head of the same kind whose
    label set is the task's (a new entailment set on the NLI head; any trained span head for
    extractive QA). Raises EvalError saying what an encoder can and cannot do otherwise."""
    from megamt.data.formats import resolve_labels
    from megamt.heads import HeadConfigError, resolve_head

    name = et.name
    untrained = set(getattr(enc_model, "untrained_heads", []))
    trained = [h for h in enc_model.heads if h not in untrained
               and not (h in config.tasks and config.tasks[h].zero_shot)]
    if name in trained and not et.task.zero_shot:
        return name
    if name in untrained:
        raise EvalError(f"tasks.{name}: the head of this task was not in the loaded model (it would be random)")
    try:
        kind = resolve_head(name, et.task)
    except HeadConfigError as e:
        raise EvalError(str(e)) from None
    labels = None if kind == "span" else resolve_labels(name, et.task)
    same = [h for h in trained if enc_model.head_kinds[h] == kind
            and (kind == "span" or set(enc_model.label_names[h]) == set(labels or []))]
    if same:
        return same[0]
    heads = {h: enc_model.label_names[h] or enc_model.head_kinds[h] for h in trained}
    raise EvalError(
        f"tasks.{name}: held out of training, and no trained {kind} head shares its label set {labels} "
        f"(trained heads: {heads}). An encoder with task heads predicts only the label sets it was trained on: "
        f"a held-out task can be evaluated zero-shot on a head with the same labels (a new entailment set on "
        f"the NLI head; give the task the same `labels`). For a new label set, train a head for the task, or use "
        f"a causal_lm (text-to-text) model, which scores any verbalised labels.")


def _best_span(logits: torch.Tensor, feats: dict, context: str, max_answer: int) -> tuple[float, str]:
    """The best context span of one window (start <= end < start + max_answer): its score
    (start + end logit, comparable across the windows of one example) and its text."""
    ctx = feats["context_tokens"]
    if not ctx:
        return float("-inf"), ""
    idx = torch.tensor(ctx, device=logits.device)
    s, e = logits[idx, 0].float(), logits[idx, 1].float()
    score = s[:, None] + e[None, :]
    n = len(ctx)
    ok = torch.ones(n, n, dtype=torch.bool, device=logits.device).triu().tril(max_answer - 1)
    score = score.masked_fill(~ok, float("-inf"))
    best = int(score.argmax())
    a, b = ctx[best // n], ctx[best % n]
    off = feats["offsets"]
    return float(score.view(-1)[best]), context[off[a][0]:off[b][1]]


# --------------------------------------------------------------------------- scoring and gathering


def _score(et: EvalTask, examples, gathered) -> dict:
    seen = sorted(i for i, _, _ in gathered)
    if seen != list(range(len(examples))):
        raise RuntimeError(f"tasks.{et.name}: ranks returned {len(seen)} predictions for {len(examples)} examples "
                           f"(each must be predicted exactly once)")
    by_index = {i: (p, stopped) for i, p, stopped in gathered}
    ttype = et.task.task_type
    if ttype == "ner":  # generated entity types are kept when they are types of the task
        types = set(_entity_types(et))
        for ex in examples:
            types.update(g[2:] for g in ex.fields["tags"] if g != "O")
    refs, preds = [], []
    for i, ex in enumerate(examples):
        p = by_index[i][0]
        f = ex.fields
        if ttype == "classification":
            refs.append(f["label"])
        elif ttype == "extractive_qa":
            refs.append([a["text"] for a in f["answers"]])
        elif ttype == "ner":
            refs.append(f["tags"])
            if isinstance(p, str):  # generated tagged-span text -> IOB2 tags over the words
                p = M.parse_entities(p, f["tokens"], sorted(types) or None)
        elif ttype == "summarization":
            refs.append(f["summary"])
        elif ttype == "multiple_choice":
            refs.append(f["label"])
        elif ttype == "tagging":
            refs.append(f["tags"])
            if isinstance(p, str):  # generated tags, one per word
                from megamt.data.templates import parse_tagging_target

                p = parse_tagging_target(p, len(f["tokens"]))
        elif ttype == "generative_qa":
            refs.append(list(f["answers"]))
        else:
            refs.append(f["response"])
        preds.append(p)
    values = M.compute_metrics(ttype, refs, preds, et.metrics or None)
    return {"metrics": values, "n_examples": len(examples),
            "cut_generations": sum(not s for _, s in by_index.values())}


def _over_templates(scored: list[dict], names: list[str]) -> dict:
    """``eval.all_templates``: every template's metrics, their mean as ``metrics`` and the
    spread (population std, min, max) per metric."""
    per = {name: s["metrics"] for name, s in zip(names, scored)}
    mean, spread = {}, {}
    for m in scored[0]["metrics"]:
        vals = [s["metrics"][m] for s in scored]
        mean[m] = statistics.fmean(vals)
        spread[m] = {"std": statistics.pstdev(vals), "min": min(vals), "max": max(vals)}
    return {"metrics": mean, "per_template": per, "template_spread": spread,
            "template": f"mean of {len(names)} templates", "first_template": names[0],
            "cut_generations": sum(s["cut_generations"] for s in scored)}


def _entity_types(et: EvalTask) -> list[str]:
    labels = et.task.labels or []
    return [l[2:] if l[:2] in ("B-", "I-") else l for l in labels if l != "O"]


def _gather(local: list, world: int) -> list:
    return [x for part in comm.all_gather_objects(local) for x in part]


def _broadcast(results: dict, world: int) -> dict:
    return comm.broadcast_object(results)


def _attach_supervised(results: dict, supervised) -> None:
    """Zero-shot task metrics get the supervised score of the same task and the ratio."""
    if supervised is None:
        return
    if isinstance(supervised, (str, Path)):
        data = json.loads(Path(supervised).read_text())
        supervised = {n: e["metrics"] for n, e in data.get("tasks", {}).items() if "metrics" in e}
    for name, entry in results["tasks"].items():
        ref = supervised.get(name)
        if not ref or "metrics" not in entry:
            continue
        entry["supervised"] = {m: ref[m] for m in entry["metrics"] if m in ref}
        entry["ratio"] = {m: (entry["metrics"][m] / v if v else math.nan) for m, v in entry["supervised"].items()}


def _write_predictions(out_dir: Path, name: str, examples, gathered) -> None:
    folder = out_dir / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for i, p, stopped in sorted(gathered, key=lambda x: x[0]):
            f.write(json.dumps({"key": examples[i].key, "prediction": p, "stopped": stopped}, ensure_ascii=False) + "\n")


def _bar(total: int, desc: str, progress: bool):
    if not progress or _dist()[0] != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
