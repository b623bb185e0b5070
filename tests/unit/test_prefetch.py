"""megamt.prefetch: steps built one ahead in a thread give the same batches as building them in
the step, and the state a checkpoint saves is the consumed batches' state, not the prefetched."""

from __future__ import annotations

import random
import threading
import time

import pytest

from megamt.prefetch import PrefetchingPipeline


class CountingPipeline:
    """A stand-in for TrainPipeline: batches are draws of its own RNG; the state is the RNG's
    state plus how many batches it produced. ``delay_s`` slows every batch (a slow file system)."""

    def __init__(self, seed: int = 0, delay_s: float = 0.0):
        self.rng = random.Random(seed)
        self.produced = 0
        self.step = 0
        self.delay_s = delay_s
        self.gate: threading.Event | None = None  # when set by a test: next_batch waits on it

    def set_step(self, step: int) -> None:
        self.step = step

    def next_batch(self) -> dict:
        if self.gate is not None:
            self.gate.wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        self.produced += 1
        return {"step": self.step, "value": self.rng.random(), "n": self.produced}

    def rates(self, step=None) -> dict:
        return {"t": 1.0}

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "produced": self.produced, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.produced, self.step = state["produced"], state["step"]


def build(pipeline, step: int) -> list[dict]:
    pipeline.set_step(step)
    return [pipeline.next_batch() for _ in range(3)]


def run(prefetch: bool, steps: int, start_state=None, first: int = 0, pipeline=None):
    """Take ``steps`` steps from ``first``; returns the batches and the state after each step."""
    wrapped = PrefetchingPipeline(pipeline or CountingPipeline(), enabled=prefetch)
    if start_state is not None:
        wrapped.load_state_dict(start_state)
    batches, states = [], []
    for s in range(first, first + steps):
        batches.append(wrapped.take(s, build, next_step=s + 1))
        states.append(wrapped.state_dict())
    wrapped.close()
    return batches, states, wrapped


def test_prefetching_gives_the_same_batches_and_the_consumed_state():
    plain, plain_states, _ = run(False, 6)
    ahead, ahead_states, wrapped = run(True, 6)
    assert ahead == plain
    # after taking step s the wrapper reports the state right after step s's batches, although
    # the pipeline itself has already built step s + 1's
    assert ahead_states == plain_states
    assert [st["produced"] for st in ahead_states] == [3, 6, 9, 12, 15, 18]
    assert wrapped.inner.produced == 18  # close() rewound the last, unused prefetch


def test_resume_from_a_state_saved_while_a_step_was_prefetched_is_exact():
    reference, _, _ = run(True, 8)
    _, states, _ = run(True, 3)  # "checkpoint" after step 2 (0-based), step 3 was in flight
    resumed, _, _ = run(True, 5, start_state=states[-1], first=3)
    assert resumed == reference[3:]


def test_state_dict_waits_for_the_snapshot_not_for_the_build():
    inner = CountingPipeline()
    wrapped = PrefetchingPipeline(inner)
    wrapped.take(0, build, next_step=1)
    inner.gate = threading.Event()  # the next build blocks in its first next_batch ...
    wrapped.take(1, build, next_step=2)
    t0 = time.perf_counter()
    state = wrapped.state_dict()  # ... and the state is there anyway
    assert time.perf_counter() - t0 < 5
    assert state["produced"] == 6 and state["step"] == 1
    inner.gate.set()
    assert [b["n"] for b in wrapped.take(2, build, next_step=None)] == [7, 8, 9]
    assert wrapped.state_dict() == inner.state_dict()  # nothing in flight: the pipeline's own


def test_a_build_thrown_away_rewinds_the_pipeline():
    reference, _, _ = run(False, 4)
    wrapped = PrefetchingPipeline(CountingPipeline())
    assert wrapped.take(0, build, next_step=1) == reference[0]  # step 1 now in flight
    # asking for another step than the prefetched one: the prefetch is undone first, so the
    # batches are the ones that followed step 0 (labelled with the step asked for)
    other = wrapped.take(7, build, next_step=None)
    assert [(b["value"], b["n"], b["step"]) for b in other] == [(b["value"], b["n"], 7) for b in reference[1]]
    wrapped.load_state_dict(run(False, 2)[1][-1])  # back on track: the state after step 1
    wrapped.take(2, build, next_step=3)
    wrapped.load_state_dict(wrapped.state_dict())  # a resume while step 3 is in flight
    assert wrapped.take(3, build) == reference[3]


def test_an_error_in_the_build_thread_reaches_the_step_that_needs_the_batches():
    def failing(pipeline, step):
        if step == 1:
            raise ValueError("bad shard in step 1")
        return build(pipeline, step)

    wrapped = PrefetchingPipeline(CountingPipeline())
    wrapped.take(0, failing, next_step=1)  # the failure happens in the thread, silently for now
    with pytest.raises(ValueError, match="bad shard in step 1"):
        wrapped.take(1, failing, next_step=2)


def test_a_slow_pipeline_overlaps_the_step():
    """With prefetching, the wait for batches drops to ~0 once the step is longer than the build
    (a timing-tolerant check; the measured numbers are in BENCHMARKS.md, tools/bench_prefetch.py)."""
    delay, compute = 0.02, 0.15  # 3 batches x 20 ms = 60 ms of building per step, 150 ms of "compute"
    waits = {}
    for prefetch in (False, True):
        wrapped = PrefetchingPipeline(CountingPipeline(delay_s=delay), enabled=prefetch)
        w = []
        for s in range(4):
            wrapped.take(s, build, next_step=s + 1)
            w.append(wrapped.wait_s)
            time.sleep(compute)
        wrapped.close()
        waits[prefetch] = w
    assert min(waits[False][1:]) >= 3 * delay * 0.9
    assert max(waits[True][1:]) < 3 * delay * 0.5, waits


def test_other_attributes_are_the_pipelines():
    wrapped = PrefetchingPipeline(CountingPipeline())
    assert wrapped.rates() == {"t": 1.0} and wrapped.delay_s == 0.0
    with pytest.raises(AttributeError):
        wrapped.no_such_thing


class MixingPipeline(CountingPipeline):
    """A stand-in with dynamic mixing: ``observe_losses`` (main thread, after each step) moves a
    rate that every later batch reads, and the rate is part of the state."""

    def __init__(self, seed: int = 0, delay_s: float = 0.0):
        super().__init__(seed, delay_s)
        self.rate = 0.5

    def next_batch(self) -> dict:
        batch = super().next_batch()
        batch["rate"] = self.rate
        return batch

    def observe_losses(self, step: int, losses: dict) -> None:
        self.rate = round(0.9 * self.rate + 0.1 * losses["t"], 9)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rate = state["rate"]


@pytest.mark.parametrize("delay_s", [0.0, 0.01])
def test_losses_observed_between_steps_reach_the_next_step_as_without_prefetching(delay_s):
    """A loss observation made while the next step is being prefetched: the prefetched build is
    thrown away and redone, so the batches and states equal the unprefetched ones whatever the
    thread's timing (dynamic mixing's exact resume depends on it)."""

    def go(prefetch: bool):
        wrapped = PrefetchingPipeline(MixingPipeline(delay_s=delay_s), enabled=prefetch)
        batches, states = [], []
        for s in range(5):
            batches.append(wrapped.take(s, build, next_step=s + 1))
            wrapped.observe_losses(s + 1, {"t": float(s)})
            states.append(wrapped.state_dict())
        wrapped.close()
        return batches, states

    plain, plain_states = go(False)
    ahead, ahead_states = go(True)
    assert ahead == plain and ahead_states == plain_states
    assert [b[0]["rate"] for b in plain] != [0.5] * 5  # the observations did move the rate
