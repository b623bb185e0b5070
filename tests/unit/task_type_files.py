"""Small input files for the multiple-choice, tagging and generative-QA task types.

Hand-written, real-looking content in the formats users have: ARC/CommonsenseQA-style JSONL
(choices as a list of ``{text, label}`` records, a letter label), PIQA-style TSV (numbered
choice fields, 0-based label), a CoNLL-2003-style column file (word POS chunk NER), and
MS MARCO-style generative QA JSONL (a passage, or none, and free answers). Shared by the
unit tests of the readers, templates, packer, heads, metrics and the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

ARC = [
    ("Which gas do plants absorb from the air to make food?", ["oxygen", "carbon dioxide", "nitrogen", "helium"], "B"),
    ("What is the boiling point of water at sea level in Celsius?", ["50 degrees", "90 degrees", "100 degrees",
                                                                    "212 degrees"], "C"),
    ("Which organ pumps blood through the human body?", ["heart", "lungs", "liver", "kidney"], "A"),
    ("What force pulls objects toward the center of the Earth?", ["friction", "magnetism", "gravity",
                                                                  "tension"], "C"),
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mars", "Mercury"], "D"),
    ("What do bees collect from flowers to make honey?", ["nectar", "pollen", "leaves", "seeds"], "A"),
    ("Which state of matter has a fixed shape?", ["gas", "liquid", "solid", "plasma"], "C"),
    ("What instrument measures air temperature?", ["barometer", "thermometer", "ruler", "compass"], "B"),
]

PIQA = [
    ("To keep bread fresh longer,", "store it in a sealed bag.", "leave it open on the counter.", 0),
    ("To loosen a tight jar lid,", "run the lid under hot water.", "put the jar in the freezer.", 0),
    ("To sharpen a pencil without a sharpener,", "rub it on a pillow.", "shave the tip with a knife.", 1),
    ("To dry wet shoes quickly,", "stuff them with newspaper.", "fill them with water.", 0),
    ("To cool a hot drink faster,", "cover it with a towel.", "stir it with a metal spoon.", 1),
    ("To remove a splinter,", "use clean tweezers.", "push it deeper with a finger.", 0),
]

CONLL = """-DOCSTART- -X- -X- O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
call NN I-NP O
to TO I-VP O
boycott VB I-VP O
British JJ I-NP I-MISC
lamb NN I-NP O
. . O O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP I-NP I-LOC
1996-08-22 CD I-NP O

The DT I-NP O
European NNP I-NP I-ORG
Commission NNP I-NP I-ORG
said VBD I-VP O
on IN I-PP O
Thursday NNP I-NP O
it PRP B-NP O
disagreed VBD I-VP O
with IN I-PP O
German JJ I-NP I-MISC
advice NN I-NP O
. . O O

Germany NNP I-NP I-LOC
's POS B-NP O
representative NN I-NP O
to TO I-PP O
the DT I-NP O
European NNP I-NP I-ORG
Union NNP I-NP I-ORG
said VBD I-VP O
. . O O
"""

MARCO = [
    ("what is the capital of australia", "Canberra is the capital city of Australia, chosen as a compromise "
     "between Sydney and Melbourne.", ["Canberra"]),
    ("how long does it take to boil an egg", "A soft-boiled egg takes about six minutes; a hard-boiled egg about "
     "ten to twelve minutes.", ["About ten to twelve minutes for a hard-boiled egg", "10-12 minutes"]),
    ("who wrote pride and prejudice", "", ["Jane Austen"]),
    ("what is the largest ocean", "The Pacific Ocean is the largest and deepest of the oceans on Earth.",
     ["The Pacific Ocean"]),
    ("why is the sky blue", "Sunlight is scattered by air molecules, and blue light is scattered more than red.",
     ["Because air scatters blue light more than other colours"]),
    ("when did the first man land on the moon", "", ["1969", "In July 1969"]),
]


def write_arc_jsonl(path: Path, rows=ARC) -> Path:
    """CommonsenseQA/ARC layout: ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``."""
    with open(path, "w") as f:
        for i, (q, choices, key) in enumerate(rows):
            f.write(json.dumps({"id": f"arc-{i}", "question": {"stem": q, "choices": [
                {"label": "ABCD"[k], "text": c} for k, c in enumerate(choices)]}, "answerKey": key}) + "\n")
    return path


def write_piqa_tsv(path: Path, rows=PIQA) -> Path:
    """PIQA layout as TSV: ``goal  sol1  sol2  label`` with a 0-based label."""
    with open(path, "w") as f:
        f.write("goal\tsol1\tsol2\tlabel\n")
        for goal, s1, s2, lab in rows:
            f.write(f"{goal}\t{s1}\t{s2}\t{lab}\n")
    return path


def write_conll(path: Path) -> Path:
    path.write_text(CONLL)
    return path


def write_marco_jsonl(path: Path, rows=MARCO) -> Path:
    with open(path, "w") as f:
        for q, passage, answers in rows:
            f.write(json.dumps({"query": q, "passage": passage, "answers": answers}) + "\n")
    return path


def task_specs(folder: Path) -> dict:
    """A ``tasks:`` section with one task of each new type (plus the POS/chunk pair)."""
    arc = write_arc_jsonl(folder / "arc.jsonl")
    piqa = write_piqa_tsv(folder / "piqa.tsv")
    conll = write_conll(folder / "eng.sample")
    marco = write_marco_jsonl(folder / "marco.jsonl")
    both = lambda p, **kw: {"train": {"path": str(p), **kw}, "validation": {"path": str(p), **kw}}  # noqa: E731
    return {
        "arc": {"task_type": "multiple_choice", "inputs": both(arc),
                "fields": {"question": "question.stem", "choices": "question.choices", "label": "answerKey"}},
        "piqa": {"task_type": "multiple_choice", "inputs": both(piqa, format="tsv"),
                 "fields": {"question": "goal", "choices": "sol1,sol2", "label": "label"}},
        "pos": {"task_type": "tagging", "inputs": both(conll, format="conll", tag_column="pos")},
        "chunk": {"task_type": "tagging", "inputs": both(conll, format="conll", tag_column="chunk")},
        "marco": {"task_type": "generative_qa", "inputs": both(marco),
                  "fields": {"question": "query", "context": "passage", "answers": "answers"}},
    }


def all_texts(folder: Path) -> list[str]:
    """Every word of the files above (for a tokenizer trained on them)."""
    texts = [q + " " + " ".join(c) for q, c, _ in ARC] + [" ".join(r[:3]) for r in PIQA]
    texts += [" ".join(line.split()[:1]) for line in CONLL.splitlines() if line.strip()]
    texts += [" ".join([q, p] + a) for q, p, a in MARCO]
    return texts
