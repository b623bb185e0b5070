"""Tokenization: (example, prompt, target) → the arrays of one shard sample.

Text-to-text (causal LMs): ``prompt_ids`` = [BOS] + prompt tokens, ``target_ids`` =
target tokens + [EOS]; no other special tokens, so prompt + target concatenate cleanly.

Encoder inputs: ``enc_ids`` is what the tokenizer itself produces with its special tokens
(a BERT-style post-processor gives ``[CLS] a [SEP] b [SEP]``): the text (pair) for
classification, ``(question, context)`` for QA with the answer's character span mapped to a
token span through the offsets, and the words of a NER / tagging sentence with ``enc_tags`` =
tag id on each word's first sub-token and -100 on the others. A multiple-choice example is
encoded once per choice, ``(question, choice)`` or ``(question + " " + choice, context)`` (the
context last, so that cutting an overlong choice from the right shortens the context, never the
choice), the encodings concatenated in ``enc_ids`` and their lengths in ``meta["choice_lens"]``
(the packer keeps them together in one row, the multiple-choice head scores each).

Needs a *fast* (Rust) tokenizer for offsets and word ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megamt.data.errors import DataError
from megamt.data.formats import Example

IGNORE = -100


def load_tokenizer(path: str | Path):
    """A Hugging Face fast tokenizer from a local folder (no hub access)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(str(path), "missing_tokenizer", "tokenizer folder not found (build the demo one with "
                        "`megamt demo-corpus OUT`, or point data.tokenizer at a local HF tokenizer folder)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise DataError(str(path), "slow_tokenizer", "megamt needs a fast tokenizer (tokenizer.json) for offsets")
    return tok


def vocab_hash(tok) -> str:
    """SHA-256 of the vocabulary (token → id) and the special tokens: identifies a tokenizer."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(special_ids(tok), sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def special_ids(tok) -> dict[str, Optional[int]]:
    """bos / eos / pad ids as megamt uses them (pad falls back to eos, eos to sep)."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None or pad is None:
        raise DataError(str(getattr(tok, "name_or_path", "tokenizer")), "missing_special",
                        "the tokenizer has neither an eos nor a sep token; add one")
    return {"bos": tok.bos_token_id, "eos": int(eos), "pad": int(pad)}


def tokenizer_info(tok, path: str | Path) -> dict[str, Any]:
    ids = special_ids(tok)
    return {"name": Path(str(path)).name, "path": str(path), "vocab_hash": vocab_hash(tok),
            "vocab_size": len(tok), **{f"{k}_id": v for k, v in ids.items()}}


def _i32(xs) -> np.ndarray:
    return np.asarray(xs, dtype=np.int32)


def choice_pairs(fields: dict) -> list[tuple[str, str]]:
    """The text pairs a multiple-choice example is encoded as, one per choice: ``(question,
    choice)``, or ``(question + " " + choice, context)`` (the context last: cutting from the
    right shortens it, never the choice)."""
    if "context" in fields:
        return [(f"{fields['question']} {c}", fields["context"]) for c in fields["choices"]]
    return [(fields["question"], c) for c in fields["choices"]]


def encode_example(ex: Example, prompt: str, target: str, template: str, tok, labels: Optional[list[str]],
                   ids: Optional[dict] = None) -> dict[str, Any]:
    """The shard sample (without ``__key__``) of one rendered example (raises DataError)."""
    out = encode_examples([(ex, prompt, target, template)], tok, labels, ids)[0]
    if isinstance(out, DataError):
        raise out
    return out


def _encode_optional_pair(tok, fields: list[dict], first: str, second: str) -> list[tuple[int, list[int]]]:
    """``(index, encoder ids)`` of every example: ``first`` alone, or ``first`` + ``second`` as a
    tokenizer pair where the example has it (two batch encodes: with and without the pair)."""
    out: list[tuple[int, list[int]]] = []
    for has_pair in (False, True):
        idx = [i for i, f in enumerate(fields) if (second in f) == has_pair]
        if idx:
            firsts = [fields[i][first] for i in idx]
            enc = tok(firsts, [fields[i][second] for i in idx]) if has_pair else tok(firsts)
            out.extend(zip(idx, enc["input_ids"]))
    return out


def encode_examples(rendered: list[tuple[Example, str, str, str]], tok, labels: Optional[list[str]],
                    ids: Optional[dict] = None) -> list[dict[str, Any] | DataError]:
    """Shard samples of rendered examples ``(example, prompt, target, template)`` of one task,
    tokenized in batches (the Rust tokenizer's batch encode). A sample that cannot be built
    comes back as a :class:`DataError` in its place."""
    if not rendered:
        return []
    ids = ids or special_ids(tok)
    bos = [ids["bos"]] if ids["bos"] is not None else []
    prompts = tok([r[1] for r in rendered], add_special_tokens=False)["input_ids"]
    targets = tok([r[2] for r in rendered], add_special_tokens=False)["input_ids"]
    ttype = rendered[0][0].task_type
    fields = [r[0].fields for r in rendered]
    out: list[dict[str, Any] | DataError] = []
    for (ex, _, target, template), p, t in zip(rendered, prompts, targets):
        meta = {"key": ex.key, "task": ex.task, "task_type": ex.task_type, "template": template, "target": target}
        out.append({"prompt_ids.npy": _i32(bos + p), "target_ids.npy": _i32(t + [ids["eos"]]), "meta.json": meta})
    if ttype == "classification":
        for i, e in _encode_optional_pair(tok, fields, "text", "text_pair"):
            lab = fields[i]["label"]
            out[i]["enc_ids.npy"] = _i32(e)
            out[i]["meta.json"].update(label=lab, references=[lab],
                                       class_id=labels.index(lab) if labels and lab in labels else -1)
    elif ttype == "extractive_qa":
        enc = tok([f["question"] for f in fields], [f["context"] for f in fields], return_offsets_mapping=True)
        for i, f in enumerate(fields):
            seq, offs = enc.sequence_ids(i), enc["offset_mapping"][i]
            ctx_tokens = [k for k, sid in enumerate(seq) if sid == 1]
            a = f["answers"][0]
            c0, c1 = a["answer_start"], a["answer_start"] + len(a["text"])
            start = next((k for k in ctx_tokens if offs[k][0] <= c0 < offs[k][1] or offs[k][0] >= c0), -1)
            end = next((k for k in reversed(ctx_tokens) if offs[k][0] < c1), -1)
            if start < 0 or end < start:
                out[i] = DataError(rendered[i][0].key, "answer_mismatch", f"answer {a['text']!r} maps to no context token")
                continue
            out[i]["enc_ids.npy"] = _i32(enc["input_ids"][i])
            out[i]["meta.json"].update(span=[start, end], ctx_span=[ctx_tokens[0], ctx_tokens[-1]],
                                       references=[x["text"] for x in f["answers"]])
    elif ttype == "multiple_choice":
        pairs = [p for f in fields for p in choice_pairs(f)]
        enc = tok([a for a, _ in pairs], [b for _, b in pairs])["input_ids"]
        k = 0
        for i, f in enumerate(fields):
            n = len(f["choices"])
            parts = enc[k:k + n]
            k += n
            out[i]["enc_ids.npy"] = _i32([t for p in parts for t in p])
            out[i]["meta.json"].update(choice_lens=[len(p) for p in parts], class_id=f["label"],
                                       references=[f["choices"][f["label"]]])
    elif ttype == "generative_qa":
        for i, e in _encode_optional_pair(tok, fields, "question", "context"):
            out[i]["enc_ids.npy"] = _i32(e)
            out[i]["meta.json"]["references"] = list(fields[i]["answers"])
    elif ttype in ("ner", "tagging"):
        enc = tok([f["tokens"] for f in fields], is_split_into_words=True)
        index = {t: k for k, t in enumerate(labels or [])}
        for i, f in enumerate(fields):
            tag_ids = [index.get(t, IGNORE) for t in f["tags"]]
            tags, prev = [], None
            for w in enc.word_ids(i):
                tags.append(tag_ids[w] if w is not None and w != prev else IGNORE)
                prev = w
            out[i]["enc_ids.npy"] = _i32(enc["input_ids"][i])
            out[i]["enc_tags.npy"] = _i32(tags)
            out[i]["meta.json"].update(references=list(f["tags"]), tokens=list(f["tokens"]))
    else:
        key, ref = ("document", "summary") if ttype == "summarization" else ("prompt", "response")
        enc = tok([f[key] for f in fields])
        for i, f in enumerate(fields):
            out[i]["enc_ids.npy"] = _i32(enc["input_ids"][i])
            out[i]["meta.json"]["references"] = [f[ref]]
    return out


# --------------------------------------------------------------------------- tokenizer checks

def tokenizer_stats(tok, texts: list[str]) -> dict[str, Any]:
    """How a tokenizer cuts real text: tokens per (whitespace) word, the share of ``[UNK]``
    tokens and of single-character tokens (``##`` / ``Ġ`` / ``▁`` markers ignored).

    A tokenizer trained on other text (the demo corpus' on news or reviews) spells unknown
    words letter by letter and turns unseen characters into ``[UNK]``: the model then sees
    several times more tokens than words and learns little. :func:`tokenizer_warning` says so.
    """
    words = sum(len(t.split()) for t in texts)
    ids = tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    n = sum(len(x) for x in ids)
    unk = tok.unk_token_id
    n_unk = sum(x.count(unk) for x in ids) if unk is not None else 0
    vocab = tok.convert_ids_to_tokens(sorted({i for x in ids for i in x})) if n else []
    single_ids = {i for i, t in zip(sorted({i for x in ids for i in x}), vocab)
                  if t is not None and len(t.removeprefix("##").lstrip("Ġ▁")) <= 1}
    n_single = sum(1 for x in ids for i in x if i in single_ids and i != unk)
    return {"texts": len(texts), "words": words, "tokens": n,
            "tokens_per_word": round(n / words, 3) if words else 0.0,
            "unk_rate": round(n_unk / n, 4) if n else 0.0,
            "single_char_rate": round(n_single / n, 4) if n else 0.0}


# Above these a tokenizer does not fit the text. Measured on 300 validation texts each of
# SST-2, RTE, CoNLL-2003 and DialogSum: the MiniLM WordPiece gave 1.2-1.6 tokens per word,
# 0 % [UNK] and 18-40 % single-character tokens (punctuation); the demo corpus' tokenizer
# 3.7-4.6 tokens per word, 0.4-1.4 % [UNK] and 93 % single characters.
MAX_TOKENS_PER_WORD = 2.0
MAX_UNK_RATE = 0.01
MAX_SINGLE_CHAR_RATE = 0.6


def tokenizer_warning(stats: dict[str, Any]) -> Optional[str]:
    """A sentence naming what is wrong with the tokenizer on this text, or None when it fits."""
    problems = []
    if stats["single_char_rate"] > MAX_SINGLE_CHAR_RATE:
        problems.append(f"{stats['single_char_rate']:.0%} of the tokens are single characters")
    if stats["tokens_per_word"] > MAX_TOKENS_PER_WORD:
        problems.append(f"{stats['tokens_per_word']:.1f} tokens per word")
    if stats["unk_rate"] > MAX_UNK_RATE:
        problems.append(f"{stats['unk_rate']:.1%} of the tokens are [UNK]")
    if not problems:
        return None
    return ("the tokenizer does not fit this text (" + ", ".join(problems) + "): the model would read it "
            "letter by letter or not at all. Train one on your training files with `megamt build-tokenizer "
            "SPEC` (then rebuild the shards), or use the pretrained model's own tokenizer")


def format_stats(stats: dict[str, Any]) -> str:
    return (f"{stats['tokens_per_word']:.2f} tokens/word, {stats['unk_rate']:.1%} [UNK], "
            f"{stats['single_char_rate']:.0%} single-character tokens (on {stats['texts']} texts)")


def example_texts(ex: Example) -> list[str]:
    """The natural-language text of an example (what a tokenizer must cut well)."""
    f = ex.fields
    out = [f[k] for k in ("text", "text_pair", "context", "question", "document", "summary", "prompt", "response")
           if isinstance(f.get(k), str)]
    if isinstance(f.get("tokens"), list):
        out.append(" ".join(f["tokens"]))
    if isinstance(f.get("answers"), list):  # SQuAD dicts, or generative QA's answer strings
        out += [a["text"] if isinstance(a, dict) else a for a in f["answers"]
                if isinstance(a, str) or (isinstance(a, dict) and isinstance(a.get("text"), str))]
    if isinstance(f.get("choices"), list):  # multiple choice
        out += [c for c in f["choices"] if isinstance(c, str)]
    return out


# --------------------------------------------------------------------------- megamt build-tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def train_tokenizer(texts, out_dir: str | Path, vocab_size: int = 8000, kind: str = "wordpiece",
                    min_frequency: int = 2, lowercase: bool = False) -> Path:
    """Train a tokenizer on ``texts`` with the ``tokenizers`` library and save it as a
    ``PreTrainedTokenizerFast`` folder (``AutoTokenizer.from_pretrained(out_dir)``).

    ``wordpiece``: BERT's pre-tokenizer and ``##`` continuations; ``bpe``: GPT-2's byte-level
    BPE (no ``[UNK]`` ever). Both get megamt's special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]
    <s> </s>`` (``<s>``/``</s>`` = BOS/EOS of the text-to-text samples) and a BERT-style
    post-processor (``[CLS] a [SEP] b [SEP]``) for encoder inputs.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=SPECIAL_TOKENS, continuing_subword_prefix="##",
                                            show_progress=False)
    elif kind == "bpe":
        tk = Tokenizer(models.BPE(unk_token="[UNK]"))
        # a space before every word, the first too: words given one by one (NER) cut as in running text
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        raise ValueError(f"tokenizer kind {kind!r}: wordpiece or bpe")
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    tk.normalizer = normalizers.Sequence(steps)
    tk.train_from_iterator(texts, trainer=trainer)
    return save_fast_tokenizer(tk, out_dir, byte_level=kind == "bpe")


def save_fast_tokenizer(tk, out_dir: str | Path, model_max_length: int = 1_000_000, byte_level: bool = False) -> Path:
    """A ``tokenizers.Tokenizer`` holding :data:`SPECIAL_TOKENS` -> a ``PreTrainedTokenizerFast``
    folder with a BERT-style post-processor (``[CLS] a [SEP] b [SEP]``) and megamt's roles of
    the special tokens (``<s>``/``</s>`` = BOS/EOS of text-to-text samples)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = tk.get_vocab()
    template = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    # byte-level pieces carry their leading space ("Ġword"): trim it from the character offsets
    # that map QA answers to tokens
    tk.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=True), template]) if byte_level
                         else template)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="<s>", eos_token="</s>",
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def spec_texts(cfg, split: str = "train", on_error: str = "raise", log=print) -> list[str]:
    """Every text of the spec's ``split`` inputs (zero-shot tasks excluded: they are held out),
    plus the words the prompts add (templates, verbalised labels, NER entity types)."""
    from megamt.data.errors import SkipCounter
    from megamt.data.formats import read_examples, resolve_labels
    from megamt.data.templates import resolve_templates

    texts: list[str] = []
    for name, task in cfg.tasks.items():
        if task.zero_shot or split not in task.inputs:
            continue
        skips = SkipCounter()
        n0 = len(texts)
        for ex in read_examples(name, task, split, on_error=on_error, skips=skips):
            texts.extend(example_texts(ex))
        if log:
            sk = f", skipped {skips.as_dict()}" if skips.total() else ""
            log(f"  {name}/{split}: {len(texts) - n0} texts{sk}")
        texts += [t.prompt + " " + t.target for t in resolve_templates(task)]
        labels = resolve_labels(name, task, on_error) or []
        texts += [" ".join(labels), " ".join((task.verbalizers or {}).values()), task.instruction or ""]
    return [t for t in texts if t]


def main(argv: list[str] | None = None) -> int:
    """``megamt build-tokenizer SPEC``: a tokenizer for the spec's own training text."""
    import argparse
    import sys

    from megamt.config import ConfigError, load_config

    ap = argparse.ArgumentParser(
        prog="megamt build-tokenizer",
        description="Train a tokenizer (tokenizers' WordPiece or byte-level BPE) on the text of a spec's "
                    "training inputs, so the model reads words, not letters. Writes a Hugging Face tokenizer "
                    "folder to --out (default: the spec's data.tokenizer); build the shards afterwards. "
                    "A pretrained model brings its own tokenizer: use that one instead.")
    ap.add_argument("spec", help="task spec / megamt config YAML with a tasks: section")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.tokenizer=runs/tok")
    ap.add_argument("--out", help="output folder (default: data.tokenizer of the spec)")
    ap.add_argument("--vocab-size", type=int, default=8000, help="target vocabulary size (default 8000); the "
                    "model's vocab_size must be at least this")
    ap.add_argument("--kind", choices=["wordpiece", "bpe"], default="wordpiece",
                    help="wordpiece (BERT-style, default) or bpe (GPT-2-style byte-level)")
    ap.add_argument("--min-frequency", type=int, default=2, help="a merge/piece must occur this often")
    ap.add_argument("--lowercase", action="store_true", help="lowercase the text first")
    ap.add_argument("--split", default="train", help="the split whose text trains it (default train)")
    ap.add_argument("--on-error", choices=["raise", "skip"], default=None,
                    help="bad input rows: raise (default: data.on_error) or skip and count")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.spec, args.overrides)
        out = args.out or cfg.data.tokenizer
        if not out:
            raise ConfigError(["data.tokenizer: not set; pass --out DIR (and point data.tokenizer at it)"])
        print(f"build-tokenizer: reading the {args.split} text of {args.spec}")
        texts = spec_texts(cfg, args.split, args.on_error or cfg.data.on_error)
        if not texts:
            raise ConfigError([f"tasks: no task has a {args.split!r} input to train a tokenizer on"])
        path = train_tokenizer(texts, out, args.vocab_size, args.kind, args.min_frequency, args.lowercase)
        tok = load_tokenizer(path)
        stats = tokenizer_stats(tok, texts[:2000])
        print(f"build-tokenizer: {len(tok)} tokens ({args.kind}) -> {path}\n  on the training text: "
              f"{format_stats(stats)}")
        if cfg.data.tokenizer and Path(cfg.data.tokenizer).resolve() != Path(path).resolve():
            print(f"  point the spec at it: data.tokenizer={path}")
    except (ConfigError, DataError, OSError) as e:
        print(f"megamt build-tokenizer: error: {e}", file=sys.stderr)
        return 1
    return 0
