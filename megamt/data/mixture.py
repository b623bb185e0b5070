"""Task mixture: per-task sampling rates, by strategy and curriculum phase.

Rates are probabilities of drawing the *next example* from a task (not token shares).

- ``explicit``: ``tasks.X.weight``
- ``proportional``: the number of training examples
- ``capped``: ``min(size, K)`` (T5's examples-proportional mixing with cap K)
- ``temperature``: ``size ** (1 / T)`` (T=1 proportional, T→∞ uniform)

Outside ``explicit``, a task's ``weight`` (when set) multiplies its rate. A curriculum
phase (``mixture.phases``, the last one with ``start_step <= step`` applies) restricts the
tasks to its ``tasks`` list (empty = all) and replaces the (normalised) base rate of every
task it names in ``weights``; the result is normalised again.
"""

from __future__ import annotations

import bisect
import random
from typing import Optional


class TaskMixture:
    def __init__(self, sizes: dict[str, int], cfg, weights: Optional[dict[str, Optional[float]]] = None):
        """``sizes``: training examples per task (in task order); ``cfg``: a MixtureConfig."""
        self.tasks = list(sizes)
        if not self.tasks:
            raise ValueError("a mixture needs at least one training task")
        self.sizes = dict(sizes)
        self.cfg = cfg
        self.weights = dict(weights or {})
        self.base = self._base_rates()
        self._cache: dict[int, tuple[list[str], list[float]]] = {}

    def _base_rates(self) -> dict[str, float]:
        c = self.cfg
        raw = {}
        for t in self.tasks:
            n, w = self.sizes[t], self.weights.get(t)
            if c.strategy == "explicit":
                r = float(w if w is not None else 0.0)
            else:
                r = {"proportional": float(n), "capped": float(min(n, c.cap)),
                     "temperature": float(n) ** (1.0 / c.temperature)}[c.strategy]
                if w is not None:
                    r *= w
            raw[t] = r
        return _normalise(raw, "mixture")

    def phase_index(self, step: int) -> int:
        starts = [p.start_step for p in self.cfg.phases]
        return max(0, bisect.bisect_right(starts, step) - 1)

    def rates(self, step: int = 0) -> dict[str, float]:
        """``{task: probability}`` at ``step`` (tasks not active in the phase get 0)."""
        if not self.cfg.phases:
            return dict(self.base)
        ph = self.cfg.phases[self.phase_index(step)]
        active = [t for t in self.tasks if not ph.tasks or t in ph.tasks]
        raw = {t: (float(ph.weights[t]) if t in ph.weights else self.base[t]) if t in active else 0.0
               for t in self.tasks}
        return _normalise(raw, f"mixture.phases (step {step})")

    def sample(self, rng: random.Random, step: int = 0) -> str:
        key = self.phase_index(step) if self.cfg.phases else 0
        if key not in self._cache:
            r = self.rates(step)
            cum, acc = [], 0.0
            for t in self.tasks:
                acc += r[t]
                cum.append(acc)
            self._cache[key] = (self.tasks, cum)
        tasks, cum = self._cache[key]
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        return tasks[min(i, len(tasks) - 1)]

    def describe(self, step: int = 0) -> str:
        r = self.rates(step)
        head = f"task mixture ({self.cfg.strategy}"
        if self.cfg.strategy == "temperature":
            head += f", T={self.cfg.temperature}"
        if self.cfg.strategy == "capped":
            head += f", K={self.cfg.cap}"
        head += f") at step {step}:"
        lines = [head] + [f"  {t:<20} {r[t]:7.2%}   ({self.sizes[t]} examples)" for t in self.tasks]
        for i, ph in enumerate(self.cfg.phases):
            rr = self.rates(ph.start_step)
            lines.append(f"  phase {i} from step {ph.start_step}: " +
                         ", ".join(f"{t} {rr[t]:.2%}" for t in self.tasks if rr[t] > 0))
        return "\n".join(lines)


def _normalise(raw: dict[str, float], where: str) -> dict[str, float]:
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"{where}: every task has rate 0 ({raw}); give at least one task a positive weight")
    return {t: v / total for t, v in raw.items()}
