"""Prompt templates: an :class:`Example` → a (prompt, target) text pair, FLAN-style.

Each task type has several built-in templates; one is chosen per example with a seeded
RNG (``render(example, task_cfg, rng)``). Users add their own with
:func:`register_template`, or inline in a task config::

    templates: ["sst_plain", "Review: {text} Sentiment? ||| {answer}"]

An entry is a registered name or an inline template: ``PROMPT ||| TARGET`` (the target
defaults to ``{answer}``). Slots by task type:

- classification: ``{text}``, ``{text_pair}`` (pair tasks), ``{options}`` (the verbalised
  labels, comma-separated), ``{answer}`` (the verbalised label)
- extractive_qa: ``{context}``, ``{question}``, ``{answer}`` (the first gold answer)
- ner: ``{sentence}`` (tokens joined by spaces), ``{entity_types}``, ``{answer}``
  (:func:`ner_target`: ``"PER: John Smith; LOC: Paris"`` in sentence order, ``"none"`` if empty)
- summarization: ``{document}``, ``{answer}``
- instruction: ``{prompt}``, ``{answer}``

``task_cfg.instruction`` (free text) is prepended to every prompt of the task.
"""

from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass
from typing import Optional

from megamt.data.formats import Example


@dataclass(frozen=True)
class Template:
    name: str
    task_type: str
    prompt: str
    target: str = "{answer}"

    @property
    def slots(self) -> frozenset[str]:
        return _slots(self.prompt + self.target)


@functools.lru_cache(maxsize=4096)
def _slots(text: str) -> frozenset[str]:
    return frozenset(f for _, f, _, _ in string.Formatter().parse(text) if f)


REGISTRY: dict[str, Template] = {}


def register_template(task_type: str, name: str, prompt: str, target: str = "{answer}") -> Template:
    """Add a template to the registry (usable by name in ``tasks.X.templates``)."""
    if name in REGISTRY:
        raise ValueError(f"template {name!r} is already registered")
    t = Template(name, task_type, prompt, target)
    REGISTRY[name] = t
    return t


_BUILTIN = {
    "classification": [
        ("cls_question", "{text}\nWhich label fits this text? Options: {options}.\nAnswer:"),
        ("cls_classify", "Classify the text into one of: {options}.\nText: {text}\nLabel:"),
        ("cls_plain", "Text: {text}\nLabel ({options}):"),
        ("pair_question", "Premise: {text}\nHypothesis: {text_pair}\nOptions: {options}.\nAnswer:"),
        ("pair_relation", "{text}\nQuestion: how does this relate to \"{text_pair}\"? Options: {options}.\nAnswer:"),
        ("pair_plain", "Sentence 1: {text}\nSentence 2: {text_pair}\nLabel ({options}):"),
    ],
    "extractive_qa": [
        ("qa_read", "Read the passage and answer the question.\nPassage: {context}\nQuestion: {question}\nAnswer:"),
        ("qa_context_first", "{context}\nQ: {question}\nA:"),
        ("qa_question_first", "Question: {question}\nContext: {context}\nAnswer:"),
    ],
    "ner": [
        ("ner_list", "List the named entities ({entity_types}) in the sentence.\nSentence: {sentence}\nEntities:"),
        ("ner_find", "{sentence}\nFind the entities of types {entity_types}.\nEntities:"),
        ("ner_plain", "Sentence: {sentence}\nNamed entities:"),
    ],
    "summarization": [
        ("sum_summarize", "Summarize the text.\n{document}\nSummary:"),
        ("sum_tldr", "{document}\nTL;DR:"),
        ("sum_brief", "Document: {document}\nWrite a short summary.\nSummary:"),
    ],
    "instruction": [
        ("inst_plain", "{prompt}\n"),
        ("inst_chat", "### Instruction:\n{prompt}\n### Response:\n"),
        ("inst_qa", "Task: {prompt}\nAnswer:"),
    ],
}
for _type, _items in _BUILTIN.items():
    for _name, _prompt in _items:
        register_template(_type, _name, _prompt)


def builtin_templates(task_type: str) -> list[Template]:
    return [t for t in REGISTRY.values() if t.task_type == task_type]


def resolve_templates(task_cfg) -> list[Template]:
    """The task's templates: named or inline entries of ``templates``, or every built-in of its type."""
    if not task_cfg.templates:
        return builtin_templates(task_cfg.task_type)
    out = []
    for i, entry in enumerate(task_cfg.templates):
        if entry in REGISTRY:
            t = REGISTRY[entry]
            if t.task_type != task_cfg.task_type:
                raise ValueError(f"template {entry!r} is for {t.task_type}, the task is {task_cfg.task_type}")
            out.append(t)
        elif "{" in entry:
            prompt, _, target = entry.partition("|||")
            out.append(Template(f"inline{i}", task_cfg.task_type, prompt.strip() + "\n", target.strip() or "{answer}"))
        else:
            raise ValueError(f"template {entry!r} is neither registered ({sorted(REGISTRY)}) nor an inline "
                             f"template with {{slots}}")
    return out


def ner_target(tokens: list[str], tags: list[str]) -> str:
    """Entities in sentence order: ``"PER: John Smith; LOC: Paris"``; ``"none"`` when there are none."""
    spans: list[tuple[str, list[str]]] = []
    prev = "O"
    for tok, tag in zip(tokens, tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:])):
            spans.append((tag[2:], [tok]))
        elif tag.startswith("I-"):
            spans[-1][1].append(tok)
        prev = tag
    return "; ".join(f"{t}: {' '.join(w)}" for t, w in spans) if spans else "none"


def parse_ner_target(text: str) -> list[tuple[str, str]]:
    """Inverse of :func:`ner_target`: ``[(type, "entity words"), ...]`` (malformed parts ignored)."""
    out = []
    if text.strip().lower() == "none":
        return out
    for part in text.split(";"):
        typ, sep, words = part.partition(":")
        if sep and typ.strip() and words.strip():
            out.append((typ.strip(), " ".join(words.split())))
    return out


def slot_values(example: Example, task_cfg, labels: Optional[list[str]] = None) -> dict[str, str]:
    f = example.fields
    t = example.task_type
    if t == "classification":
        verb = task_cfg.verbalizers or {}
        labs = labels or task_cfg.labels or [f["label"]]
        return {"text": f["text"], "text_pair": f.get("text_pair", ""),
                "options": ", ".join(verb.get(l, l) for l in labs), "answer": verb.get(f["label"], f["label"])}
    if t == "extractive_qa":
        return {"context": f["context"], "question": f["question"], "answer": f["answers"][0]["text"]}
    if t == "ner":
        types = sorted({l[2:] for l in (labels or []) if l != "O"}) or sorted({g[2:] for g in f["tags"] if g != "O"})
        return {"sentence": " ".join(f["tokens"]), "entity_types": ", ".join(types) or "entities",
                "answer": ner_target(f["tokens"], f["tags"])}
    if t == "summarization":
        return {"document": f["document"], "answer": f["summary"]}
    return {"prompt": f["prompt"], "answer": f["response"]}


def render(example: Example, task_cfg, rng: random.Random, labels: Optional[list[str]] = None,
           templates: Optional[list[Template]] = None) -> tuple[str, str, str]:
    """``(prompt, target, template_name)`` for one example; the template is drawn with ``rng``.

    Pair-classification examples use templates with ``{text_pair}``, single texts the others.
    """
    templates = templates if templates is not None else resolve_templates(task_cfg)
    values = slot_values(example, task_cfg, labels)
    if example.task_type == "classification":
        pair = "text_pair" in example.fields
        fitting = [t for t in templates if ("text_pair" in t.slots) == pair]
        templates = fitting or templates
    tpl = templates[rng.randrange(len(templates))] if len(templates) > 1 else templates[0]
    prompt = tpl.prompt.format(**values)
    if task_cfg.instruction:
        prompt = task_cfg.instruction.strip() + "\n" + prompt
    return prompt, tpl.target.format(**values), tpl.name


def example_rng(seed: int, example: Example) -> random.Random:
    """The per-example RNG used for template choice: same seed + key → same template, in any
    process and wherever the input folder lies (the key's folders are left out)."""
    return random.Random(f"{seed}:{example.task}:{example.key.rsplit('/', 1)[-1]}")
