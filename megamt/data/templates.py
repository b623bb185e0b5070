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
- multiple_choice: ``{question}``, ``{context}`` (examples with a context), ``{options}`` (the
  choices as lettered lines ``A. ...``), ``{answer}`` (the gold choice's text: what causal LMs
  learn to write, and what rank classification scores for every choice)
- tagging: ``{sentence}``, ``{tag_set}`` (the task's tags), ``{answer}`` (:func:`tagging_target`:
  one tag per word, space-separated)
- generative_qa: ``{question}``, ``{context}`` (examples with a context), ``{answer}`` (the first answer)

Examples with and without a text pair (classification) or a context (multiple_choice,
generative_qa) each take the templates whose slots they fill (:func:`fitting_templates`).

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
    "multiple_choice": [
        ("mc_question", "Question: {question}\nOptions:\n{options}\nAnswer:"),
        ("mc_pick", "Pick the best answer.\n{question}\n{options}\nThe best answer is:"),
        ("mc_complete", "{question}"),
        ("mc_read", "Read the text and answer the question.\nText: {context}\nQuestion: {question}\n"
                    "Options:\n{options}\nAnswer:"),
        ("mc_context_first", "{context}\n{question}\nOptions:\n{options}\nAnswer:"),
    ],
    "tagging": [
        ("tag_each", "Tag each word of the sentence ({tag_set}).\nSentence: {sentence}\nTags:"),
        ("tag_words", "{sentence}\nOne tag per word:"),
        ("tag_plain", "Words: {sentence}\nTags:"),
    ],
    "generative_qa": [
        ("gqa_answer", "Answer the question.\nQuestion: {question}\nAnswer:"),
        ("gqa_plain", "Q: {question}\nA:"),
        ("gqa_read", "Read the passage and answer the question in your own words.\nPassage: {context}\n"
                     "Question: {question}\nAnswer:"),
        ("gqa_context_first", "{context}\nQ: {question}\nA:"),
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


def tagging_target(tags: list[str]) -> str:
    """A tagging target: one tag per word, space-separated (``"NNP VBZ JJ"``)."""
    return " ".join(tags)


def parse_tagging_target(text: str, n_words: int) -> list[str]:
    """Inverse of :func:`tagging_target` over ``n_words`` words: missing tags are ``""`` (a
    wrong tag, whatever the gold one), extra ones are dropped."""
    tags = text.split()[:n_words]
    return tags + [""] * (n_words - len(tags))


def choice_options(choices: list[str]) -> str:
    """``A. first\nB. second`` (letters beyond Z continue as AA, AB, ... never occur in practice)."""
    return "\n".join(f"{_letter(i)}. {c}" for i, c in enumerate(choices))


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else _letter(i // 26 - 1) + chr(ord("A") + i % 26)


def fitting_templates(templates: list[Template], example: Example) -> list[Template]:
    """The templates whose optional slots the example fills: ``{text_pair}`` for pair
    classification, ``{context}`` for multiple-choice / generative QA examples with a context
    (all templates when none fits)."""
    if example.task_type == "classification":
        has, slot = "text_pair" in example.fields, "text_pair"
    elif example.task_type in ("multiple_choice", "generative_qa"):
        has, slot = "context" in example.fields, "context"
    else:
        return templates
    return [t for t in templates if (slot in t.slots) == has] or templates


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
    if t == "multiple_choice":
        return {"question": f["question"], "context": f.get("context", ""), "options": choice_options(f["choices"]),
                "answer": f["choices"][f["label"]]}
    if t == "tagging":
        return {"sentence": " ".join(f["tokens"]), "tag_set": ", ".join(labels or sorted(set(f["tags"]))),
                "answer": tagging_target(f["tags"])}
    if t == "generative_qa":
        return {"question": f["question"], "context": f.get("context", ""), "answer": f["answers"][0]}
    return {"prompt": f["prompt"], "answer": f["response"]}


def render(example: Example, task_cfg, rng: random.Random, labels: Optional[list[str]] = None,
           templates: Optional[list[Template]] = None) -> tuple[str, str, str]:
    """``(prompt, target, template_name)`` for one example; the template is drawn with ``rng``.

    Only the templates that fit the example are drawn from (:func:`fitting_templates`).
    """
    templates = templates if templates is not None else resolve_templates(task_cfg)
    values = slot_values(example, task_cfg, labels)
    templates = fitting_templates(templates, example)
    tpl = templates[rng.randrange(len(templates))] if len(templates) > 1 else templates[0]
    prompt = tpl.prompt.format(**values)
    if task_cfg.instruction:
        prompt = task_cfg.instruction.strip() + "\n" + prompt
    return prompt, tpl.target.format(**values), tpl.name


def example_rng(seed: int, example: Example) -> random.Random:
    """The per-example RNG used for template choice: same seed + key → same template, in any
    process and wherever the input folder lies (the key's folders are left out)."""
    return random.Random(f"{seed}:{example.task}:{example.key.rsplit('/', 1)[-1]}")
