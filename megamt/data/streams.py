"""Per-task streams over shards, split by rank and DataLoader worker.

A *consumer* is one (rank, worker) pair: ``consumer = rank * num_workers + worker`` of
``S = world_size * num_workers``. With at least ``S`` shards, consumer ``c`` reads shards
``c, c + S, ...`` whole; with fewer shards than consumers every consumer reads every shard
and keeps the examples whose split-wide index ``i`` has ``i % S == c``. Either way every
example belongs to exactly one consumer.

Two modes:

- ``infinite=True`` (training): the consumer's examples are resampled forever; each epoch
  the shard order is reshuffled, consecutive shards are grouped into windows of at least
  ``data.shuffle_buffer`` examples, and each window is shuffled as a whole, with RNGs
  seeded by ``(seed, task, consumer, epoch[, window])``. Every rank can run the same number of steps
  (ZeRO-3 collectives never wait for a rank that ran dry). A consumer that owns no example
  (fewer examples than consumers) resamples the whole split.
- ``infinite=False`` (evaluation): one pass in file order; every example exactly once
  across all consumers.

State (``state_dict``) is the position (epoch, window, example): the shuffles are functions
of the seed, so resuming re-derives them (re-reading the window's shards) and needs no
buffer contents.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Optional

import torch.utils.data

from megamt.data.errors import DataError
from megamt.data.shards import read_shard


class TaskStream:
    """Examples of one task/split for one consumer."""

    def __init__(self, shards: list[tuple[Path, int]], consumer: int = 0, num_consumers: int = 1,
                 infinite: bool = True, seed: int = 0, name: str = "", shuffle: Optional[bool] = None,
                 window: int = 1, fields: Optional[tuple[str, ...]] = None):
        """``window``: training shuffles examples in windows of consecutive shards (in the epoch's
        shard order) holding at least this many of the consumer's examples (``data.shuffle_buffer``).
        ``fields``: decode only these members of each sample (default: all)."""
        if not 0 <= consumer < num_consumers:
            raise ValueError(f"consumer {consumer} not in [0, {num_consumers})")
        self.shards = [(Path(p), int(n)) for p, n in shards]
        self.consumer, self.num_consumers = consumer, num_consumers
        self.infinite = infinite
        self.shuffle = infinite if shuffle is None else shuffle
        self.seed, self.name, self.window, self.fields = seed, name, max(1, int(window)), fields
        total = sum(n for _, n in self.shards)
        self.offsets = [0]
        for _, n in self.shards:
            self.offsets.append(self.offsets[-1] + n)
        self.by_shard = len(self.shards) >= num_consumers
        if self.by_shard:
            self.mine = [i for i in range(len(self.shards)) if i % num_consumers == consumer]
        else:
            self.mine = list(range(len(self.shards)))
        self.resample_all = False
        if sum(self.owned(i) for i in self.mine) == 0 and infinite:
            if total == 0:
                raise DataError(name or "stream", "empty_input", "a training stream without any example")
            self.resample_all = True  # fewer examples than consumers: resample the whole split
            self.mine = list(range(len(self.shards)))
        self.num_examples = sum(self.owned(i) for i in self.mine)
        self.epoch, self.window_pos, self.example_pos = 0, 0, 0
        self._windows: Optional[list[list[int]]] = None
        self._items: Optional[list[dict]] = None

    def owned(self, shard: int) -> int:
        """How many examples of ``shard`` this consumer reads."""
        n = self.shards[shard][1]
        if self.by_shard or self.resample_all:
            return n
        off, S, c = self.offsets[shard], self.num_consumers, self.consumer
        return len(range(off + (c - off) % S, off + n, S))

    # ------------------------------------------------------------------ iteration
    def _epoch_windows(self) -> list[list[int]]:
        order = list(self.mine)
        if not self.shuffle:
            return [[i] for i in order]
        random.Random(f"{self.seed}:{self.name}:{self.consumer}:{self.epoch}").shuffle(order)
        windows, cur, size = [], [], 0
        for i in order:
            cur.append(i)
            size += self.owned(i)
            if size >= self.window:
                windows.append(cur)
                cur, size = [], 0
        if cur:
            windows.append(cur)
        return windows

    def _load(self, w: int) -> list[dict]:
        items: list[dict] = []
        for shard in self._windows[w]:
            path, n = self.shards[shard]
            if self.by_shard or self.resample_all:
                keep = None
            else:
                off, S, c = self.offsets[shard], self.num_consumers, self.consumer
                keep = lambda i, off=off: (off + i) % S == c  # noqa: E731
            items.extend(read_shard(path, expect=n, keep=keep, fields=self.fields))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.name}:{self.consumer}:{self.epoch}:w{w}").shuffle(items)
        return items

    def next(self) -> dict[str, Any]:
        """The next example (raises StopIteration at the end of an exact pass)."""
        empty_epochs = 0
        while True:
            if self._windows is None:
                self._windows = self._epoch_windows()
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
                self._items = self._load(self.window_pos)
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
