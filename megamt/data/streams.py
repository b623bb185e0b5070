"""Per-task streams over shards, split by rank and DataLoader worker.

A *consumer* is one (rank, worker) pair: ``consumer = rank * num_workers + worker`` of
``S = world_size * num_workers``. With at least ``S`` shards, consumer ``c`` reads shards
``c, c + S, ...`` whole. With fewer shards than consumers, consumer ``c`` owns the contiguous
run ``[c * N // S, (c + 1) * N // S)`` of the split's ``N`` examples (numbered across shards
in shard order) and reads only those samples' bytes, through each shard's sample index
(``*.idx.npy``, written by build-shards; a shard without one is read whole and filtered).
Either way every example belongs to exactly one consumer, and a consumer reads about ``1/S``
of the split's bytes: rank r of 512 over a task of 3 shards reads its ~N/512 examples, not
the three shards (tests/unit/test_data_streams.py counts the bytes).

Two modes:

- ``infinite=True`` (training): the consumer's examples are resampled forever; each epoch
  the order of its *parts* (a whole shard, or its run's piece of one) is reshuffled,
  consecutive parts are grouped into windows of at least ``data.shuffle_buffer`` examples,
  and each window is shuffled as a whole, with RNGs seeded by ``(seed, task, consumer,
  epoch[, window])``. Every rank can run the same number of steps (ZeRO-3 collectives never
  wait for a rank that ran dry). A consumer that owns no example (fewer examples than
  consumers) resamples the whole split. With ``prefetch``, the next window is read and
  shuffled in a background thread while the current one is consumed.
- ``infinite=False`` (evaluation): one pass in file order; every example exactly once
  across all consumers.

State (``state_dict``) is the position (epoch, window, example) of what was consumed: a
window's contents are a pure function of (seed, task, consumer, epoch, window), so the order
does not depend on when the background thread ran, and resuming re-derives the window
(re-reading its parts) and needs no buffer contents.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch.utils.data

from megamt.data.errors import DataError
from megamt.data.shards import index_path, read_shard


class Part(NamedTuple):
    """Samples ``[start, stop)`` of shard ``shard`` (an index into the stream's shard list)."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def consumer_parts(sizes: list[int], consumer: int, num_consumers: int) -> list[Part]:
    """What ``consumer`` of ``num_consumers`` owns of shards holding ``sizes`` examples (see
    the module docstring): whole shards ``c, c + S, ...`` when there are at least ``S``
    shards, else its contiguous run of the split's examples, cut at shard boundaries."""
    S, c = num_consumers, consumer
    if len(sizes) >= S:
        return [Part(i, 0, n) for i, n in enumerate(sizes) if i % S == c and n > 0]
    total = sum(sizes)
    lo, hi = c * total // S, (c + 1) * total // S
    parts, off = [], 0
    for i, n in enumerate(sizes):
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            parts.append(Part(i, a - off, b - off))
        off += n
    return parts


class TaskStream:
    """Examples of one task/split for one consumer."""

    def __init__(self, shards: list[tuple[Path, int]], consumer: int = 0, num_consumers: int = 1,
                 infinite: bool = True, seed: int = 0, name: str = "", shuffle: Optional[bool] = None,
                 window: int = 1, fields: Optional[tuple[str, ...]] = None, prefetch: bool = False):
        """``window``: training shuffles examples in windows of consecutive parts (in the epoch's
        part order) holding at least this many of the consumer's examples (``data.shuffle_buffer``).
        ``fields``: decode only these members of each sample (default: all). ``prefetch``: read
        the next window in a background thread (``data.prefetch_windows``)."""
        if not 0 <= consumer < num_consumers:
            raise ValueError(f"consumer {consumer} not in [0, {num_consumers})")
        self.shards = [(Path(p), int(n)) for p, n in shards]
        self.consumer, self.num_consumers = consumer, num_consumers
        self.infinite = infinite
        self.shuffle = infinite if shuffle is None else shuffle
        self.seed, self.name, self.window, self.fields = seed, name, max(1, int(window)), fields
        sizes = [n for _, n in self.shards]
        self.parts = consumer_parts(sizes, consumer, num_consumers)
        self.resample_all = False
        if not self.parts and infinite:
            if sum(sizes) == 0:
                raise DataError(name or "stream", "empty_input", "a training stream without any example")
            self.resample_all = True  # fewer examples than consumers: resample the whole split
            self.parts = [Part(i, 0, n) for i, n in enumerate(sizes) if n > 0]
        self.num_examples = sum(p.size for p in self.parts)
        self.epoch, self.window_pos, self.example_pos = 0, 0, 0
        self._windows: Optional[list[list[Part]]] = None
        self._items: Optional[list[dict]] = None
        self.prefetch = prefetch
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple[tuple[int, int], Future]] = None
        self.fills = 0
        """Windows this stream has taken (each read once, in the background or not)."""
        self.fill_waits = 0
        """How many of them the consumer had to wait for (read in its thread, or not ready yet)."""
        self.fill_wait_s = 0.0
        """Seconds the consumer spent waiting for them."""

    def owned(self, shard: int) -> int:
        """How many examples of ``shard`` this consumer reads."""
        return sum(p.size for p in self.parts if p.shard == shard)

    def unindexed_shared_shards(self) -> list[Path]:
        """Shards this consumer reads only part of, but that have no sample index (read whole)."""
        return [self.shards[p.shard][0] for p in self.parts
                if p.size < self.shards[p.shard][1] and not index_path(self.shards[p.shard][0]).is_file()]

    # ------------------------------------------------------------------ windows
    def _epoch_windows(self, epoch: int) -> list[list[Part]]:
        """The windows of ``epoch``: a pure function of the seed (any thread may call it)."""
        order = list(self.parts)
        if not self.shuffle:
            return [[p] for p in order]
        random.Random(f"{self.seed}:{self.name}:{self.consumer}:{epoch}").shuffle(order)
        windows, cur, size = [], [], 0
        for p in order:
            cur.append(p)
            size += p.size
            if size >= self.window:
                windows.append(cur)
                cur, size = [], 0
        if cur:
            windows.append(cur)
        return windows

    def _read_window(self, epoch: int, w: int) -> list[dict]:
        """The items of window ``w`` of ``epoch``, shuffled: a pure function of its arguments and
        the stream's constant fields, so the background thread and the consumer agree."""
        windows = self._epoch_windows(epoch)
        items: list[dict] = []
        for part in windows[w]:
            path, n = self.shards[part.shard]
            items.extend(read_shard(path, expect=n, fields=self.fields, start=part.start,
                                    stop=None if part.stop == n else part.stop))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.name}:{self.consumer}:{epoch}:w{w}").shuffle(items)
        return items

    def _following(self, epoch: int, w: int, windows: list[list[Part]]) -> Optional[tuple[int, int]]:
        """The window read after window ``w`` of ``epoch`` (None at the end of an exact pass)."""
        if w + 1 < len(windows):
            return epoch, w + 1
        return (epoch + 1, 0) if self.infinite else None

    def _submit(self, key: Optional[tuple[int, int]]) -> None:
        if key is None or (self._pending is not None and self._pending[0] == key):
            return
        self._drop_pending()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"megamt-window-{self.name}")
        self._pending = (key, self._executor.submit(self._read_window, *key))

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()  # a read already running finishes and is thrown away
            self._pending = None

    def _take_window(self) -> list[dict]:
        """The items of the current window: the background read when it is this one, else read now."""
        key = (self.epoch, self.window_pos)
        t0 = time.perf_counter()
        if self._pending is not None and self._pending[0] == key:
            fut = self._pending[1]
            self._pending = None
            waited = not fut.done()
            items = fut.result()  # re-raises a read error here, in the consumer's thread
        else:
            self._drop_pending()
            waited = True
            items = self._read_window(*key)
        self.fills += 1
        if waited:
            self.fill_waits += 1
            self.fill_wait_s += time.perf_counter() - t0
        if self.prefetch:
            self._submit(self._following(self.epoch, self.window_pos, self._windows))
        return items

    def start_prefetch(self) -> None:
        """Begin reading the window at the current position in the background (the first
        ``next()`` then need not wait)."""
        if self.prefetch and self._items is None and self.parts:
            windows = self._epoch_windows(self.epoch)
            if self.window_pos < len(windows):
                self._submit((self.epoch, self.window_pos))
            else:
                self._submit(self._following(self.epoch, len(windows) - 1, windows))

    def close(self) -> None:
        """Stop the background reader (a read in flight finishes first)."""
        self._drop_pending()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ iteration
    def next(self) -> dict[str, Any]:
        """The next example (raises StopIteration at the end of an exact pass)."""
        empty_epochs = 0
        while True:
            if self._windows is None:
                self._windows = self._epoch_windows(self.epoch)
            if self.window_pos >= len(self._windows):
                if not self.infinite:
                    raise StopIteration
                self.epoch += 1
                self.window_pos, self.example_pos = 0, 0
                self._windows, self._items = None, None
                empty_epochs += 1
                if empty_epochs > 1:
                    raise DataError(self.name or "stream", "empty_input", "the stream's shards hold no example")
                continue
            if self._items is None:
                self._items = self._take_window()
            if self.example_pos < len(self._items):
                item = self._items[self.example_pos]
                self.example_pos += 1
                return item
            self.window_pos += 1
            self.example_pos = 0
            self._items = None

    __next__ = next

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "window_pos": self.window_pos, "example_pos": self.example_pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.window_pos, self.example_pos = (int(state["epoch"]), int(state["window_pos"]),
                                                         int(state["example_pos"]))
        self._windows, self._items = None, None
        if self._pending is not None:
            self.start_prefetch()  # the window in flight belongs to the old position


class ExampleDataset(torch.utils.data.IterableDataset):
    """One exact pass for a rank, split over its DataLoader workers (consumer =
    ``rank * num_workers + worker``). Use with ``DataLoader(ds, batch_size=None,
    num_workers=num_workers, collate_fn=identity)``."""

    def __init__(self, shards: list[tuple[Path, int]], rank: int, world_size: int, num_workers: int,
                 seed: int = 0, name: str = ""):
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.num_workers, self.seed, self.name = max(1, num_workers), seed, name

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if nw != self.num_workers:
            raise RuntimeError(f"ExampleDataset built for {self.num_workers} workers, running in {nw}")
        c = self.rank * self.num_workers + wid
        yield from TaskStream(self.shards, c, self.world_size * self.num_workers, infinite=False,
                              seed=self.seed, name=self.name)


def identity(x):
    """DataLoader collate_fn that keeps samples as they are (numpy arrays, metadata dicts)."""
    return x
