"""`megamt build-tokenizer` trains a tokenizer on a spec's own training text, and build-shards
says per task how a tokenizer cuts the text (tokens per word, [UNK], single characters),
warning when it reads real text letter by letter (the demo tokenizer on SST-2 did)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megamt.config import load_config

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megamt.data.synthetic import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("demo"), n_train=20, n_val=5, seq_len=64)


def _reviews_spec(root: Path, tokenizer: Path) -> Path:
    """A headerless review CSV with words the demo corpus never uses (and an apostrophe)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(60):
        label, adjectives, verb = (("pos", "luminous, heartfelt", "captivates") if i % 2 == 0 else
                                   ("neg", "tedious, clumsy", "exhausts"))
        lines.append(f'{label},"the screenplay\'s {adjectives} storytelling {verb} audiences everywhere"')
    (data / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (data / "dev.csv").write_text("\n".join(lines[:10]) + "\n", encoding="utf-8")
    spec = {"tasks": {"reviews": {"task_type": "classification",
                                  "inputs": {"train": {"path": "data/train.csv", "columns": ["label", "text"]},
                                             "validation": {"path": "data/dev.csv", "columns": ["label", "text"]}}}},
            "data": {"tokenizer": str(tokenizer), "shards_dir": str(root / "shards"), "seq_len": 64}}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_demo_tokenizer_on_real_text_warns_and_build_tokenizer_fixes_it(demo, tmp_path, capsys):
    from megamt.cli import main
    from megamt.data.tokenize import load_tokenizer

    spec = _reviews_spec(tmp_path, demo.tokenizer)
    assert main(["build-shards", str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer check (per task):" in out and "reviews/train:" in out
    assert "WARNING reviews: the tokenizer does not fit this text" in out and "megamt build-tokenizer" in out

    tok_dir = tmp_path / "tok"
    assert main(["build-tokenizer", str(spec), "--out", str(tok_dir), "--vocab-size", "300",
                 "--min-frequency", "1"]) == 0
    out = capsys.readouterr().out
    assert f"-> {tok_dir}" in out and "tokens/word" in out
    tok = load_tokenizer(tok_dir)
    assert tok.tokenize("the screenplay's heartfelt storytelling") == ["the", "screenplay", "'", "s", "heartfelt",
                                                                       "storytelling"]
    # the special tokens megamt's samples use: BOS/EOS for text-to-text, [CLS]/[SEP] pairs for encoders
    assert tok("a b", "c")["input_ids"][0] == tok.cls_token_id and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert main(["build-shards", str(spec), f"data.tokenizer={tok_dir}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0.0% [UNK]" in out and "WARNING" not in out
    import json

    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    check = m["tasks"]["reviews"]["splits"]["train"]["tokenizer_check"]
    assert check["unk_rate"] == 0.0 and check["tokens_per_word"] < 1.5


def test_overlong_examples_are_counted_and_warned(demo, tmp_path, capsys):
    from megamt.cli import main

    spec = _reviews_spec(tmp_path, demo.tokenizer)
    assert main(["build-shards", str(spec), "data.seq_len=16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "60 of 60 examples longer than data.seq_len=16" in out
    assert "WARNING reviews: 100% of the examples are longer than data.seq_len=16" in out


def test_tokenizer_stats_numbers():
    from megamt.data.tokenize import tokenizer_stats, tokenizer_warning

    class Tok:  # a stand-in: every character is a token, "#" is unknown
        unk_token_id = 0

        def __call__(self, texts, add_special_tokens=False, verbose=False):
            return {"input_ids": [[0 if c == "#" else ord(c) for c in t.replace(" ", "")] for t in texts]}

        def convert_ids_to_tokens(self, ids):
            return ["[UNK]" if i == 0 else chr(i) for i in ids]

    s = tokenizer_stats(Tok(), ["ab #", "cd"])
    assert s == {"texts": 2, "words": 3, "tokens": 5, "tokens_per_word": round(5 / 3, 3), "unk_rate": 0.2,
                 "single_char_rate": 0.8}
    w = tokenizer_warning(s)
    assert "80% of the tokens are single characters" in w and "20.0% of the tokens are [UNK]" in w


def test_build_tokenizer_errors_are_one_line(tmp_path, capsys):
    from megamt.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"tasks": {"t": {"inputs": {"validation": {"path": "v.csv"}}}}}))
    assert main(["build-tokenizer", str(spec), "--out", str(tmp_path / "tok")]) == 1
    assert "no task has a 'train' input" in capsys.readouterr().err
    assert main(["build-tokenizer", str(spec)]) == 1
    assert "data.tokenizer: not set; pass --out DIR" in capsys.readouterr().err


@pytest.mark.skipif(not (REAL / "sst2").is_dir(), reason="no ../shared/data")
def test_examples_tiny_cpu_tokenizer_fits_the_real_samples(tmp_path):
    """examples/tiny_cpu.yaml's tokenizer comes from `megamt build-tokenizer` on its own
    training files: words, not letters, on SST-2, RTE and CoNLL (the demo tokenizer gave
    3.7-4.6 tokens per word and 93 % single characters there)."""
    from megamt.data.formats import read_examples
    from megamt.data.tokenize import example_texts, load_tokenizer, spec_texts, tokenizer_stats, \
        tokenizer_warning, train_tokenizer

    example = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
    cfg = load_config(example)
    tok = load_tokenizer(train_tokenizer(spec_texts(cfg, log=None), tmp_path / "tok", vocab_size=8000))
    assert len(tok) <= cfg.model.from_config["vocab_size"]
    for name, task in cfg.tasks.items():
        texts = [t for ex in read_examples(name, task, "validation") for t in example_texts(ex)]
        s = tokenizer_stats(tok, texts)
        assert tokenizer_warning(s) is None, (name, s)


def test_bpe_kind_cuts_given_words_as_running_text_and_trims_offsets(tmp_path):
    """Byte-level BPE: NER words given one by one get the same pieces as in running text
    (a space before every word), and the character offsets QA answers map through leave the
    pieces' leading space out."""
    from megamt.data.tokenize import load_tokenizer, train_tokenizer

    texts = ["Alice lives in Paris .", "where does Alice live ?", "Bob works at Acme in London ."] * 20
    tok = load_tokenizer(train_tokenizer(texts, tmp_path / "bpe", vocab_size=400, kind="bpe", min_frequency=1))
    words = tok(["Alice", "lives", "in", "Paris"], is_split_into_words=True)
    assert words["input_ids"][1:-1] == tok("Alice lives in Paris", add_special_tokens=False)["input_ids"]
    assert words.word_ids() == [None, 0, 1, 2, 3, None]
    enc = tok("where does Alice live ?", "Alice lives in Paris .", return_offsets_mapping=True)
    ctx = "Alice lives in Paris ."
    spans = [ctx[a:b] for (a, b), sid in zip(enc["offset_mapping"], enc.sequence_ids()) if sid == 1]
    assert spans == ["Alice", "lives", "in", "Paris", "."]
