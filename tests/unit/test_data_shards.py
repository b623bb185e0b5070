"""build-shards: determinism, manifest, multiprocess, read-back (ours and plain ShardWriter),
round trips on the real samples, and the shard-level bad inputs (corrupt / truncated tar,
manifest-tokenizer mismatch, skips written to the manifest)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megamt.config import load_config
from megamt.data.errors import DataError
from megamt.data.shards import build_shards, check_tokenizer, load_manifest, main, read_shard, split_shards
from megamt.data.synthetic import build_tokenizer, make_demo_assets
from megamt.data.tokenize import load_tokenizer

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    a = make_demo_assets(root, seed=1, n_train=40, n_val=25)
    cfg = load_config(a.spec, ["data.shard_max_examples=16"])
    manifest = build_shards(cfg, a.shards, a.tokenizer, progress=False, log=None)
    return a, cfg, manifest


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_demo_assets_deterministic(tmp_path, demo):
    a, _, _ = demo
    b = make_demo_assets(tmp_path / "again", seed=1, n_train=40, n_val=25)
    for sub in ("corpus", "tokenizer"):
        pa, pb = a.root / sub, b.root / sub
        files = sorted(p.relative_to(pa) for p in pa.rglob("*") if p.is_file())
        assert files and all((pa / f).read_bytes() == (pb / f).read_bytes() for f in files)
    tok = load_tokenizer(a.tokenizer)
    for name in ("pad", "eos", "bos", "unk", "cls", "sep", "mask"):
        assert getattr(tok, f"{name}_token_id") is not None
    assert 200 < len(tok) < 2000


def test_manifest_and_read_back(demo):
    a, cfg, m = demo
    assert m["tokenizer"]["vocab_hash"] == load_manifest(a.shards)["tokenizer"]["vocab_hash"]
    assert set(m["tasks"]) == {"sentiment", "nli", "qa", "ner", "summ", "instruct"}
    tok = load_tokenizer(a.tokenizer)
    for t, entry in m["tasks"].items():
        assert entry["type"] == cfg.tasks[t].task_type
        tr = entry["splits"]["train"]
        assert tr["examples"] == 40 and [s["examples"] for s in tr["shards"]] == [16, 16, 8]
        assert [s["file"] for s in tr["shards"]] == [f"{t}-train-{i:06d}.tar" for i in range(3)]
        samples = [s for p, n in split_shards(m, a.shards, t, "train") for s in read_shard(p, n)]
        assert sum(len(s["prompt_ids"]) + len(s["target_ids"]) for s in samples) == tr["tokens"]
        for s in samples[:5]:
            assert s["prompt_ids"].dtype == np.int32 and s["target_ids"][-1] == tok.eos_token_id
            assert s["prompt_ids"][0] == tok.bos_token_id
            assert tok(s["meta"]["target"], add_special_tokens=False)["input_ids"] == s["target_ids"][:-1].tolist()
            if entry["type"] == "extractive_qa":
                i, j = s["meta"]["span"]
                assert tok.decode(s["enc_ids"][i:j + 1]) == s["meta"]["references"][0]
            if entry["type"] == "ner":
                first = s["enc_tags"][s["enc_tags"] != -100]
                assert [entry["labels"][k] for k in first] == s["meta"]["references"]
            if entry["type"] == "classification":
                assert entry["labels"][s["meta"]["class_id"]] == s["meta"]["label"]
                assert s["enc_ids"][0] == tok.cls_token_id


def test_deterministic_and_multiprocess(tmp_path, demo):
    a, cfg, _ = demo
    build_shards(cfg, tmp_path / "w2", a.tokenizer, workers=2, progress=False, log=None)
    assert _digests(tmp_path / "w2") == _digests(a.shards)
    # the same corpus in another folder: the same templates and tokens (only meta keys name the path)
    shutil.copytree(a.root / "corpus", tmp_path / "moved" / "corpus")
    shutil.copy(a.spec, tmp_path / "moved" / "spec.yaml")
    moved = load_config(tmp_path / "moved" / "spec.yaml", ["data.shard_max_examples=16"])
    build_shards(moved, tmp_path / "w3", a.tokenizer, progress=False, log=None)

    def content(d):
        return [(s["meta"]["template"], s["prompt_ids"].tolist(), s["target_ids"].tolist())
                for p, n in split_shards(load_manifest(d), d, "qa", "train") for s in read_shard(p, n)]

    assert content(tmp_path / "w3") == content(a.shards)


def test_cli_with_overrides_and_skip(tmp_path, demo, capsys):
    a, _, _ = demo
    bad = tmp_path / "spec"
    shutil.copytree(a.root / "corpus", bad / "corpus")
    shutil.copy(a.spec, bad / "spec.yaml")
    with open(bad / "corpus" / "sentiment" / "train.tsv", "a") as f:
        f.write("a lovely film\tmaybe\nno label here\n")
    out = tmp_path / "shards"
    assert main([str(bad / "spec.yaml"), "--out", str(out), "--tokenizer", str(a.tokenizer), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "train.tsv:42" in err and "unknown_label" in err
    assert main([str(bad / "spec.yaml"), "data.shard_max_examples=1000", "--out", str(out), "--tokenizer",
                 str(a.tokenizer), "--on-error", "skip", "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["tasks"]["sentiment"]["splits"]["train"]["skips"] == {"missing_field": 1, "unknown_label": 1}
    assert m["skips"] == {"missing_field": 1, "unknown_label": 1}
    assert m["tasks"]["sentiment"]["splits"]["train"]["examples"] == 40
    assert len(m["tasks"]["sentiment"]["splits"]["train"]["shards"]) == 1


def test_plain_shardwriter_reads_back(tmp_path):
    import webdataset as wds

    from megamt.data.streams import TaskStream

    with wds.ShardWriter(str(tmp_path / "x-train-%06d.tar"), maxcount=3, verbose=0) as w:
        for i in range(7):
            w.write({"__key__": f"s{i}", "prompt_ids.npy": np.arange(i + 2, dtype=np.int64),
                     "target_ids.npy": np.array([9, 2]), "meta.json": {"key": f"k{i}"}})
    shards = [(p, 3 if k < 2 else 1) for k, p in enumerate(sorted(tmp_path.glob("*.tar")))]
    got = list(TaskStream(shards, infinite=False))
    assert [s["meta"]["key"] for s in got] == [f"k{i}" for i in range(7)]
    assert all((s["prompt_ids"] == np.arange(i + 2)).all() for i, s in enumerate(got))


def test_pickle_member_refused(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "p.tar")) as w:
        w.write({"__key__": "a", "pyd": {"x": 1}})
    with pytest.raises(DataError, match="never unpickles"):
        list(read_shard(tmp_path / "p.tar"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "cut_at_member"])
def test_corrupt_or_truncated_tar_names_the_shard(tmp_path, demo, damage):
    a, _, m = demo
    p, n = split_shards(m, a.shards, "qa", "train")[0]
    bad = tmp_path / p.name
    data = p.read_bytes()
    if damage == "garbage":
        bad.write_bytes(data[:1024] + b"\x13" * 4096 + data[5120:])
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2 + 100])
    else:  # ends cleanly at a member boundary: only the count betrays it
        bad.write_bytes(data[: 512 * 20] + b"\0" * 1024)
    with pytest.raises(DataError) as e:
        list(read_shard(bad, expect=n))
    assert e.value.reason == "corrupt_shard" and str(bad) in str(e.value)


def test_manifest_tokenizer_mismatch(tmp_path, demo):
    a, cfg, m = demo
    other = build_tokenizer(["completely different words only"] * 3, tmp_path / "tok")
    check_tokenizer(m, a.tokenizer)
    with pytest.raises(DataError) as e:
        check_tokenizer(m, other, str(a.shards / "manifest.json"))
    assert e.value.reason == "tokenizer_mismatch" and "manifest.json" in str(e.value)
    from megamt.data.pipeline import TrainPipeline

    cfg2 = load_config(a.spec, [f"data.tokenizer={other}"])
    with pytest.raises(DataError, match="tokenizer_mismatch"):
        TrainPipeline(cfg2, log=None)
    with pytest.raises(DataError, match="missing_manifest"):
        load_manifest(tmp_path)


def _real(rel):
    p = REAL / rel
    if not p.exists():
        pytest.skip(f"real sample {p} absent")
    return str(p.resolve())


def test_real_samples_round_trip_through_shards(tmp_path):
    """Every real format → shards → read back: counts, targets and head labels intact."""
    from megamt.config import config_from_dict
    from megamt.data.formats import read_examples

    n = 150
    tasks = {
        "sst2": {"task_type": "classification", "fields": {"text": "sentence"}, "verbalizers": {"0": "negative", "1": "positive"},
                 "inputs": {"train": {"path": _real("sst2/train.tsv"), "max_examples": n}}},
        "rte": {"task_type": "classification", "fields": {"text": "sentence1", "text_pair": "sentence2"},
                "inputs": {"train": {"path": _real("rte/train.tsv"), "max_examples": n}}},
        "squad": {"task_type": "extractive_qa", "inputs": {"train": {"path": _real("squad_v1.1/dev-v1.1.json"),
                                                                     "max_examples": n}}},
        "conll": {"task_type": "ner", "inputs": {"train": {"path": _real("conll2003/eng.train"), "format": "conll",
                                                           "max_examples": n}}},
        "dsum": {"task_type": "summarization", "fields": {"document": "dialogue"},
                 "inputs": {"train": {"path": _real("dialogsum/dialogsum.train.jsonl"), "max_examples": n}}},
    }
    cfg = config_from_dict({"tasks": tasks, "model": {"from_config": {"model_type": "llama"}}})
    texts = []
    for name, tc in cfg.tasks.items():
        for ex in read_examples(name, tc, "train"):
            texts += [str(v) if not isinstance(v, list) else " ".join(map(str, v)) for v in ex.fields.values()]
    tok_dir = build_tokenizer(texts, tmp_path / "tok", vocab_size=4000)
    m = build_shards(cfg, tmp_path / "shards", tok_dir, progress=False, log=None)
    tok = load_tokenizer(tok_dir)
    for name, tc in cfg.tasks.items():
        exs = list(read_examples(name, tc, "train"))
        samples = [s for p, k in split_shards(m, tmp_path / "shards", name, "train") for s in read_shard(p, k)]
        assert len(samples) == len(exs) == n
        for ex, s in zip(exs, samples):
            assert s["meta"]["key"] == ex.key
            if tc.task_type == "extractive_qa":
                i, j = s["meta"]["span"]
                # the span covers the answer (a token may hold more: "gold" inside "golden")
                assert ex.fields["answers"][0]["text"].replace(" ", "") in \
                    tok.decode(s["enc_ids"][i:j + 1]).replace(" ", "")
            elif tc.task_type == "ner":
                first = s["enc_tags"][s["enc_tags"] != -100]
                assert [m["tasks"][name]["labels"][k] for k in first] == ex.fields["tags"]
            elif tc.task_type == "classification":
                assert m["tasks"][name]["labels"][s["meta"]["class_id"]] == ex.fields["label"]


@pytest.mark.parametrize("fmt", ["PAX_FORMAT", "GNU_FORMAT", "USTAR_FORMAT"])
def test_fast_tar_reader_matches_tarfile(fmt):
    """The strict tar reader (shards.iter_tar) against Python's tarfile on every tar dialect."""
    import io
    import tarfile

    from megamt.data.shards import iter_tar

    members = [("k1.prompt_ids.npy", b"\x01" * 700), ("k1.meta.json", b"{}"), ("k2.meta.json", b"[]" * 300),
               ("d/" * 70 + "k3.meta.json", b"1"), ("\u00e9t\u00e9.meta.json", b"2"), ("empty.meta.json", b"")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=getattr(tarfile, fmt)) as t:
        for name, data in members:
            if fmt == "USTAR_FORMAT" and (len(name) > 100 or not name.isascii()):
                continue
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1.5  # a float mtime makes PAX headers
            t.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        ref = [(m.name, t.extractfile(m).read()) for m in t]
    assert list(iter_tar(raw)) == ref and len(ref) >= 4
    with pytest.raises(ValueError, match="checksum"):
        list(iter_tar(raw[:100] + b"7" + raw[101:]))  # a flipped byte in the first header
    with pytest.raises(ValueError, match="truncated"):
        list(iter_tar(raw.rstrip(b"\0")))  # cut inside the last header, no end-of-archive block


def test_fast_npy_matches_np_load():
    import io

    from megamt.data.shards import load_npy

    for a in (np.arange(5, dtype=np.int32), np.arange(3, dtype=np.int64), np.array([], dtype=np.int32),
              np.arange(4, dtype=">i4"), np.zeros((2, 3), np.int32), np.arange(70000, dtype=np.int32),
              np.linspace(0, 1, 4)):
        b = io.BytesIO()
        np.save(b, a)
        got, ref = load_npy(b.getvalue()), np.load(io.BytesIO(b.getvalue()))
        assert got.dtype == ref.dtype and got.shape == ref.shape and (got == ref).all()
    b = io.BytesIO()
    np.save(b, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(b.getvalue())  # object arrays would need pickle: refused
