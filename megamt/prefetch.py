"""Build the next optimizer step's micro-batches in a background thread, overlapping the step.

The trainer asks for whole steps: ``take(step, build)`` returns step ``step``'s batches (built
by ``build(pipeline, step)``) and starts building ``step + 1``'s in a daemon thread. Reading
shards, decoding, packing and collating then run while the current step's forward, backward
and collectives hold the GIL released (torch and NCCL release it; a pipeline waiting on a file
system does too).

Exact resume. A prefetching pipeline is ahead of training: after step ``s`` it has already
produced (some of) step ``s + 1``'s batches. So the thread first snapshots the wrapped
pipeline's ``state_dict()`` -- the state right after the consumed step's batches -- and only
then builds. :meth:`PrefetchingPipeline.state_dict` returns that snapshot while a build is in
flight (waiting for the snapshot, not for the build), which is exactly what the pipeline's own
``state_dict()`` would return without prefetching. A build that is thrown away (another step
asked for, ``load_state_dict``, ``close``) rewinds the pipeline to its snapshot.

Everything else (``rates``, ``stats`` ...) goes to the wrapped pipeline; the build thread is the
only one that advances it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


class _Build:
    """One step being built in a daemon thread: its pre-build snapshot, then its batches."""

    def __init__(self, step: int, pipeline, build: Callable[[Any, int], Any]):
        self.step = step
        self.build = build
        self.snapshot: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.snapshot_ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(pipeline, build), daemon=True,
                                       name=f"megamt-prefetch-step-{step}")
        self.thread.start()

    def _run(self, pipeline, build) -> None:
        try:
            self.snapshot = pipeline.state_dict()
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread
            self.error = e
            return
        finally:
            self.snapshot_ready.set()
        try:
            self.result = build(pipeline, self.step)
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def wait(self) -> Any:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result

    def wait_snapshot(self) -> Any:
        self.snapshot_ready.wait()
        if self.snapshot is None and self.error is not None:
            raise self.error
        return self.snapshot


class PrefetchingPipeline:
    """A ``TrainPipeline``-like object whose steps are built one ahead (see the module doc).

    ``enabled=False`` builds every step in the caller's thread (same batches, same states).
    ``wait_s``: how long the last ``take`` waited for its batches (the build's remaining time;
    without prefetching the whole build).
    """

    def __init__(self, pipeline, *, enabled: bool = True):
        self.inner = pipeline
        self.enabled = enabled
        self.wait_s = 0.0
        self._pending: _Build | None = None

    def take(self, step: int, build: Callable[[Any, int], Any], next_step: int | None = None) -> Any:
        """Step ``step``'s batches: the prefetched ones when they are for ``step``, else built now.
        Then, when prefetching and ``next_step`` is not None, start building ``next_step``'s."""
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending.step == step:
            result = pending.wait()
        else:
            self._rewind(pending)
            result = build(self.inner, step)
        self.wait_s = time.perf_counter() - t0
        if self.enabled and next_step is not None:
            self._pending = _Build(next_step, self.inner, build)
        return result

    def _rewind(self, pending: _Build | None) -> None:
        """Throw a build away: wait for it, then put the pipeline back to its pre-build state."""
        if pending is None:
            return
        snapshot = pending.wait_snapshot()
        pending.thread.join()
        self.inner.load_state_dict(snapshot)

    def apply(self, change: Callable[[Any], Any]) -> Any:
        """Run ``change(pipeline)`` from the main thread, as if between two steps without
        prefetching: a build in flight is thrown away (rewound), the change is applied, and the
        same step is built again in the background. Dynamic mixing does this with every step's
        losses, so the next step's batches always see the rates they would see unprefetched
        (deterministic, exact resume), at the price of building that step twice."""
        pending, self._pending = self._pending, None
        self._rewind(pending)
        out = change(self.inner)
        if pending is not None:
            self._pending = _Build(pending.step, self.inner, pending.build)
        return out

    def observe_losses(self, step: int, losses: dict[str, float]) -> None:
        self.apply(lambda p: p.observe_losses(step, losses))

    def observe_eval(self, step: int, *args, **kwargs) -> None:
        self.apply(lambda p: p.observe_eval(step, *args, **kwargs))

    # ------------------------------------------------------------------ the pipeline's interface
    def state_dict(self) -> dict[str, Any]:
        """The state after the batches taken so far (a build in flight is not counted)."""
        if self._pending is not None:
            return self._pending.wait_snapshot()
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.thread.join()
        self.inner.load_state_dict(state)

    def rates(self, step: int | None = None) -> dict[str, float]:
        return self.inner.rates(step)

    def close(self) -> None:
        """Stop prefetching; the pipeline is left at the state of the batches taken."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                self._rewind(pending)
            except BaseException:  # noqa: BLE001 -- a failed build leaves nothing to rewind
                pass
        if hasattr(self.inner, "close"):
            self.inner.close()  # the streams' background window readers

    def __getattr__(self, name: str):  # only called for names not found on the wrapper
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
