"""Inter-task affinity from one run (TAG: Fifty et al. 2021, "Efficiently Identifying Task
Groupings for Multi-Task Networks"), measured on DeepSpeed ZeRO-3 gradient partitions.

The lookahead affinity of task i onto task j at a step with weights theta::

    Z[i -> j] = 1 - L_j(theta - lr * g_i) / L_j(theta)

``g_i`` = the gradient of task i's (balancer-weighted) loss over the step's global task-i
micro-batches, ``L_j`` = task j's mean loss over the step's global task-j micro-batches.
Z > 0: a step on task i alone lowers task j's loss (i helps j); Z < 0: it raises it.

Where the numbers come from. A measuring step (``gradients.affinity_every``) already runs one
task-homogeneous micro-batch per task, and :class:`megamt.gradients.surgery.GradientSurgery`
holds every task's gradient *partition* on every rank. Its ``partitions_hook`` hands them to
:meth:`LookaheadAffinity.measure` (in ``finish()``, after the per-task differencing, before
any combination is written back), which:

1. releases every gathered parameter (ZeRO-3 keeps small "persistent" parameters gathered
   in full on every rank; a forward would otherwise read their stale full copy),
2. runs one eval-mode forward per task j on the rank's own task-j micro-batch -> L_j(theta)
   (loss sums and counts of all ranks: one all-reduce of 2T numbers),
3. for each task i: shifts the rank's own parameter partition (``param.ds_tensor``, what
   ZeRO-3 gathers for a forward) by ``-lr * g_i`` -- a local operation on disjoint
   partitions, so together the ranks hold exactly ``theta - lr * g_i``; releases the
   gathered copies; one forward per task j -> L_j(theta - lr g_i) (one all-reduce); then
   copies the saved partition back (bit-exact restore: a copy, not a subtraction),
4. releases the gathered copies again, so the optimizer step and the next forward see the
   restored partitions (``_post_step`` re-gathers the persistent ones).

Cost per measuring step: T * (T + 1) forwards without gradients, T + 1 all-reduces of 2T
numbers, one copy of the rank's parameter partition (``params / world`` elements in the
model dtype). The shift is computed in fp32 and stored in the model dtype: in bf16 a shift
below the weight's last bit (about 2^-8 relative) rounds away; the first-order estimate
below has no such limit.

First-order estimate from the Gram matrix (no forward at all, every ZeRO stage): a first-
order expansion ``L_j(theta - lr g_i) = L_j(theta) - lr <g_i, g_j> + O(lr^2)`` gives::

    Z1[i -> j] = lr * G[i, j] / L_j(theta)

with ``G`` the all-reduced Gram matrix of the step (``SurgeryStats.gram``) and ``L_j`` the
step's task means. It is the lookahead's limit for small ``lr``.

The lookahead is an SGD step of size ``lr`` (``gradients.affinity_lr``, default
``train.lr``), as in TAG's SGD formulation; it does not replay Adam's update.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from megamt import comm


def first_order_affinity(gram: Tensor, losses: Tensor, lr: float, present: Optional[Tensor] = None) -> Tensor:
    """``Z1[i, j] = lr * G[i, j] / L_j`` (float64 ``[T, T]``; NaN where a task is absent or
    ``L_j <= 0``). ``gram``: the step's Gram matrix of task-loss gradients; ``losses``: ``L_j``."""
    G = gram.detach().double().cpu()
    L = losses.detach().double().cpu()
    T = G.shape[0]
    if G.shape != (T, T) or L.shape != (T,):
        raise ValueError(f"first_order_affinity: gram {tuple(G.shape)} and losses {tuple(L.shape)} do not match")
    here = torch.ones(T, dtype=torch.bool) if present is None else present.detach().cpu().bool()
    valid = here & torch.isfinite(L) & (L > 0)
    Z = lr * G / L.clamp_min(1e-30)[None, :]
    return torch.where(valid[:, None] & valid[None, :], Z, torch.full_like(Z, float("nan")))


class LookaheadAffinity:
    """The lookahead of one measuring step on the rank's ZeRO-3 parameter partitions.

    ``engine``: a DeepSpeed ZeRO-3 engine whose forward takes a batch dict and returns a
    :class:`megamt.losses.TaskLoss`; ``params``: the trainable parameters in the order of
    the surgery's partition rows (``GradientSurgery.params``).
    """

    def __init__(self, engine, task_names: Sequence[str], params: Sequence[torch.nn.Parameter]):
        self.engine = engine
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        self.params = list(params)
        if int(engine.zero_optimization_stage()) != 3 or not all(hasattr(p, "ds_tensor") for p in self.params):
            raise NotImplementedError(
                "the TAG lookahead affinity shifts each rank's ZeRO-3 parameter partition and needs ZeRO-3 "
                "(train.ds_config=zero3 or zero3_offload); under ZeRO-1/2 set gradients.affinity_lookahead=false "
                "for the first-order affinity from the Gram matrix")
        for p in self.params:
            if str(getattr(getattr(p, "ds_tensor", None), "final_location", "")).endswith("nvme"):
                raise NotImplementedError("the lookahead affinity does not support NVMe parameter offload")
        self.last_seconds = 0.0

    # ------------------------------------------------------------------ ZeRO-3 plumbing

    def _release_gathered(self) -> None:
        """Every gathered parameter back to its partition (persistent ones included)."""
        opt = self.engine.optimizer
        offload = getattr(opt, "parameter_offload", None)
        if offload is not None:
            offload.partition_all_parameters()

    def _losses(self, batches: dict[int, dict[str, Any]], forward: Callable[[dict], Any]) -> Tensor:
        """Global mean loss of task j on its own micro-batch, for every j in ``batches``
        (float64 ``[T]``, NaN elsewhere): one forward each, one all-reduce in total."""
        T = self.num_tasks
        local = comm.zeros(2 * T, dtype=torch.float64)
        for j, batch in batches.items():
            out = forward(batch)
            local[j] += out.loss_sum[j].double()
            local[T + j] += out.count[j].double()
        total = comm.all_reduce(local).cpu()
        sums, counts = total[:T], total[T:]
        mean = torch.full((T,), float("nan"), dtype=torch.float64)
        for j in batches:
            if counts[j] > 0:
                mean[j] = sums[j] / counts[j]
        return mean

    # ------------------------------------------------------------------ the measurement

    @torch.no_grad()
    def measure(self, partitions: Tensor, rows: Sequence[int], scale: float, lr: float,
                batches: dict[int, dict[str, Any]], forward: Callable[[dict], Any]) -> tuple[Tensor, Tensor]:
        """``Z[i, j]`` for the tasks of ``rows`` (float64 ``[T, T]``, NaN elsewhere) and ``L(theta)``.

        ``partitions[r]``: this rank's partition of task ``rows[r]``'s gradient in DeepSpeed's
        units (the task-loss gradient is ``partitions[r] * scale``); ``batches[j]``: this
        rank's micro-batch of task j; ``forward(batch) -> TaskLoss`` runs the engine.
        Collective: every rank calls it with the same ``rows``. The parameters are
        bit-identical afterwards.
        """
        t0 = time.perf_counter()
        sizes = [p.ds_tensor.numel() for p in self.params]
        if partitions.shape[1] != sum(sizes):
            raise RuntimeError(f"lookahead affinity: {partitions.shape[1]} gradient elements vs {sum(sizes)} in the "
                               "rank's parameter partitions; the surgery's partition layout changed?")
        T = self.num_tasks
        Z = torch.full((T, T), float("nan"), dtype=torch.float64)
        was_training = self.engine.training
        saved = [p.ds_tensor.detach().clone() for p in self.params]
        self.engine.eval()  # no dropout: L_j(theta) and L_j(theta - lr g_i) see the same function
        try:
            self._release_gathered()
            base = self._losses(batches, forward)
            for r, i in enumerate(rows):
                offset = 0
                for p, n in zip(self.params, sizes):
                    shard = p.ds_tensor
                    step = partitions[r, offset:offset + n].to(device=shard.device, dtype=torch.float32)
                    shard.data.copy_((shard.float() - (lr * scale) * step.view_as(shard)).to(shard.dtype))
                    offset += n
                self._release_gathered()
                shifted = self._losses(batches, forward)
                for j in batches:
                    Z[i, j] = 1.0 - shifted[j] / base[j]
                for p, keep in zip(self.params, saved):
                    p.ds_tensor.data.copy_(keep)
        finally:
            for p, keep in zip(self.params, saved):  # also after an exception mid-way
                p.ds_tensor.data.copy_(keep)
            self._release_gathered()
            self.engine.train(was_training)
        self.last_seconds = time.perf_counter() - t0
        return Z, base


class TaskAffinity:
    """The trainer's side: which steps measure, the running means, TensorBoard and ``affinity.json``.

    Per measuring step: ``arm(step, batches)`` before ``surgery.finish()`` (installs the
    surgery's ``partitions_hook`` when the lookahead is due), then ``update(step, stats,
    task_means)`` with the step's :class:`SurgeryStats` and task means; ``scalars()`` and
    ``heatmap()`` for the log. Means are over the measured steps, NaN entries skipped.

    ``affinity.json`` (rank 0) keeps every measured step's matrices too (``per_step``), so a
    resumed run continues its means: at construction the file's records are read back, and
    the first measurement drops those of its own step and later (steps replayed after the
    checkpoint it resumed from).
    """

    KINDS = ("lookahead", "first_order")

    def __init__(self, gcfg, task_names: Sequence[str], *, lr: float, surgery=None, forward=None,
                 run_dir: Optional[str | Path] = None, rank: int = 0):
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        self.every = gcfg.affinity_every
        self.lr = float(gcfg.affinity_lr if gcfg.affinity_lr is not None else lr)
        self.surgery = surgery
        self.forward = forward
        self.lookahead = None
        if gcfg.affinity_lookahead and surgery is not None:
            self.lookahead = LookaheadAffinity(surgery.engine, self.task_names, surgery.params)
        self.path = None if run_dir is None or rank != 0 else Path(run_dir) / "affinity.json"
        self.records: list[dict[str, Any]] = []  # {"step", kind: [T][T] (None = NaN)}
        self._fresh = True
        if self.path is not None and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
                if saved.get("tasks") == self.task_names:
                    self.records = list(saved.get("per_step", []))
            except (json.JSONDecodeError, OSError):
                self.records = []
        self.current: dict[str, Tensor] = {}
        self._pending: Optional[tuple[Tensor, Tensor]] = None

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) measures the affinity."""
        return bool(self.every) and step % self.every == 0

    def arm(self, step: int, batches: dict[int, dict[str, Any]]) -> None:
        """Before ``surgery.finish()`` of a measuring step: run the lookahead inside it when due."""
        self._pending = None
        if self.lookahead is None or not self.due(step):
            self.surgery.partitions_hook = None
            return

        def hook(partitions: Tensor, rows: list[int], scale: float) -> None:
            self._pending = self.lookahead.measure(partitions, rows, scale, self.lr, batches, self.forward)
            self.surgery.partitions_hook = None

        self.surgery.partitions_hook = hook

    def update(self, step: int, stats, task_means: Sequence[float]) -> bool:
        """Record this step's matrices; returns whether anything was measured."""
        self.current = {}
        if not self.due(step) or stats is None:
            self._pending = None
            return False
        losses = torch.tensor([m if math.isfinite(m) else float("nan") for m in task_means], dtype=torch.float64)
        self.current["first_order"] = first_order_affinity(stats.gram, losses, self.lr, stats.present)
        if self._pending is not None:
            self.current["lookahead"] = self._pending[0]
            self._pending = None
        if self._fresh:  # records of this step and later: from a launch killed after our checkpoint
            self.records = [r for r in self.records if r["step"] < step]
            self._fresh = False
        self.records.append({"step": step, **{k: _plain(Z.numpy()) for k, Z in self.current.items()}})
        if self.path is not None:
            self.write(self.path)
        return True

    def _stack(self, kind: str) -> np.ndarray:
        mats = [r[kind] for r in self.records if kind in r]
        T = self.num_tasks
        if not mats:
            return np.empty((0, T, T))
        return np.array([[[np.nan if v is None else v for v in row] for row in m] for m in mats], dtype=float)

    def steps(self, kind: str) -> int:
        return sum(kind in r for r in self.records)

    def mean(self, kind: str = "lookahead") -> np.ndarray:
        """Mean over the measured steps (NaN where never measured); the diagonal Z[i -> i] included."""
        stack = self._stack(kind)
        if not len(stack):
            return np.full((self.num_tasks, self.num_tasks), np.nan)
        ok = np.isfinite(stack)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok.any(0), np.where(ok, stack, 0.0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)

    def scalars(self) -> dict[str, float]:
        """This step's ``affinity/<i>/<j>`` (lookahead) and ``affinity_first_order/<i>/<j>``."""
        out: dict[str, float] = {}
        prefix = {"lookahead": "affinity", "first_order": "affinity_first_order"}
        for kind, Z in self.current.items():
            for a, ta in enumerate(self.task_names):
                for b, tb in enumerate(self.task_names):
                    if a != b and math.isfinite(float(Z[a, b])):
                        out[f"{prefix[kind]}/{ta}/{tb}"] = float(Z[a, b])
        if self.lookahead is not None and "lookahead" in self.current:
            out["affinity/time_s"] = self.lookahead.last_seconds
        return out

    def heatmap(self) -> np.ndarray:
        """The running means as an RGB image ``uint8 [3, H, W]`` (row i = effect of a step on i)."""
        kinds = [k for k in self.KINDS if self.steps(k)]
        return affinity_heatmap(self.task_names, {k: self.mean(k) for k in kinds}, {k: self.steps(k) for k in kinds})

    def summary(self) -> dict[str, Any]:
        """What ``affinity.json`` holds: tasks, lr, per kind the mean matrix and step count, per step."""
        return {"tasks": self.task_names, "lr": self.lr,
                "definition": "Z[i][j] = 1 - L_j(theta - lr g_i) / L_j(theta): effect of a step on task i onto task j",
                **{k: {"mean": _plain(self.mean(k)), "steps": self.steps(k)} for k in self.KINDS},
                "per_step": self.records}

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary(), indent=1))
        tmp.replace(path)


def _plain(m: np.ndarray) -> list:
    """A matrix for JSON: NaN -> None."""
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(m, dtype=float)]


def affinity_heatmap(task_names: Sequence[str], matrices: dict[str, np.ndarray],
                     steps: Optional[dict[str, int]] = None) -> np.ndarray:
    """Affinity matrices side by side as one RGB image (CHW ``uint8``), symmetric colour scale."""
    from megamt.gradients.monitor import figure_chw

    return figure_chw(plot_affinity(task_names, matrices, steps))


def plot_affinity(task_names: Sequence[str], matrices: dict[str, np.ndarray], steps: Optional[dict[str, int]] = None,
                  title: str = "inter-task affinity Z[i -> j]"):
    """A matplotlib figure: one heatmap per matrix (rows: the task stepped on, columns: the
    task whose loss is read), diagonal blank."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from megamt.gradients.monitor import draw_matrix

    names = list(task_names)
    items = list(matrices.items()) or [("none", np.full((len(names),) * 2, np.nan))]
    size = 1.4 + 0.45 * len(names)
    fig, axes = plt.subplots(1, len(items), figsize=(len(items) * (size + 1.2), size + 0.4), dpi=80, squeeze=False)
    for ax, (kind, m) in zip(axes[0], items):
        z = np.array(m, dtype=float)
        np.fill_diagonal(z, np.nan)
        lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        draw_matrix(fig, ax, names, z, -lim, lim, ".2g")
        ax.set_xlabel("loss of task j", fontsize=8)
        ax.set_ylabel("step on task i", fontsize=8)
        ax.set_title(kind + (f" ({steps[kind]} steps)" if steps and kind in steps else ""), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
