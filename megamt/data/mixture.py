"""Task mixture: per-task sampling rates, by strategy and curriculum phase.

Rates are probabilities of drawing the *next example* from a task (``mixture.level=example``)
or the *next micro-batch* (``mixture.level=batch``: every micro-batch holds one task), not
token shares.

- ``explicit``: ``tasks.X.weight``
- ``proportional``: the number of training examples
- ``capped``: ``min(size, K)`` (T5's examples-proportional mixing with cap K)
- ``temperature``: ``size ** (1 / T)`` (T=1 proportional, T→∞ uniform)
- ``dynamic``: rates that follow training (``mixture.dynamic``, :class:`DynamicRates`): start
  from ``dynamic.init`` and move with the per-task training losses (exp3, group_dro) or with
  each task's gap to a target score at every evaluation (target_gap).

Outside ``explicit``, a task's ``weight`` (when set) multiplies its rate. A curriculum
phase (``mixture.phases``, the last one with ``start_step <= step`` applies) restricts the
tasks to its ``tasks`` list (empty = all) and replaces the (normalised) base rate of every
task it names in ``weights``; the result is normalised again. Under ``dynamic`` the phase
fixes the task set and the method's distribution ``q`` is renormalised over it, with the
floor ``rate = min_prob + (1 - K * min_prob) * q`` (K active tasks).

Dynamic rates depend only on numbers that are identical on every rank (all-reduced step
losses, evaluation results), computed with Python floats in a fixed order: every rank holds
the same rates without a collective. Their state (:meth:`TaskMixture.state_dict`) is part
of the pipeline's, so a resumed run continues with the same rates.
"""

from __future__ import annotations

import bisect
import json
import math
import random
from pathlib import Path
from typing import Any, Optional

from megamt.data.errors import DataError


class TaskMixture:
    def __init__(self, sizes: dict[str, int], cfg, weights: Optional[dict[str, Optional[float]]] = None):
        """``sizes``: training examples per task (in task order); ``cfg``: a MixtureConfig."""
        self.tasks = list(sizes)
        if not self.tasks:
            raise ValueError("a mixture needs at least one training task")
        self.sizes = dict(sizes)
        self.cfg = cfg
        self.level = getattr(cfg, "level", "example")
        self.weights = dict(weights or {})
        self.dynamic: Optional[DynamicRates] = None
        if cfg.strategy == "dynamic":
            d = cfg.dynamic
            init = self._base_rates(d.init)
            self.dynamic = DYNAMIC_METHODS[d.method](self.tasks, init, d)
            self.base = dict(init)
        else:
            self.base = self._base_rates(cfg.strategy)
        self._cache: dict[tuple[int, int], tuple[list[str], list[float]]] = {}

    def _base_rates(self, strategy: str) -> dict[str, float]:
        c = self.cfg
        raw = {}
        for t in self.tasks:
            n, w = self.sizes[t], self.weights.get(t)
            if strategy == "explicit":
                r = float(w if w is not None else 0.0)
            else:
                r = {"proportional": float(n), "capped": float(min(n, c.cap)), "uniform": 1.0,
                     "temperature": float(n) ** (1.0 / c.temperature)}[strategy]
                if w is not None:
                    r *= w
            raw[t] = r
        return _normalise(raw, "mixture")

    def phase_index(self, step: int) -> int:
        starts = [p.start_step for p in self.cfg.phases]
        return max(0, bisect.bisect_right(starts, step) - 1)

    def active_tasks(self, step: int) -> list[str]:
        """The tasks the curriculum phase at ``step`` samples (all without phases)."""
        if not self.cfg.phases:
            return list(self.tasks)
        ph = self.cfg.phases[self.phase_index(step)]
        return [t for t in self.tasks if not ph.tasks or t in ph.tasks]

    def rates(self, step: int = 0) -> dict[str, float]:
        """``{task: probability}`` at ``step`` (tasks not active in the phase get 0)."""
        if self.dynamic is not None:
            return floored(self.dynamic.distribution(step), self.active_tasks(step), self.cfg.dynamic.min_prob)
        if not self.cfg.phases:
            return dict(self.base)
        ph = self.cfg.phases[self.phase_index(step)]
        active = self.active_tasks(step)
        raw = {t: (float(ph.weights[t]) if t in ph.weights else self.base[t]) if t in active else 0.0
               for t in self.tasks}
        return _normalise(raw, f"mixture.phases (step {step})")

    def sample(self, rng: random.Random, step: int = 0) -> str:
        key = (self.phase_index(step) if self.cfg.phases else 0,
               self.dynamic.version_at(step) if self.dynamic is not None else 0)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            r = self.rates(step)
            cum, acc = [], 0.0
            for t in self.tasks:
                acc += r[t]
                cum.append(acc)
            self._cache[key] = (self.tasks, cum)
        tasks, cum = self._cache[key]
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        return tasks[min(i, len(tasks) - 1)]

    # ------------------------------------------------------------------ dynamic mixing
    def observe_losses(self, step: int, losses: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based): the step's per-task mean training losses
        (all-reduced, tasks present in the step only). A rate update takes effect from
        0-based step index ``step`` on, i.e. the next step."""
        if self.dynamic is not None:
            self.dynamic.observe_losses(step, {t: v for t, v in losses.items() if t in self.sizes},
                                        self.rates(step - 1))

    def observe_eval(self, step: int, losses: dict[str, float], results: Optional[dict] = None) -> None:
        """After the validation at ``step`` (completed steps): per-task validation losses and,
        with ``eval.during_training``, the metric results of megamt.eval (``{"tasks": {name:
        {"metrics": {...}}}}``; a task's score is its first metric, the type's primary one)."""
        if self.dynamic is not None:
            self.dynamic.observe_eval(step, {t: v for t, v in losses.items() if t in self.sizes},
                                      {t: v for t, v in primary_scores(results).items() if t in self.sizes})

    def state_dict(self) -> dict[str, Any]:
        return {"dynamic": self.dynamic.state_dict()} if self.dynamic is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dynamic is not None and state.get("dynamic") is not None:
            self.dynamic.load_state_dict(state["dynamic"])
            self._cache.clear()

    def describe(self, step: int = 0) -> str:
        r = self.rates(step)
        head = f"task mixture ({self.cfg.strategy}"
        if self.cfg.strategy == "temperature":
            head += f", T={self.cfg.temperature}"
        if self.cfg.strategy == "capped":
            head += f", K={self.cfg.cap}"
        if self.dynamic is not None:
            d = self.cfg.dynamic
            head += f" {d.method}, init {d.init}, min_prob {d.min_prob}"
        if self.level == "batch":
            head += ", one task per micro-batch"
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


def floored(q: dict[str, float], active: list[str], min_prob: float) -> dict[str, float]:
    """``q`` renormalised over the ``active`` tasks with every active rate >= ``min_prob``:
    ``min_prob + (1 - K * min_prob) * q_t / sum_active(q)``; inactive tasks get 0."""
    total = sum(q[t] for t in active)
    k = len(active)
    share = {t: q[t] / total for t in active} if total > 0 else {t: 1.0 / k for t in active}
    return {t: min_prob + (1.0 - k * min_prob) * share[t] if t in share else 0.0 for t in q}


def primary_scores(results: Optional[dict]) -> dict[str, float]:
    """``{task: score}`` of a megamt.eval result (``eval.json``, a ``run_summary.json``'s
    ``eval``): each task's first metric, which is its type's primary metric unless
    ``eval.metrics`` chose others."""
    out = {}
    for name, entry in ((results or {}).get("tasks") or {}).items():
        metrics = entry.get("metrics") or {}
        if metrics:
            out[name] = float(next(iter(metrics.values())))
    return out


def read_targets(paths: list[str], signal: str) -> dict[str, float]:
    """Per-task targets from result files (later files win): ``transfer.json`` (the
    single-task score of each task), ``eval.json`` (each task's primary metric), a transfer
    run's ``run_summary.json`` (its ``eval`` metrics, or ``eval_loss`` for signal=loss)."""
    out: dict[str, float] = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(str(path), "missing_file", "mixture.dynamic.targets_from: file not found (a "
                            "transfer.json, eval.json or run_summary.json with the tasks' target scores)")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", "malformed_json", f"not valid JSON: {e.msg}") from None
        if signal == "loss":
            out.update({t: float(v) for t, v in (doc.get("eval_loss") or {}).items()})
        elif isinstance(doc.get("tasks"), list):  # transfer.json
            out.update({r["task"]: float(r["single"]) for r in doc["tasks"] if r.get("single") is not None})
        else:
            out.update(primary_scores(doc.get("eval", doc)))
    return out


# --------------------------------------------------------------------------- dynamic methods


class DynamicRates:
    """The method's distribution ``q`` over the training tasks, updated from observations.

    ``schedule`` holds the distributions in effect from a step on (the latest two: the one in
    use and the one before, so the rates a finished step used can still be logged).
    Observations of the first ``warmup_steps`` steps are ignored and ``init`` holds.
    """

    def __init__(self, tasks: list[str], init: dict[str, float], cfg):
        self.tasks, self.init, self.cfg = list(tasks), dict(init), cfg
        self.schedule: list[tuple[int, dict[str, float], int]] = [(0, dict(init), 0)]  # (from step, q, version)
        self.version = 0
        self.updates = 0
        self.win_sum = {t: 0.0 for t in self.tasks}
        self.win_n = {t: 0 for t in self.tasks}

    def _entry(self, step: int) -> tuple[int, dict[str, float], int]:
        for entry in reversed(self.schedule):
            if step >= entry[0]:
                return entry
        return self.schedule[0]

    def distribution(self, step: int) -> dict[str, float]:
        """``q`` in effect at 0-based step ``step``."""
        return self._entry(step)[1]

    def version_at(self, step: int) -> int:
        """An id of the distribution in effect at ``step`` (changes with every update)."""
        return self._entry(step)[2]

    def publish(self, step: int, q: dict[str, float]) -> None:
        """``q`` takes effect from 0-based step ``step`` on."""
        self.version += 1
        self.schedule = [e for e in self.schedule if e[0] < step][-1:] + [(step, dict(q), self.version)]
        self.updates += 1

    def observe_losses(self, step: int, losses: dict[str, float], used: dict[str, float]) -> None:
        if step <= self.cfg.warmup_steps:
            return
        for t, v in losses.items():
            if math.isfinite(v):
                self.win_sum[t] += v
                self.win_n[t] += 1
        if (step - self.cfg.warmup_steps) % self.cfg.every == 0:
            means = {t: self.win_sum[t] / self.win_n[t] for t in self.tasks if self.win_n[t]}
            self.win_sum = {t: 0.0 for t in self.tasks}
            self.win_n = {t: 0 for t in self.tasks}
            if means:
                self.publish(step, self.update(means, used))

    def observe_eval(self, step: int, losses: dict[str, float], scores: dict[str, float]) -> None:
        """Evaluation results (only target_gap uses them)."""

    def update(self, means: dict[str, float], used: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"method": type(self).__name__,
                "schedule": [[s, [q[t] for t in self.tasks], v] for s, q, v in self.schedule],
                "version": self.version, "updates": self.updates, "tasks": list(self.tasks),
                "win_sum": [self.win_sum[t] for t in self.tasks], "win_n": [self.win_n[t] for t in self.tasks],
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != type(self).__name__ or list(state.get("tasks", [])) != self.tasks:
            raise ValueError(f"dynamic mixture state is for {state.get('method')} over {state.get('tasks')}; this run "
                             f"has {type(self).__name__} over {self.tasks}")
        self.schedule = [(int(s), dict(zip(self.tasks, map(float, q))), int(v)) for s, q, v in state["schedule"]]
        self.version, self.updates = int(state["version"]), int(state["updates"])
        self.win_sum = dict(zip(self.tasks, map(float, state["win_sum"])))
        self.win_n = dict(zip(self.tasks, map(int, state["win_n"])))
        self.load_extra_state(state.get("extra") or {})

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def _softmax(logits: dict[str, float]) -> dict[str, float]:
    top = max(logits.values())
    e = {t: math.exp(v - top) for t, v in logits.items()}
    s = sum(e.values())
    return {t: v / s for t, v in e.items()}


class Exp3Rates(DynamicRates):
    """Online Data Mixing (Albalak et al. 2023): EXP3 over tasks, reward = training loss.

    At update k (k = 1, 2, ...), for every task observed since the last update, the reward
    estimate moves towards its importance-weighted mean loss:
    ``R_t <- a * R_t + (1 - a) * L_t / p_t`` (``a`` = ``smoothing``, ``p_t`` the rate the
    task was sampled with). The exploration rate is
    ``e_k = min(1 / K, sqrt(ln K / (K * k)))`` and
    ``q_t = (1 - K * e_k) * softmax_t(ln init_t + e_{k-1} * R_t) + K * e_k * init_t``: ``init`` at
    first (the paper's uniform exploration when ``init`` is uniform, the default), then tasks
    whose loss stays high are sampled more. With example-level mixing every task is
    observed in (nearly) every step; the 1/p importance weight, kept as published, then
    raises the reward of rarely sampled tasks, which pulls towards balance.
    """

    def __init__(self, tasks, init, cfg):
        super().__init__(tasks, init, cfg)
        self.reward = {t: 0.0 for t in self.tasks}
        self.eps = 1.0 / len(self.tasks)

    def update(self, means, used):
        K = len(self.tasks)
        for t, v in means.items():
            if used.get(t, 0.0) > 0:  # (a phase's inactive task can linger in the packer's buffer)
                self.reward[t] = self.cfg.smoothing * self.reward[t] + (1 - self.cfg.smoothing) * v / used[t]
        k = self.updates + 1
        prev, self.eps = self.eps, min(1.0 / K, math.sqrt(math.log(K) / (K * k))) if K > 1 else 0.0
        soft = _softmax({t: math.log(max(self.init[t], 1e-300)) + prev * self.reward[t] for t in self.tasks})
        return {t: (1 - K * self.eps) * soft[t] + K * self.eps * self.init[t] for t in self.tasks}

    def extra_state(self):
        return {"reward": [self.reward[t] for t in self.tasks], "eps": self.eps}

    def load_extra_state(self, state):
        self.reward = dict(zip(self.tasks, map(float, state["reward"])))
        self.eps = float(state["eps"])


class GroupDRORates(DynamicRates):
    """Group DRO's exponentiated-gradient task weights (Sagawa et al. 2020) as sampling rates:
    ``q_t <- q_t * exp(eta * L_t)``, normalised, for the tasks observed since the last update
    (``L_t`` their mean training loss); starts at ``init``. Kept in log space."""

    def __init__(self, tasks, init, cfg):
        super().__init__(tasks, init, cfg)
        self.log_q = {t: math.log(max(init[t], 1e-300)) for t in self.tasks}

    def update(self, means, used):
        for t, v in means.items():
            self.log_q[t] += self.cfg.eta * v
        top = max(self.log_q.values())
        self.log_q = {t: v - top for t, v in self.log_q.items()}  # keeps the numbers bounded
        return _softmax(self.log_q)

    def extra_state(self):
        return {"log_q": [self.log_q[t] for t in self.tasks]}

    def load_extra_state(self, state):
        self.log_q = dict(zip(self.tasks, map(float, state["log_q"])))


class TargetGapRates(DynamicRates):
    """Dynamic sampling by the gap to a target (Gottumukkala et al. 2020): at every evaluation,
    ``q_t`` proportional to the task's relative gap, ``max(0, (target - score) / target)`` for
    a metric (higher is better; a target of 0 is met at once) or ``max(0, (loss - target) /
    target)`` for a validation loss.
    A task without a new value keeps its last gap (one never evaluated takes the mean gap of the
    others); when every gap is 0, ``init`` returns.
    Targets: ``mixture.dynamic.targets``, then ``targets_from`` (every training task needs one)."""

    def __init__(self, tasks, init, cfg):
        super().__init__(tasks, init, cfg)
        targets = read_targets(list(cfg.targets_from), cfg.target_signal) if cfg.targets_from else {}
        targets.update(cfg.targets)
        missing = [t for t in self.tasks if t not in targets]
        if missing:
            raise DataError("mixture.dynamic.targets", "missing_target",
                            f"target_gap needs a target for every training task; none for {missing} "
                            f"(targets: {sorted(cfg.targets)}, files: {list(cfg.targets_from)})")
        # a metric target of 0 (a task the reference model could not do at all) is met at once:
        # gap 0; a loss target must be > 0 (the gap is relative to it)
        bad = [t for t in self.tasks if not (targets[t] >= 0 if cfg.target_signal == "metric" else targets[t] > 0)
               or not math.isfinite(targets[t])]
        if bad:
            raise DataError("mixture.dynamic.targets", "bad_target",
                            f"targets must be finite and {'>= 0' if cfg.target_signal == 'metric' else '> 0'}; "
                            f"{bad} have {[targets[t] for t in bad]}")
        self.targets = {t: float(targets[t]) for t in self.tasks}
        self.gap: dict[str, float] = {}
        self.last_eval = -1

    def observe_losses(self, step, losses, used):
        pass

    def observe_eval(self, step, losses, scores):
        values = scores if self.cfg.target_signal == "metric" else losses
        self.last_eval = step
        if step < self.cfg.warmup_steps or not values:
            return
        for t, v in values.items():
            if math.isfinite(v):
                tgt = self.targets[t]
                if self.cfg.target_signal == "loss":
                    self.gap[t] = max(0.0, (v - tgt) / tgt)
                else:
                    self.gap[t] = max(0.0, (tgt - v) / tgt) if tgt > 0 else 0.0
        mean = sum(self.gap.values()) / len(self.gap) if self.gap else 0.0
        gaps = {t: self.gap.get(t, mean) for t in self.tasks}
        total = sum(gaps.values())
        q = {t: gaps[t] / total for t in self.tasks} if total > 0 else dict(self.init)
        self.publish(step, q)

    def extra_state(self):
        return {"gap": [self.gap.get(t) for t in self.tasks], "last_eval": self.last_eval}

    def load_extra_state(self, state):
        self.gap = {t: float(g) for t, g in zip(self.tasks, state["gap"]) if g is not None}
        self.last_eval = int(state["last_eval"])


DYNAMIC_METHODS = {"exp3": Exp3Rates, "group_dro": GroupDRORates, "target_gap": TargetGapRates}
