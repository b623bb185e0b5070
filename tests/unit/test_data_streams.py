"""Training streams at many ranks: what each rank reads, and the background window reader.

The many-rank behaviour is proven by a simulation: every rank of a 512-rank world is a
``TaskStream`` in this process, and an instrumented reader (the ``open`` of
``megamt.data.shards``, through which every shard and index byte is read) counts the bytes
each one reads. The background reader is checked for order (the same examples in the same
order with and without it, whatever the reader's timing), for the consistency of
``state_dict`` with what was consumed, and for reading in its own thread; that the step loop
never waits on it is a benchmark (``tools/bench_data.py --slow-reader``), not a timed test.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import megamt.data.shards as shards_mod
from megamt.data.errors import DataError
from megamt.data.shards import index_path, read_shard, write_index
from megamt.data.streams import TaskStream, consumer_parts


def write_task(out: Path, n_per_shard=(400, 400, 400), seed=0) -> list[tuple[Path, int]]:
    """A task of webdataset shards like build-shards writes (int32 .npy arrays of random
    lengths, meta.json), each with its sample index."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, k = [], 0
    for s, n in enumerate(n_per_shard):
        path = out / f"t-train-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as w:
            for _ in range(n):
                w.write({"__key__": f"t-train-{k:09d}",
                         "prompt_ids.npy": rng.integers(0, 1000, rng.integers(5, 400)).astype(np.int32),
                         "target_ids.npy": rng.integers(0, 1000, rng.integers(1, 50)).astype(np.int32),
                         "meta.json": {"key": f"src:{k}"}})
                k += 1
        write_index(path)
        shards.append((path, n))
    return shards


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("streams"))


class ByteCounter:
    """Instrumented reader: replaces ``open`` in megamt.data.shards and counts the bytes read
    from each file (and in which thread)."""

    def __init__(self, delay_per_read_s: float = 0.0):
        self.bytes: dict[str, int] = {}
        self.threads: set[str] = set()
        self.delay = delay_per_read_s
        self.lock = threading.Lock()

    def __call__(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        counter, name = self, Path(path).name

        def read(n=-1):
            data = f.__class__.read(f, n)
            with counter.lock:
                counter.bytes[name] = counter.bytes.get(name, 0) + len(data)
                counter.threads.add(threading.current_thread().name)
            if counter.delay:
                time.sleep(counter.delay)
            return data

        f.read = read
        return f

    def total(self, suffix=".tar") -> int:
        return sum(v for k, v in self.bytes.items() if k.endswith(suffix))


def counting(monkeypatch, **kw) -> ByteCounter:
    c = ByteCounter(**kw)
    monkeypatch.setattr(shards_mod, "open", c, raising=False)
    return c


def keys(items):
    return [it["meta"]["key"] for it in items]


def sample_bytes(shards) -> list[list[int]]:
    """Per shard, each sample's bytes in the tar (from the index)."""
    return [np.diff(np.load(index_path(p))).tolist() for p, _ in shards]


# --------------------------------------------------------------------------- assignment


def test_consumer_parts_partition_the_split():
    for sizes in ([400, 400, 400], [7, 0, 13, 1], [3], [100] * 9):
        for S in (1, 2, 5, 9, 64, 512):
            owned = []
            for c in range(S):
                for p in consumer_parts(sizes, c, S):
                    owned += [(p.shard, i) for i in range(p.start, p.stop)]
            assert sorted(owned) == [(s, i) for s, n in enumerate(sizes) for i in range(n)], (sizes, S)
            counts = [sum(p.size for p in consumer_parts(sizes, c, S)) for c in range(S)]
            if len(sizes) < S:  # contiguous runs: balanced to one example
                assert max(counts) - min(counts) <= 1, (sizes, S, counts)


def test_rank_of_512_reads_about_a_512th_of_a_three_shard_task(task, monkeypatch):
    """Simulation of 512 ranks over a task of 3 shards: one epoch of each rank's own examples.
    Before (every rank read all 3 shards and kept every 512th example) each rank read the
    whole task; now rank r reads exactly its own samples' bytes (at most ~1/512 of the task
    plus a sample) and the two index entries that locate them; together the ranks read the
    task once."""
    W = 512
    total = sum(p.stat().st_size for p, _ in task)
    per_sample = [b for s in sample_bytes(task) for b in s]
    N = len(per_sample)
    read_by_rank, tar_sum = [], 0
    seen = []
    for r in range(W):
        c = counting(monkeypatch)
        s = TaskStream(task, r, W, infinite=True, seed=3, name="t", window=1000)
        got = keys(next(s) for _ in range(s.num_examples))
        seen += got
        lo, hi = r * N // W, (r + 1) * N // W
        assert c.total(".tar") == sum(per_sample[lo:hi]), r  # exactly its own samples' bytes
        assert c.total(".npy") <= 4 * 160  # per part: the index header (128 bytes) + two entries
        read_by_rank.append(c.total(".tar") + c.total(".npy"))
        tar_sum += c.total(".tar")
    assert sorted(seen) == sorted(f"src:{k}" for k in range(N))  # every example on exactly one rank
    assert tar_sum == sum(per_sample)  # the ranks read the task's samples once between them
    assert max(read_by_rank) <= total / W + max(per_sample) + 4 * 160, (max(read_by_rank), total / W)


def test_without_an_index_a_rank_reads_only_the_shards_its_run_touches(task, tmp_path, monkeypatch):
    """Shards of an older megamt (no index): each rank reads at most the shards its run
    crosses (one, or two at a boundary) instead of all of them, and says so."""
    import shutil

    plain = []
    for p, n in task:
        shutil.copy(p, tmp_path / p.name)
        plain.append((tmp_path / p.name, n))
    sizes = [p.stat().st_size for p, _ in plain]
    for r in (0, 170, 255, 511):
        c = counting(monkeypatch)
        s = TaskStream(plain, r, 512, infinite=True, name="t")
        assert s.unindexed_shared_shards()
        next(s)
        touched = {p.shard for p in s.parts}
        assert c.total(".tar") == sum(sizes[i] for i in touched) and len(touched) <= 2


def test_index_ranges_read_back_exactly(task):
    path, n = task[1]
    whole = keys(read_shard(path, n))
    for a, b in [(0, 1), (5, 17), (399, 400), (0, 400), (123, None), (7, 7)]:
        assert keys(read_shard(path, n, start=a, stop=b)) == whole[a:b], (a, b)


def test_stale_or_foreign_index_is_refused(task, tmp_path):
    import shutil

    path, n = task[0]
    bad = tmp_path / path.name
    shutil.copy(path, bad)
    np.save(index_path(bad), np.arange(0, 512 * (n + 1), 512, dtype=np.int64))  # right length, wrong offsets
    with pytest.raises(DataError, match="rebuild"):
        list(read_shard(bad, n, start=3, stop=9))
    np.save(index_path(bad), np.arange(n, dtype=np.int64))  # one sample short
    with pytest.raises(DataError, match="manifest.json says 400"):
        list(read_shard(bad, n, start=3, stop=9))


def test_build_shards_writes_the_index_and_the_manifest_names_it(tmp_path):
    from megamt.config import load_config
    from megamt.data.shards import build_shards, sample_offsets, split_shards
    from megamt.data.synthetic import make_demo_assets

    a = make_demo_assets(tmp_path, seed=1, n_train=20, n_val=5)
    m = build_shards(load_config(a.spec, ["data.shard_max_examples=8"]), a.shards, a.tokenizer, progress=False,
                     log=None)
    entry = m["tasks"]["qa"]["splits"]["train"]["shards"][0]
    assert entry["index"] == "qa-train-000000.idx.npy" and entry["bytes"] == (a.shards / entry["file"]).stat().st_size
    for p, n in split_shards(m, a.shards, "qa", "train"):
        idx = np.load(index_path(p), allow_pickle=False)
        assert len(idx) == n + 1 and np.array_equal(idx, sample_offsets(p.read_bytes()))


# --------------------------------------------------------------------------- background windows


class SlowRandomReader(ByteCounter):
    """A reader whose every read sleeps a random few milliseconds (timing noise)."""

    def __init__(self, seed):
        super().__init__()
        self.rng = random.Random(seed)

    def __call__(self, *a, **kw):
        time.sleep(self.rng.random() * 0.004)
        return super().__call__(*a, **kw)


@pytest.mark.parametrize("world,rank", [(1, 0), (4, 1), (512, 300)])
def test_prefetch_keeps_the_order_and_the_state(task, monkeypatch, world, rank):
    """Same examples in the same order with and without the background reader, across
    epochs, whatever the reader's timing; state_dict after k examples is the same in both
    and resumes to the same continuation."""
    ref = TaskStream(task, rank, world, seed=9, name="t", window=150)
    n = 3 * max(ref.num_examples, 1) + 11
    want = keys(next(ref) for _ in range(n))
    monkeypatch.setattr(shards_mod, "open", SlowRandomReader(rank), raising=False)
    s = TaskStream(task, rank, world, seed=9, name="t", window=150, prefetch=True)
    s.start_prefetch()
    got, states, ref2 = [], [], TaskStream(task, rank, world, seed=9, name="t", window=150)
    for i in range(n):
        got.append(next(s)["meta"]["key"])
        next(ref2)
        if i % 37 == 5:
            states.append((i, json.loads(json.dumps(s.state_dict()))))
            assert s.state_dict() == ref2.state_dict()
    assert got == want and s.epoch >= 2
    i, state = states[len(states) // 2]
    resumed = TaskStream(task, rank, world, seed=9, name="t", window=150, prefetch=True)
    resumed.load_state_dict(state)
    resumed.start_prefetch()
    assert keys(next(resumed) for _ in range(n - i - 1)) == want[i + 1:]
    s.close()
    resumed.close()


def test_windows_are_read_in_the_background_thread(task, monkeypatch):
    """With prefetch every window is read in the stream's own thread, and a window whose
    background read has finished is taken without a wait (no timing involved: the test waits
    for the read to finish before it asks for the window)."""
    c = counting(monkeypatch)
    s = TaskStream(task, 0, 1, seed=1, name="bg", window=100, prefetch=True)
    s.start_prefetch()
    for _ in range(3):
        s._pending[1].result()  # the background read of the next window has finished
        next(s)  # takes it
        while s.example_pos < len(s._items):
            next(s)
    assert s.fills == 3 and s.fill_waits == 0, (s.fills, s.fill_waits)
    assert c.threads and all(t.startswith("megamt-window-bg") for t in c.threads), c.threads
    s.close()
    plain = TaskStream(task, 0, 1, seed=1, name="bg", window=100)
    next(plain)
    assert plain.fills == plain.fill_waits == 1  # without prefetch the consumer reads (and waits) itself
