"""The embedded demo: a small, deterministic multitask corpus in real file formats.

``make_demo_assets(out_dir)`` (CLI: ``megamt demo-corpus OUT_DIR``) writes

- ``corpus/``: six tasks covering the five task types, each in the format users have:
  ``sentiment`` (classification, GLUE-style TSV), ``nli`` (pair classification, CSV with
  quoting), ``qa`` (extractive QA, SQuAD v1.1 JSON), ``ner`` (CoNLL columns; train in IOB1,
  validation in IOB2), ``summ`` (summarization, JSONL), ``instruct`` (instruction, JSONL with
  its own field names mapped in the spec);
- ``tokenizer/``: a WordPiece tokenizer trained on the corpus with ``tokenizers``, saved as a
  ``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained(dir)`` loads it) with
  ``[PAD] [UNK] [CLS] [SEP] [MASK] <s> </s>`` and a BERT-style post-processor;
- ``spec.yaml``: a valid megamt config (``tasks:``, a tiny Llama ``model.from_config`` -- or a tiny
  T5 with ``--family seq2seq`` --,
  ``data.shards_dir`` / ``data.tokenizer`` pointing into OUT_DIR).

Every answer follows a rule a tiny model learns in a few hundred steps: sentiment from the
adjectives' polarity, entailment = the hypothesis repeats the premise's subject and verb,
QA answers are copied from the context, NER tags come from a small gazetteer, the summary
is the document's first sentence, instructions are reverse / count / first / last / repeat.
Same seed → byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

PERSONS = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Liam",
           "Mia", "Noah", "Olga", "Paul"]
SURNAMES = ["Smith", "Brown", "Jones", "Miller", "Davis", "Wilson"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Cairo", "Lima", "Oslo", "Vienna", "Dublin", "Prague"]
ORGS = ["Google", "Acme", "Siemens", "Nokia", "Fiat", "Sony", "Intel", "Oxfam", "Unicef", "Boeing"]
NOUNS = ["movie", "book", "song", "meal", "game", "show", "trip", "hotel", "class", "play", "story", "car"]
POSITIVE = ["great", "wonderful", "fun", "lovely", "excellent", "charming", "brilliant", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "bad", "painful", "messy", "horrible"]
VERBS = ["visited", "painted", "sold", "bought", "cleaned", "repaired", "found", "liked"]
THINGS = ["apples", "tea", "music", "chess", "books", "coffee", "rain", "snow", "bread", "maps"]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock", "milk",
         "lamp", "door", "ship", "king", "road", "gold", "salt"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]


def _sentiment(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    adjs = POSITIVE if positive else NEGATIVE
    a, b = rng.sample(adjs, 2)
    noun = rng.choice(NOUNS)
    form = rng.randrange(3)
    if form == 0:
        s = f"the {noun} was {a} and {b} ."
    elif form == 1:
        s = f"a {a} {noun} , really {b} ."
    else:
        s = f"i found this {noun} {a} ; {b} overall ."
    return {"sentence": s, "label": "positive" if positive else "negative"}


def _nli(rng: random.Random) -> dict:
    name, verb, noun, city = rng.choice(PERSONS), rng.choice(VERBS), rng.choice(NOUNS), rng.choice(CITIES)
    premise = f"{name} {verb} the {noun} in {city} ."
    if rng.random() < 0.5:
        hyp, label = f"{name} {verb} the {noun} .", "entailment"
    elif rng.random() < 0.5:
        hyp, label = f"{rng.choice([p for p in PERSONS if p != name])} {verb} the {noun} .", "not_entailment"
    else:
        hyp, label = f"{name} {rng.choice([v for v in VERBS if v != verb])} the {noun} .", "not_entailment"
    return {"premise": premise, "hypothesis": hyp, "label": label}


def _qa(rng: random.Random, idx: int) -> dict:
    a, b, c = rng.sample(PERSONS, 3)
    city, org, thing = rng.choice(CITIES), rng.choice(ORGS), rng.choice(THINGS)
    facts = [(f"{a} lives in {city} .", f"where does {a} live ?", city),
             (f"{b} works at {org} .", f"where does {b} work ?", org),
             (f"{c} likes {thing} .", f"what does {c} like ?", thing)]
    rng.shuffle(facts)
    context = " ".join(f for f, _, _ in facts)
    _, question, answer = facts[rng.randrange(3)]
    # the answer is the word before the final " ." of its fact; find it in the fact's position
    fact = next(f for f, _, ans in facts if ans == answer and f"{answer} ." in f)
    start = context.index(fact) + fact.rindex(answer)
    return {"id": f"demo-qa-{idx:05d}", "context": context, "question": question,
            "answers": [{"text": answer, "answer_start": start}]}


def _ner(rng: random.Random) -> list[tuple[str, str]]:
    """(token, IOB2 tag) pairs."""
    person = [rng.choice(PERSONS)] + ([rng.choice(SURNAMES)] if rng.random() < 0.4 else [])
    city, org = rng.choice(CITIES), rng.choice(ORGS)
    form = rng.randrange(3)
    per = [(w, ("B-PER" if i == 0 else "I-PER")) for i, w in enumerate(person)]
    if form == 0:
        return per + [("visited", "O"), (city, "B-LOC"), ("with", "O"), (org, "B-ORG"), ("staff", "O"), (".", "O")]
    if form == 1:
        return [("the", "O"), (rng.choice(NOUNS), "O"), ("from", "O"), (org, "B-ORG"), ("reached", "O"),
                (city, "B-LOC"), (".", "O")]
    return [("in", "O"), (city, "B-LOC"), (",", "O")] + per + [("joined", "O"), (org, "B-ORG"), (".", "O")]


def _iob1(tags: list[str]) -> list[str]:
    """IOB2 → IOB1 (B- only between two adjacent entities of the same type), like CoNLL-2003."""
    out = []
    prev = "O"
    for t in tags:
        if t.startswith("B-") and not (prev != "O" and prev[2:] == t[2:]):
            t = "I-" + t[2:]
        out.append(t)
        prev = t
    return out


def _summ(rng: random.Random, idx: int) -> dict:
    name, city, org, noun = rng.choice(PERSONS), rng.choice(CITIES), rng.choice(ORGS), rng.choice(NOUNS)
    first = rng.choice([f"{name} moved to {city} to work at {org} .",
                        f"{org} opened a new office in {city} .",
                        f"{name} wrote a {rng.choice(POSITIVE)} {noun} about {city} ."])
    filler = [f"the weather in {rng.choice(CITIES)} was {rng.choice(['cold', 'warm', 'mild'])} .",
              f"{rng.choice(PERSONS)} likes {rng.choice(THINGS)} .",
              f"many people read the {rng.choice(NOUNS)} .",
              f"{rng.choice(ORGS)} sold {rng.choice(THINGS)} last year ."]
    rng.shuffle(filler)
    doc = " ".join([first] + filler[: 2 + rng.randrange(2)])
    return {"id": f"demo-sum-{idx:05d}", "document": doc, "summary": first}


def _instruct(rng: random.Random) -> dict:
    words = rng.sample(WORDS, 2 + rng.randrange(4))
    text = " ".join(words)
    kind = rng.randrange(5)
    if kind == 0:
        return {"instruction": f"reverse the words : {text}", "output": " ".join(reversed(words))}
    if kind == 1:
        return {"instruction": f"count the words : {text}", "output": str(len(words))}
    if kind == 2:
        return {"instruction": f"first word : {text}", "output": words[0]}
    if kind == 3:
        return {"instruction": f"last word : {text}", "output": words[-1]}
    return {"instruction": f"repeat twice : {text}", "output": f"{text} {text}"}


@dataclass
class DemoAssets:
    root: Path
    spec: Path
    tokenizer: Path
    corpus: Path
    shards: Path


def write_corpus(corpus: Path, seed: int = 0, n_train: int = 400, n_val: int = 50) -> None:
    """Write the six demo tasks (train + validation) under ``corpus/``."""
    for split, n, off in (("train", n_train, 0), ("validation", n_val, 10_000)):
        def rng_for(task: str) -> random.Random:
            return random.Random(f"megamt-demo:{seed}:{task}:{split}")

        d = corpus / "sentiment"
        d.mkdir(parents=True, exist_ok=True)
        r = rng_for("sentiment")
        with open(d / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                row = _sentiment(r)
                f.write(f"{row['sentence']}\t{row['label']}\n")

        d = corpus / "nli"
        d.mkdir(parents=True, exist_ok=True)
        r = rng_for("nli")
        with open(d / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["premise", "hypothesis", "label"])
            for _ in range(n):
                row = _nli(r)
                w.writerow([row["premise"], row["hypothesis"], row["label"]])

        d = corpus / "qa"
        d.mkdir(parents=True, exist_ok=True)
        r = rng_for("qa")
        paragraphs = []
        for i in range(n):
            q = _qa(r, off + i)
            paragraphs.append({"context": q["context"], "qas": [{"answers": q["answers"], "question": q["question"],
                                                                  "id": q["id"]}]})
        doc = {"data": [{"title": "demo", "paragraphs": paragraphs}], "version": "1.1"}
        (d / f"{split}.json").write_text(json.dumps(doc), encoding="utf-8")

        d = corpus / "ner"
        d.mkdir(parents=True, exist_ok=True)
        r = rng_for("ner")
        lines = ["-DOCSTART- -X- -X- O", ""]
        for _ in range(n):
            pairs = _ner(r)
            tags = [t for _, t in pairs]
            if split == "train":
                tags = _iob1(tags)
            for (tok, _), tag in zip(pairs, tags):
                pos = "NNP" if tag != "O" else "XX"
                lines.append(f"{tok} {pos} O {tag}")
            lines.append("")
        (d / f"{split}.conll").write_text("\n".join(lines) + "\n", encoding="utf-8")

        for task, fn in (("summ", _summ), ("instruct", None)):
            d = corpus / task
            d.mkdir(parents=True, exist_ok=True)
            r = rng_for(task)
            with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for i in range(n):
                    row = _summ(r, off + i) if task == "summ" else _instruct(r)
                    f.write(json.dumps(row, sort_keys=True) + "\n")


def demo_spec(corpus_rel: str = "corpus") -> dict:
    """The task section of the demo spec (paths relative to the spec file)."""
    def inputs(task: str, ext: str, fmt: str, **kw) -> dict:
        return {split: {"path": f"{corpus_rel}/{task}/{split}.{ext}", "format": fmt, **kw}
                for split in ("train", "validation")}

    return {
        "sentiment": {"task_type": "classification", "inputs": inputs("sentiment", "tsv", "tsv"),
                      "fields": {"text": "sentence", "label": "label"}, "labels": ["negative", "positive"]},
        "nli": {"task_type": "classification", "inputs": inputs("nli", "csv", "csv", quoting=True),
                "fields": {"text": "premise", "text_pair": "hypothesis", "label": "label"},
                "labels": ["entailment", "not_entailment"],
                "verbalizers": {"entailment": "yes", "not_entailment": "no"}},
        "qa": {"task_type": "extractive_qa", "inputs": inputs("qa", "json", "squad")},
        "ner": {"task_type": "ner", "inputs": inputs("ner", "conll", "conll"), "labels": ["LOC", "ORG", "PER"]},
        "summ": {"task_type": "summarization", "inputs": inputs("summ", "jsonl", "jsonl")},
        "instruct": {"task_type": "instruction", "inputs": inputs("instruct", "jsonl", "jsonl"),
                     "fields": {"prompt": "instruction", "response": "output"}},
    }


def build_tokenizer(texts, out_dir: Path, vocab_size: int = 2000) -> Path:
    """A WordPiece tokenizer for ``texts``, saved as a ``PreTrainedTokenizerFast``.

    The vocabulary is built deterministically (``tokenizers``' WordPiece trainer iterates a
    hash map, so two runs differ): the special tokens, every character seen (alone and as a
    ``##`` continuation), then whole words by descending frequency (ties alphabetical) up to
    ``vocab_size``. Words outside the vocabulary fall back to characters.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from megamt.data.tokenize import SPECIAL_TOKENS, save_fast_tokenizer

    norm, pre = normalizers.NFC(), pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer = norm
    tk.pre_tokenizer = pre
    tk.decoder = decoders.WordPiece(prefix="##")
    save_fast_tokenizer(tk, out_dir, model_max_length=4096)
    return out_dir


def corpus_texts(corpus: Path) -> list[str]:
    """Every text of the corpus files plus every built-in template's words (for the tokenizer)."""
    from megamt.data.templates import REGISTRY

    texts = []
    for p in sorted(corpus.rglob("*")):
        if p.is_file():
            texts.extend(p.read_text(encoding="utf-8").splitlines())
    texts += [t.prompt + " " + t.target for t in REGISTRY.values()]
    texts += ["none", "; : PER LOC ORG MISC", "positive negative entailment not_entailment",
              "0 1 2 3 4 5 6 7 8 9 10"]
    return texts


def make_demo_assets(out_dir: str | Path, seed: int = 0, n_train: int = 400, n_val: int = 50,
                     seq_len: int = 256, family: str = "causal_lm") -> DemoAssets:
    """Write corpus, tokenizer and spec.yaml under ``out_dir``; returns their paths.
    ``family``: the spec's tiny model, a Llama (causal_lm) or a T5 (seq2seq, decoder rows of
    ``seq_len // 4`` tokens)."""
    root = Path(out_dir).resolve()
    corpus = root / "corpus"
    write_corpus(corpus, seed=seed, n_train=n_train, n_val=n_val)
    tok_dir = build_tokenizer(corpus_texts(corpus), root / "tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = len(tok)
    if family == "seq2seq":  # T5's decoder starts from its pad id; EOS is the tokenizer's
        model = {"from_config": {"model_type": "t5", "vocab_size": vocab, "d_model": 64, "d_kv": 16, "d_ff": 128,
                                 "num_layers": 2, "num_heads": 4, "dropout_rate": 0.0,
                                 "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                                 "decoder_start_token_id": tok.pad_token_id}}
    elif family == "causal_lm":
        model = {"family": "causal_lm", "from_config": {
            "model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": max(512, seq_len), "tie_word_embeddings": True}}
    else:
        raise ValueError(f"make_demo_assets: family must be causal_lm or seq2seq, got {family!r}")
    spec = {
        "tasks": demo_spec("corpus"),
        "model": model,
        "data": {"shards_dir": str(root / "shards"), "tokenizer": str(tok_dir), "seq_len": seq_len,
                 **({"target_len": seq_len // 4} if family == "seq2seq" else {}), "seed": seed},
        "mixture": {"strategy": "temperature", "temperature": 2.0},
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text("# megamt demo spec (written by `megamt demo-corpus`)\n" +
                         yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return DemoAssets(root=root, spec=spec_path, tokenizer=tok_dir, corpus=corpus, shards=root / "shards")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt demo-corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="folder to write corpus/, tokenizer/ and spec.yaml into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=400, help="train examples per task")
    ap.add_argument("--n-val", type=int, default=50, help="validation examples per task")
    ap.add_argument("--seq-len", type=int, default=256, help="data.seq_len written into the spec")
    ap.add_argument("--family", choices=["causal_lm", "seq2seq"], default="causal_lm",
                    help="the spec's tiny model: a Llama, or a T5 (encoder-decoder, data.target_len = seq_len/4)")
    args = ap.parse_args(argv)
    a = make_demo_assets(args.out_dir, seed=args.seed, n_train=args.n_train, n_val=args.n_val, seq_len=args.seq_len,
                         family=args.family)
    print(f"demo corpus: {a.corpus}\ntokenizer:   {a.tokenizer}\nspec:        {a.spec}\n"
          f"next: megamt build-shards {a.spec} --out {a.shards} --tokenizer {a.tokenizer}")
    return 0
