"""A CPU stand-in for CUDA's host-device synchronisation check.

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` names every call that makes the host wait
for the device. On the CPU nothing waits, so this stand-in records the *calls* that would:
reading a tensor's value on the host (``item``, ``tolist``, ``numpy``, ``float()``, ``int()``,
``bool()``, ``index``), moving it to the host (``cpu``), ``nonzero`` and indexing with a boolean
mask (their output size depends on the data), and a copy without ``non_blocking=True``
(``.to(device)``, ``copy_``: PyTorch synchronises the stream after a blocking copy in either
direction). Every call is attributed to the file and thread that made it, so megamt's calls
can be told apart from DeepSpeed's and the kernels', and the main thread (which drives the
device) from the prefetch thread (which builds host batches).

On the CPU every tensor is a host tensor, so the stand-in over-counts rather than misses: a
``float()`` of a tensor that would live on the host on a GPU machine too counts as well.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

READS = ("item", "tolist", "numpy", "cpu", "nonzero", "__float__", "__int__", "__bool__", "__index__")
MAIN = "MainThread"


class SyncCounter:
    """``with SyncCounter() as c: ...``; then ``c.calls`` = Counter of (file, line, method, thread).

    ``c.mark(name)`` starts a new named section (e.g. one per micro-batch): ``c.sections[name]``
    holds that section's calls.
    """

    def __init__(self):
        self.calls: Counter = Counter()
        self.sections: dict[str, Counter] = {}
        self._current: Counter | None = None
        self._saved: dict[str, object] = {}
        self._local = threading.local()  # per thread: inside a recorded call (not counted twice)

    def mark(self, name: str) -> None:
        self._current = self.sections.setdefault(name, Counter())

    def stop_section(self) -> None:
        self._current = None

    def _record(self, method: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and Path(frame.f_code.co_filename).name == Path(__file__).name:
            frame = frame.f_back
        thread = threading.current_thread().name
        where = ((Path(frame.f_code.co_filename).as_posix(), frame.f_lineno, method, thread) if frame
                 else ("?", 0, method, thread))
        self.calls[where] += 1
        if self._current is not None:
            self._current[where] += 1

    def _wrap(self, name: str, original, *, when=None):
        counter = self

        def wrapper(t, *args, **kwargs):
            local = counter._local
            if getattr(local, "busy", False):  # a recorded call's own internals do not count twice
                return original(t, *args, **kwargs)
            if when is None or when(t, *args, **kwargs):
                counter._record(name)
            local.busy = True
            try:
                return original(t, *args, **kwargs)
            finally:
                local.busy = False

        return wrapper

    def __enter__(self) -> "SyncCounter":
        for name in READS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        self._saved["to"] = torch.Tensor.to
        setattr(torch.Tensor, "to", self._wrap("to(blocking)", self._saved["to"], when=_blocking_device_move))
        self._saved["__getitem__"] = torch.Tensor.__getitem__
        setattr(torch.Tensor, "__getitem__", self._wrap("mask index", self._saved["__getitem__"], when=_mask_index))
        self._saved["copy_"] = torch.Tensor.copy_
        setattr(torch.Tensor, "copy_", self._wrap("copy_(blocking)", self._saved["copy_"], when=_blocking_copy))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    # ------------------------------------------------------------------ reading the counts
    @staticmethod
    def select(calls: Counter, fragment: str, thread: str | None = MAIN) -> Counter:
        """The calls made from files whose path contains ``fragment`` (e.g. ``megamt/trainer.py``),
        by ``thread`` (default: the main thread, the one that drives the device; None: any)."""
        return Counter({k: v for k, v in calls.items() if fragment in k[0] and (thread is None or k[3] == thread)})

    @staticmethod
    def total(calls: Counter) -> int:
        return sum(calls.values())


def _blocking_device_move(t, *args, **kwargs) -> bool:
    """``.to(...)`` with a device (positional, ``device=``, or another tensor) and no ``non_blocking=True``."""
    if kwargs.get("non_blocking") or (len(args) >= 2 and args[1] is True and not isinstance(args[0], torch.Tensor)):
        return False
    first = args[0] if args else None
    return "device" in kwargs or isinstance(first, (torch.device, str)) or (
        isinstance(first, torch.Tensor) and first.device != t.device)


def _mask_index(t, index) -> bool:
    """``t[mask]`` with a boolean tensor: its output size depends on the data (a nonzero inside)."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _blocking_copy(t, src, non_blocking=False) -> bool:
    """``copy_`` without ``non_blocking=True`` (counted even between tensors of one device)."""
    return not non_blocking


@contextmanager
def counting_syncs():
    with SyncCounter() as c:
        yield c
