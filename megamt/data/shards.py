"""``megamt build-shards``: task spec → per-task, per-split webdataset shards + manifest.json.

Layout of ``OUT``::

    {task}-{split}-{shard:06d}.tar   # webdataset tars, size-bounded (count and bytes)
    manifest.json                    # what is in them (see below)

Each sample (``__key__`` = ``{task}-{split}-{index:09d}``) holds ``prompt_ids.npy``,
``target_ids.npy``, ``enc_ids.npy`` (int32), ``enc_tags.npy`` (NER) and ``meta.json``
(source key, task, template, target text, references, class id / token span). Nothing is
pickled; the reader refuses pickle members.

``manifest.json``: megamt version, tokenizer (name, path, vocabulary hash, special ids),
seed, and per task: type, label list, templates, and per split the shards with their
example and token counts, totals, and the skip counts per reason.

Beside each tar, ``{task}-{split}-{shard:06d}.idx.npy`` (int64, ``n + 1`` entries) holds the
byte offset where each sample's first tar header starts, then where the last sample ends: a
reader that needs samples ``[a, b)`` of a shard reads only bytes ``idx[a]:idx[b]`` (training
ranks that share a shard read their own part of it; see megamt.data.streams). It is a plain
``.npy`` of integers (never unpickled); shards without one are read whole.

Same spec + tokenizer + seed → byte-identical shards (template choice is seeded per example
key, tar mtimes are fixed). ``--workers N`` builds task/splits in N processes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from megamt.data.errors import DataError, SkipCounter

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt")
ENCODE_CHUNK = 256  # examples tokenized per batch call


def shard_name(task: str, split: str, shard: int) -> str:
    return f"{task}-{split}-{shard:06d}.tar"


# --------------------------------------------------------------------------- reading


_NPY_PREFIX = b"\x93NUMPY\x01\x00"
_NPY_1D = (b"{'descr': '", b"', 'fortran_order': False, 'shape': (", b",), }")


def load_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` payload → array, never unpickling. 1-D integer arrays (what megamt writes)
    take a fast path; anything else goes through ``np.load(allow_pickle=False)``."""
    if data.startswith(_NPY_PREFIX):
        hlen = int.from_bytes(data[8:10], "little")
        head = data[10:10 + hlen].rstrip(b" \n")
        a, b, c = _NPY_1D
        if head.startswith(a) and head.endswith(c):
            descr, sep, count = head[len(a):-len(c)].partition(b)
            if sep and descr in _INT_DESCRS and count.isdigit():
                return np.frombuffer(data, dtype=_INT_DESCRS[descr], count=int(count), offset=10 + hlen)
    return np.load(io.BytesIO(data), allow_pickle=False)


_INT_DESCRS = {f"{o}{k}{n}".encode(): np.dtype(f"{o}{k}{n}") for o in "<>|" for k in "iu" for n in "1248"}


def decode_sample(raw: dict, where: str) -> dict[str, Any]:
    """A webdataset sample (``{ext: bytes}``) → arrays and metadata. Never unpickles."""
    out: dict[str, Any] = {"__key__": raw.get("__key__")}
    for k, v in raw.items():
        if k.startswith("__"):
            continue
        ext = k.rsplit(".", 1)[-1].lower()
        name = k[: -len(ext) - 1] if "." in k else k
        if ext in PICKLE_EXTS:
            raise DataError(where, "pickle_member", f"member {k!r} is a pickle; megamt never unpickles shard data "
                            f"(store arrays as .npy and metadata as .json)")
        try:
            if ext == "npy":
                out[name] = load_npy(v)
            elif ext in ("json", "jsn"):
                out[name] = json.loads(v)
            else:
                out[name] = v
        except Exception as e:  # corrupt member
            raise DataError(where, "corrupt_shard", f"member {k!r} cannot be decoded: {e}") from None
    return out


class _TarError(ValueError):
    pass


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        k, _, v = data[sp + 1:i + n - 1].partition(b"=")
        out[k.decode("utf-8")] = v.decode("utf-8")
        i += n
    return out


def iter_tar(buf: bytes) -> Iterator[tuple[str, bytes]]:
    """``(name, payload)`` of the regular files of an uncompressed tar (ustar, GNU or PAX).

    A small strict reader: Python's ``tarfile`` spends ~0.3 ms per member parsing headers,
    which made shard reading the bottleneck of the input pipeline. Checksums are verified
    and an archive must end with its end-of-archive block, so corruption and truncation
    raise instead of silently ending the shard early.
    """
    for name, data, _, _ in _tar_members(buf):
        yield name, data


def _tar_members(buf: bytes, whole: bool = True) -> Iterator[tuple[str, bytes, int, int]]:
    """``(name, payload, first_header_offset, end_offset)`` of each regular file in ``buf``.
    ``whole=False``: ``buf`` is a slice of an archive cut at member boundaries (what a
    shard index addresses): it ends where its last member's padded payload ends, with no
    end-of-archive block."""
    pos, end = 0, len(buf)
    pax: dict[str, str] = {}
    longname: Optional[str] = None
    first = 0  # where the current member's headers (PAX / GNU long name ones included) start
    while True:
        if not whole and pos == end:
            return
        if pos + 512 > end:
            raise _TarError(f"truncated at byte {pos} (no end-of-archive block)")
        hdr = buf[pos:pos + 512]
        if hdr.count(0) == 512:
            if not whole:
                raise _TarError(f"end-of-archive block at byte {pos} inside an indexed range")
            return
        want = _octal(hdr[148:156])
        if want != sum(hdr) - sum(hdr[148:156]) + 256:  # the checksum field counts as 8 spaces
            raise _TarError(f"bad header checksum at byte {pos}")
        size = int(pax["size"]) if "size" in pax else _octal(hdr[124:136])
        typ = hdr[156:157]
        start = pos + 512
        pos = start + (size + 511) // 512 * 512
        if start + size > end:
            raise _TarError(f"truncated inside a member at byte {start} (needs {size} bytes)")
        data = buf[start:start + size]
        if typ == b"x":
            pax = _pax_records(data)
            continue
        if typ == b"L":
            longname = data.rstrip(b"\0").decode("utf-8")
            continue
        if typ == b"g":
            first = pos
            continue
        name = pax.get("path") or longname
        if name is None:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8")
                if prefix:
                    name = prefix + "/" + name
        pax, longname = {}, None
        if typ in (b"0", b"\0", b"7"):
            yield name, data, first, pos
        first = pos


def _sample_key(name: str) -> Optional[str]:
    """webdataset's key of a member: its name up to the first dot of the last path component."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return None if dot < 0 else name[:dot]


def _group(members: Iterator[tuple[str, bytes]]) -> Iterator[dict[str, Any]]:
    """Group consecutive members into samples by webdataset's convention: the key is the
    name up to the first dot of its last path component, the rest is the member's field."""
    cur: Optional[dict[str, Any]] = None
    for name, data in members:
        key = _sample_key(name)
        if key is None:
            continue  # no extension: not part of a sample (webdataset skips these too)
        field = name[len(key) + 1:]
        if cur is None or cur["__key__"] != key:
            if cur is not None:
                yield cur
            cur = {"__key__": key}
        if field in cur:
            raise _TarError(f"sample {key!r} holds {field!r} twice")
        cur[field] = data
    if cur is not None:
        yield cur


def index_path(shard: str | Path) -> Path:
    """The sample index beside a shard: ``x-train-000000.tar`` → ``x-train-000000.idx.npy``."""
    shard = Path(shard)
    return shard.with_name(shard.name.rsplit(".tar", 1)[0] + ".idx.npy")


def sample_offsets(buf: bytes) -> np.ndarray:
    """The index of an uncompressed tar: where each sample's first header starts, then where
    the last sample ends (int64, ``samples + 1`` entries)."""
    offsets: list[int] = []
    key, end = None, 0
    for name, _, first, end in _tar_members(buf):
        k = _sample_key(name)
        if k is not None and k != key:
            offsets.append(first)
            key = k
    offsets.append(end)
    return np.asarray(offsets, dtype=np.int64)


def write_index(shard: str | Path) -> Path:
    """Write the sample index of ``shard`` beside it (see the module docstring)."""
    out = index_path(shard)
    with open(shard, "rb") as f:
        offsets = sample_offsets(f.read())
    with open(out, "wb") as f:
        np.save(f, offsets, allow_pickle=False)
    return out


def _read_bytes(path: Path, offset: int = 0, length: Optional[int] = None) -> bytes:
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read() if length is None else f.read(length)


def index_span(shard: str | Path, start: int, stop: Optional[int],
               expect: Optional[int] = None) -> Optional[tuple[int, int, int]]:
    """``(first_byte, end_byte, stop)`` of samples ``[start, stop)`` of ``shard`` from its
    sample index (``stop=None``: to the end), reading only the index's header and two of its
    entries; None when the shard has no index (e.g. built by an older megamt). An index that
    disagrees with the manifest's count ``expect`` or with the shard raises DataError."""
    shard = Path(shard)
    path = index_path(shard)
    fix = "rebuild the shards with `megamt build-shards`"
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        head = f.read(10)
        hlen = int.from_bytes(head[8:10], "little")
        header = f.read(hlen).rstrip(b" \n")
        a, b, c = _NPY_1D
        descr, sep, count = header[len(a):-len(c)].partition(b) if header.startswith(a) and header.endswith(c) \
            else (b"", b"", b"")
        if not head.startswith(_NPY_PREFIX) or descr != b"<i8" or not sep or not count.isdigit():
            raise DataError(str(path), "corrupt_shard", f"not a megamt sample index (1-D int64 .npy); {fix}")
        n = int(count) - 1
        stop = n if stop is None else stop
        if (expect is not None and n != expect) or not 0 <= start <= stop <= n:
            raise DataError(str(path), "corrupt_shard", f"sample index of {n} samples does not match {shard.name}"
                            + (f" (manifest.json says {expect})" if expect is not None else "")
                            + f" or samples {start}-{stop}; {fix}")
        entries = []
        for i in (start, stop):
            f.seek(10 + hlen + 8 * i)
            entries.append(int.from_bytes(f.read(8), "little", signed=True))
    first, end = entries
    if not 0 <= first <= end or (shard.is_file() and end > shard.stat().st_size):
        raise DataError(str(path), "corrupt_shard", f"sample index points outside {shard.name} (bytes {first}-{end}); "
                        f"{fix}")
    return first, end, stop


def read_shard(path: str | Path, expect: Optional[int] = None, keep=None,
               fields: Optional[tuple[str, ...]] = None, start: int = 0,
               stop: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one tar shard, in order (webdataset's key convention and grouping).

    ``start``/``stop``: only samples ``[start, stop)``; with the shard's sample index
    (:func:`index_path`) only their bytes are read, else the whole shard. ``keep(i) -> bool``
    selects samples by position (the others are not decoded); ``fields`` (e.g.
    ``("prompt_ids", "target_ids")``) decodes only those members. A corrupt or truncated
    tar, or another sample count than the manifest's ``expect``, raises :class:`DataError`
    naming the shard. Compressed tars go through webdataset's reader.
    """
    path = Path(path)
    fix = "rebuild it with `megamt build-shards`"
    span = index_span(path, start, stop, expect) if start > 0 or stop is not None else None
    if span is not None:
        first, end, stop = span
        if start >= stop:
            return
    n = start if span is not None else 0
    try:
        if span is not None:
            buf = _read_bytes(path, first, end - first)
            members = ((name, data) for name, data, _, _ in _tar_members(buf, whole=False))
        else:
            buf = _read_bytes(path)
            if buf[:2] == b"\x1f\x8b" or buf[:3] == b"BZh" or buf[:6] == b"\xfd7zXZ\x00":
                from webdataset.tariterators import tar_file_iterator

                members = ((m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(buf)))
            else:
                members = iter_tar(buf)
        for raw in _group(members):
            if start <= n and (stop is None or n < stop) and (keep is None or keep(n)):
                if fields is not None:
                    raw = {k: v for k, v in raw.items() if k == "__key__" or k.rsplit(".", 1)[0] in fields}
                yield decode_sample(raw, f"{path} (sample {raw.get('__key__')})")
            n += 1
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(str(path), "missing_shard", f"shard not found; {fix}") from None
    except Exception as e:
        raise DataError(str(path), "corrupt_shard", f"corrupt or truncated tar after {n} samples "
                        f"({type(e).__name__}: {e}); {fix}") from None
    if span is not None:
        if n != stop:
            raise DataError(str(path), "corrupt_shard", f"samples {start}-{stop} of the sample index hold "
                            f"{n - start} samples (the index is stale); {fix}")
    elif expect is not None and n != expect:
        raise DataError(str(path), "corrupt_shard", f"holds {n} samples, manifest.json says {expect} "
                        f"(truncated or replaced); {fix}")


def load_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """``manifest.json`` of a shards folder (raises DataError naming the file when missing/invalid)."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise DataError(str(path), "missing_manifest", "no manifest.json: build the shards with "
                        "`megamt build-shards SPEC --out DIR --tokenizer TOK`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", "malformed_json", f"manifest is not valid JSON: {e.msg}") from None
    if not isinstance(m, dict) or "tasks" not in m or "tokenizer" not in m:
        raise DataError(str(path), "malformed_json", "not a megamt manifest (needs 'tasks' and 'tokenizer')")
    return m


def check_tokenizer(manifest: dict, tok_or_path, where: str = "") -> None:
    """Raise DataError when the tokenizer's vocabulary hash differs from the one the shards used."""
    from megamt.data.tokenize import load_tokenizer, vocab_hash

    tok = load_tokenizer(tok_or_path) if isinstance(tok_or_path, (str, Path)) else tok_or_path
    have, want = vocab_hash(tok), manifest["tokenizer"]["vocab_hash"]
    if have != want:
        raise DataError(where or "manifest.json", "tokenizer_mismatch",
                        f"the shards were built with tokenizer {manifest['tokenizer'].get('path')!r} "
                        f"(vocab hash {want[:12]}…) but data.tokenizer "
                        f"{getattr(tok, 'name_or_path', tok_or_path)!r} has hash {have[:12]}…; rebuild the shards "
                        f"with this tokenizer or point data.tokenizer at the one they were built with")


def split_shards(manifest: dict, shards_dir: str | Path, task: str, split: str) -> list[tuple[Path, int]]:
    """``[(path, n_examples), ...]`` of one task/split, in shard order."""
    try:
        entry = manifest["tasks"][task]["splits"][split]
    except KeyError:
        have = {t: sorted(v.get("splits", {})) for t, v in manifest.get("tasks", {}).items()}
        raise DataError(str(Path(shards_dir) / MANIFEST), "missing_split",
                        f"no shards for task {task!r} split {split!r} (manifest has {have}); add it to the "
                        f"spec and rebuild") from None
    return [(Path(shards_dir) / s["file"], int(s["examples"])) for s in entry["shards"]]


# --------------------------------------------------------------------------- writing

_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str):
    from megamt.data.tokenize import load_tokenizer

    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


TOKENIZER_CHECK_EXAMPLES = 500  # examples per split whose text the tokenizer check measures


def build_split(task: str, task_cfg, split: str, out_dir: str, tokenizer_dir: str, labels: Optional[list[str]],
                seed: int, max_examples: int, max_bytes: int, on_error: str, progress: bool = True,
                seq_len: Optional[int] = None) -> dict[str, Any]:
    """Read, render, tokenize and write one task/split; returns its manifest entry."""
    import webdataset as wds
    from tqdm import tqdm

    from megamt.data.formats import read_examples
    from megamt.data.templates import example_rng, render, resolve_templates
    from megamt.data.errors import bad_input
    from megamt.data.tokenize import encode_examples, example_texts, special_ids, tokenizer_stats

    tok = _tokenizer(tokenizer_dir)
    ids = special_ids(tok)
    templates = resolve_templates(task_cfg)
    out = Path(out_dir)
    for old in [*out.glob(f"{task}-{split}-*.tar"), *out.glob(f"{task}-{split}-*.idx.npy")]:
        old.unlink()
    skips = SkipCounter()
    counts: dict[str, list[int]] = {}  # file -> [examples, prompt+target tokens, enc tokens]
    pattern = str(out / f"{task}-{split}-%06d.tar")
    n = 0
    check_texts: list[str] = []  # the first examples' text, for the tokenizer check
    longer = [0, 0]  # examples longer than seq_len: [prompt + target, encoder input]
    writer = wds.ShardWriter(pattern, maxcount=max_examples, maxsize=max_bytes, verbose=0, mtime=0)  # an int mtime: a float one adds a PAX header per member
    bar = tqdm(desc=f"{task}/{split}", unit=" ex", disable=not progress, leave=False, mininterval=0.5)

    def flush(chunk):
        nonlocal n
        for sample in encode_examples(chunk, tok, labels, ids):
            if isinstance(sample, DataError):
                bad_input(on_error, skips, sample.where, sample.reason, str(sample).split(": ", 1)[-1])
                continue
            sample["__key__"] = f"{task}-{split}-{n:09d}"
            writer.write(sample)
            c = counts.setdefault(Path(writer.fname).name, [0, 0, 0])
            c[0] += 1
            c[1] += len(sample["prompt_ids.npy"]) + len(sample["target_ids.npy"])
            c[2] += len(sample["enc_ids.npy"])
            if seq_len:
                longer[0] += len(sample["prompt_ids.npy"]) + len(sample["target_ids.npy"]) > seq_len
                longer[1] += len(sample["enc_ids.npy"]) > seq_len
            n += 1
        for ex, *_ in chunk[:max(0, TOKENIZER_CHECK_EXAMPLES - len(check_texts))]:
            check_texts.extend(example_texts(ex))
        bar.update(len(chunk))

    try:
        chunk = []
        for ex in read_examples(task, task_cfg, split, on_error=on_error, skips=skips, labels=labels):
            prompt, target, tname = render(ex, task_cfg, example_rng(seed, ex), labels, templates)
            chunk.append((ex, prompt, target, tname))
            if len(chunk) == ENCODE_CHUNK:
                flush(chunk)
                chunk = []
        flush(chunk)
        bar.close()
    finally:
        writer.close()
    if n == 0:  # ShardWriter opens its first tar eagerly
        for old in out.glob(f"{task}-{split}-*.tar"):
            old.unlink()
    shards = [{"file": f, "examples": c[0], "tokens": c[1], "enc_tokens": c[2], "bytes": (out / f).stat().st_size,
               "index": write_index(out / f).name} for f, c in sorted(counts.items())]
    entry = {"examples": n, "tokens": sum(s["tokens"] for s in shards), "enc_tokens": sum(s["enc_tokens"] for s in shards),
             "shards": shards, "skips": skips.as_dict(), "skip_examples": skips.examples,
             "tokenizer_check": tokenizer_stats(tok, check_texts)}
    if seq_len:
        entry["longer_than_seq_len"] = {"seq_len": seq_len, "text_to_text": longer[0], "encoder": longer[1]}
    return entry


def _build_job(kw: dict) -> tuple[str, str, dict]:
    return kw["task"], kw["split"], build_split(**kw)


def build_shards(cfg, out_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                 workers: Optional[int] = None, on_error: Optional[str] = None, progress: bool = True,
                 log=print) -> dict[str, Any]:
    """Build every task/split of ``cfg.tasks`` into ``out_dir``; write and return the manifest."""
    from megamt import __version__
    from megamt.data.formats import resolve_labels
    from megamt.data.templates import resolve_templates
    from megamt.data.tokenize import tokenizer_info

    data = cfg.data
    out = Path(out_dir or data.shards_dir)
    tok_dir = str(Path(tokenizer_dir or data.tokenizer).resolve()) if (tokenizer_dir or data.tokenizer) else ""
    if not tok_dir:
        raise DataError("data.tokenizer", "missing_tokenizer", "no tokenizer: pass --tokenizer DIR or set data.tokenizer")
    workers = workers or data.build_workers
    on_error = on_error or data.on_error
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(tok_dir)
    t0 = time.time()
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "megamt_version": __version__,
                                "tokenizer": tokenizer_info(tok, tok_dir), "seed": data.seed,
                                "on_error": on_error, "tasks": {}}
    jobs = []
    for name, tc in cfg.tasks.items():
        labels = resolve_labels(name, tc, on_error)
        manifest["tasks"][name] = {"type": tc.task_type, "labels": labels,
                                   "templates": [t.name for t in resolve_templates(tc)], "splits": {}}
        for split in tc.inputs:
            jobs.append(dict(task=name, task_cfg=tc, split=split, out_dir=str(out), tokenizer_dir=tok_dir,
                             labels=labels, seed=data.seed, max_examples=data.shard_max_examples,
                             max_bytes=data.shard_max_bytes, on_error=on_error, progress=progress and workers == 1,
                             seq_len=data.seq_len))
    if workers > 1 and len(jobs) > 1:
        from tqdm import tqdm

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.map(_build_job, jobs), total=len(jobs), desc="build-shards", unit=" split",
                                disable=not progress))
    else:
        results = [_build_job(j) for j in jobs]
    total_skips = SkipCounter()
    for task, split, entry in results:
        manifest["tasks"][task]["splits"][split] = entry
        total_skips.update(entry["skips"])
    manifest["skips"] = total_skips.as_dict()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if log:
        for task, split, e in results:
            sk = f", skipped {e['skips']}" if e["skips"] else ""
            log(f"  {task}/{split}: {e['examples']} examples, {e['tokens']} tokens, {len(e['shards'])} shard(s){sk}")
        log_tokenizer_checks(cfg, results, log)
        log(f"build-shards: {sum(e['examples'] for _, _, e in results)} examples in {time.time() - t0:.1f}s -> {out}")
    return manifest


def log_tokenizer_checks(cfg, results: list[tuple[str, str, dict]], log=print) -> None:
    """Per task (its train split, else its first): how the tokenizer cuts the task's text and
    how many examples exceed data.seq_len, with a WARNING when the tokenizer does not fit."""
    from megamt.data.pipeline import resolve_objective
    from megamt.data.tokenize import format_stats, tokenizer_warning

    try:
        objective = resolve_objective(cfg)
    except Exception:  # a spec without a usable model section: report both lengths' basis as text-to-text
        objective = "causal_lm"
    kind = "encoder" if objective == "encoder" else "text_to_text"
    seen: set[str] = set()
    log("tokenizer check (per task):")
    for task, split, e in sorted(results, key=lambda r: (r[0], r[1] != "train")):
        if task in seen or "tokenizer_check" not in e or not e["tokenizer_check"]["texts"]:
            continue
        seen.add(task)
        stats = e["tokenizer_check"]
        line = f"  {task}/{split}: {format_stats(stats)}"
        over = e.get("longer_than_seq_len")
        if over and e["examples"]:
            line += f"; {over[kind]} of {e['examples']} examples longer than data.seq_len={over['seq_len']}"
        log(line)
        warning = tokenizer_warning(stats)
        if warning:
            log(f"WARNING {task}: {warning}")
        if over and e["examples"] and over[kind] > 0.1 * e["examples"]:
            log(f"WARNING {task}: {over[kind] / e['examples']:.0%} of the examples are longer than data.seq_len="
                f"{over['seq_len']} and will be truncated (data.overlong); raise data.seq_len")


def main(argv: list[str] | None = None) -> int:
    from megamt.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="megamt build-shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="task spec / megamt config YAML with a tasks: section")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shard_max_examples=1000")
    ap.add_argument("--out", help="output folder (default: data.shards_dir)")
    ap.add_argument("--tokenizer", help="local HF tokenizer folder (default: data.tokenizer)")
    ap.add_argument("--workers", type=int, help="processes (default: data.build_workers)")
    ap.add_argument("--on-error", choices=["raise", "skip"], help="bad input: raise (default) or skip and count")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.spec, args.overrides)
        build_shards(cfg, args.out, args.tokenizer, args.workers, args.on_error, progress=not args.no_progress)
    except (DataError, ConfigError) as e:
        print(f"megamt build-shards: error: {e}", file=sys.stderr)
        return 1
    return 0
