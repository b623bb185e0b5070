"""First-order meta-learning (Reptile, first-order MAML) on DeepSpeed ZeRO-1/2/3 partitions.

Second-order MAML differentiates through the inner updates, which a ZeRO-3 model of billions of
parameters cannot afford. The first-order methods need only what every rank already has: its
fp32 *partition* of the weights (the optimizer's master copy) and its partition of the
rank-averaged gradient after each backward. So every operation here is partition-local:

- ``begin_outer()``: θ₀ ← the rank's fp32 partitions (one buffer of the same size, allocated once).
- ``inner_step()``: after an inner backward (an accumulation boundary or not, as
  ``inner_boundary`` says, see below) the rank updates its fp32 partitions with plain SGD (or
  Adam with its own moments, ``meta.inner_optimizer``) from the gradient DeepSpeed reduced into
  its partition, runs no DeepSpeed optimizer step, clears DeepSpeed's gradient state (the next
  backward starts from zero) and publishes the new weights to the model-dtype parameters.
- Reptile ``reptile_outer(eps)``: θ ← θ₀ + ε (θ_k − θ₀). Batched (several tasks in sequence per
  outer step, ``meta.tasks_per_step``): ``end_task()`` after each task adds θ_k − θ₀ to a
  displacement buffer and restores θ₀; ``reptile_outer(eps)`` then moves by ε times their mean.
- First-order MAML ``restore(publish=False)`` before ``engine.step()``: the query backward (an
  accumulation boundary) left the gradient at the adapted weights θ_k in the partitions; the
  fp32 weights go back to θ₀ and DeepSpeed's optimizer (the outer optimizer: train.lr, its
  schedule, clipping) applies that gradient at θ₀ and publishes the result itself (a skipped
  step, ``not engine.was_step_applied()``, must be followed by ``publish()``).

No parameter or gradient is gathered and nothing is communicated beyond the training passes
themselves. ``displacement_sq()`` returns this rank's share of |θ − θ₀|² on the device; the
trainer adds it to the step's one closing all-reduce.

The two partition layouts (deepspeed 0.19.8), one adapter each, chosen by the ZeRO stage:

- ZeRO-3 (``runtime/zero/stage3.py``, ``_Zero3Partitions``): per optimizer sub-group ``i``,
  ``fp32_partitioned_groups_flat[i]`` (fp32 master, on the CPU with optimizer offload) and
  ``fp16_partitioned_groups_flat[i]`` (the model-dtype partition; each parameter's ``ds_tensor``
  is a view into it; an alias of the fp32 one under autocast), laid out as the parameters of
  ``fp16_groups[i]`` back to back, ``partition_numel()`` elements each. Every backward
  reduce-scatters into the gradient partition ``__param_id_to_grad_partition[ds_id]`` (on the
  device also with offload), so inner backwards are *not* boundaries (``inner_boundary =
  False``): the gradient stays there and no optimizer step runs; ``zero_grad()`` resets
  ``micro_step_id`` so the next backward copies instead of adding. Publishing re-partitions
  every parameter, copies fp32 into the model-dtype partitions and re-gathers the *persistent*
  parameters (small ones kept whole on every rank), as DeepSpeed's own step does.
- ZeRO-1/2 (``runtime/zero/stage_1_and_2.py``, ``_Zero12Partitions``): per parameter group
  ``i``, ``single_partition_of_fp32_groups[i]`` (fp32 master of this rank's contiguous slice of
  the flattened group, on the CPU with offload) and ``parallel_partitioned_bit16_groups[i][r]``
  (rank ``r``'s slice of ``bit16_groups_flat[i]``, which the model parameters view). Stage 1
  reduces gradients only at an accumulation boundary and stage 2 hands the reduced partition
  over only at one, so every inner backward IS a boundary (``inner_boundary = True``) and the
  inner step takes the place of DeepSpeed's optimizer step: it reads the partition gradient
  where ``step()`` would (``averaged_gradients[i]``, its pieces back to back in the partition's
  layout, or the compact fp32 buffer; with offload ``single_partition_of_fp32_groups[i].grad``),
  releases it as ``step()`` does, and publishes like ``update_lp_params()``: fp32 into this
  rank's bit16 slice, then the all-gather of the slices that ends every ZeRO-1/2 step.

Refused with a named error: ZeRO stage 0 (no partitions; use ZeRO-1, 2 or 3), fp16 loss
scaling (the partitions would carry the scale), NVMe offload of the optimizer or parameters
(partitions swapped out).

Held to a single-process float64 reference of the same algorithm on 2 CPU ranks in
tests/integration/test_meta.py (both methods on ZeRO-1, 2 and 3, with and without CPU optimizer
offload, with and without ZeRO-3 persistent parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

INNER_EPS = 1e-8
CHUNK = 1 << 24
"""Elements per chunk of the float64 displacement norm."""


class _Zero3Partitions:
    """One rank's ZeRO-3 partitions (see the module docstring): fp32 masters, gradients per parameter."""

    inner_boundary = False

    def __init__(self, opt):
        self.opt = opt
        self.fp32: list[Tensor] = opt.fp32_partitioned_groups_flat
        self.lp: list[Tensor] = opt.fp16_partitioned_groups_flat
        self.device = self.lp[0].device if self.lp else torch.device("cpu")
        self.grad_table = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        # per sub-group: (param, start, numel) in the flat partition
        self.spans: list[list[tuple[Any, int, int]]] = []
        for i, group in enumerate(opt.fp16_groups):
            spans, a = [], 0
            for p in group:
                n = int(p.partition_numel())
                spans.append((p, a, n))
                a += n
            if a != self.fp32[i].numel():
                raise RuntimeError(f"meta: sub-group {i}'s fp32 partition has {self.fp32[i].numel()} elements, its "
                                   f"parameters' partitions {a}; DeepSpeed's layout changed?")
            self.spans.append(spans)

    def grads(self, i: int):
        """(start in fp32[i], gradient piece, flat) of this rank's gradient partition of group ``i``."""
        for p, a, n in self.spans[i]:
            if n:
                yield a, self.grad_table[p.ds_id].narrow(0, 0, n).reshape(-1)

    def clear_grads(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def publish(self) -> None:
        self.opt._partition_all_parameters()
        for i, (f, lp) in enumerate(zip(self.fp32, self.lp)):
            if lp is not None and lp.data_ptr() != f.data_ptr():
                lp.data.copy_(f.data)
            self.opt._unflatten_partitioned_parameters(i)
        persistent = getattr(self.opt, "persistent_parameters", None)
        if persistent:
            persistent[0].all_gather(persistent)


class _Zero12Partitions:
    """One rank's ZeRO-1/2 partitions (see the module docstring): a contiguous slice of each flat group."""

    inner_boundary = True

    def __init__(self, opt):
        self.opt = opt
        self.fp32: list[Tensor] = opt.single_partition_of_fp32_groups
        self.device = opt.bit16_groups_flat[0].device if opt.bit16_groups_flat else torch.device("cpu")
        self.offload = bool(opt.cpu_offload)

    def grads(self, i: int):
        """(start in fp32[i], gradient piece, flat): where DeepSpeed's ``step()`` reads them after a boundary."""
        opt = self.opt
        if self.offload:
            opt._wait_for_offload_copies()
            yield 0, self.fp32[i].grad.view(-1)
            return
        flat = opt._get_preflattened_grad_partition(i)
        if flat is not None:
            yield 0, flat
            return
        pieces = opt.averaged_gradients.get(i)
        if pieces is None:
            raise RuntimeError(f"meta: no reduced gradient for parameter group {i}; an inner backward on ZeRO-1/2 must "
                               "be an accumulation boundary (engine.set_gradient_accumulation_boundary(True))")
        a = 0
        for t in pieces:  # back to back in the partition's layout (step() flattens them, padding the last rank's)
            n = t.numel()
            yield a, t.reshape(-1)
            a += n
        if a > self.fp32[i].numel():
            raise RuntimeError(f"meta: parameter group {i}'s gradient pieces hold {a} elements, its fp32 partition "
                               f"{self.fp32[i].numel()}; DeepSpeed's layout changed?")

    def clear_grads(self) -> None:
        """Release the consumed gradient as DeepSpeed's ``step()`` does, so the next backward starts afresh."""
        opt = self.opt
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        opt.micro_step_id = INITIAL_MICRO_STEP_ID
        for i in range(len(self.fp32)):
            if not self.offload:
                opt.free_grad_in_param_list(opt.params_not_in_partition[i])
                opt.free_grad_in_param_list(opt.params_in_partition[i])
            opt._release_preflattened_grad_buffers(i)
            opt.averaged_gradients[i] = None
            opt.all_grad_tensors[i] = None
        if self.offload:
            opt._offload_accumulated_param_ids = set()
            opt.reset_cpu_buffers()
        opt.zero_grad(set_to_none=True)

    def publish(self) -> None:
        """fp32 into this rank's bit16 slice, then the slices all-gathered (the end of every ZeRO-1/2 step)."""
        self.opt.update_lp_params()


class MetaPartitions:
    """θ₀ buffers, the inner optimizer and the outer updates on one rank's ZeRO-1/2/3 partitions.

    ``inner_optimizer``: ``sgd`` | ``adam`` (moments kept across outer steps, as Nichol et al.'s
    implementation does; in ``state_dict``). ``betas``: Adam's (default (0, 0.999): no momentum
    inside a task, the paper's choice). ``inner_boundary``: whether an inner step's backward must
    be a gradient-accumulation boundary (ZeRO-1/2: yes; ZeRO-3: no); the caller sets it with
    ``engine.set_gradient_accumulation_boundary`` before each inner backward.
    """

    def __init__(self, engine, inner_optimizer: str = "sgd", betas: tuple[float, float] = (0.0, 0.999)):
        self.engine = engine
        opt = engine.optimizer
        stage = int(engine.zero_optimization_stage())
        if stage not in (1, 2, 3):
            raise NotImplementedError(
                f"meta.method needs DeepSpeed ZeRO partitions (got stage {stage}): the inner and outer updates run "
                "on each rank's fp32 optimizer partition. Set train.ds_config to a ZeRO-1, 2 or 3 config "
                "(templates: zero2, zero2_offload, zero3, zero3_offload)")
        if engine.fp16_enabled():
            raise NotImplementedError("meta.method with fp16 loss scaling is not supported (the gradient partitions "
                                      "carry the loss scale); use model.dtype=bf16 or fp32")
        if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
            raise NotImplementedError("meta.method with NVMe offload is not supported (the partitions are swapped "
                                      "out between steps); use offload_optimizer.device=cpu or none")
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"meta.inner_optimizer: {inner_optimizer!r} is not one of sgd, adam")
        self.opt = opt
        self.parts = _Zero3Partitions(opt) if stage == 3 else _Zero12Partitions(opt)
        self.inner_boundary = self.parts.inner_boundary
        self.inner_optimizer = inner_optimizer
        self.betas = (float(betas[0]), float(betas[1]))
        self.fp32: list[Tensor] = self.parts.fp32
        self.theta0: list[Tensor] = [f.detach().clone() for f in self.fp32]
        self.disp_sum: list[Tensor] | None = None  # batched Reptile: sum of the tasks' displacements
        self.tasks_done = 0
        self.adam_m: list[Tensor] | None = None
        self.adam_v: list[Tensor] | None = None
        self.adam_t = 0
        if inner_optimizer == "adam":
            self.adam_m = [torch.zeros_like(f) for f in self.fp32]
            self.adam_v = [torch.zeros_like(f) for f in self.fp32]

    @property
    def local_numel(self) -> int:
        return sum(f.numel() for f in self.fp32)

    # ------------------------------------------------------------------ the outer step

    def begin_outer(self) -> None:
        """θ₀ ← this rank's fp32 partitions (call before the outer step's first forward)."""
        for t0, f in zip(self.theta0, self.fp32):
            t0.copy_(f)
        self.tasks_done = 0
        if self.disp_sum is not None:
            for d in self.disp_sum:
                d.zero_()

    @torch.no_grad()
    def end_task(self) -> None:
        """Batched Reptile: this task's θ − θ₀ into the displacement sum, then θ ← θ₀ for the next task."""
        if self.disp_sum is None:
            self.disp_sum = [torch.zeros_like(f) for f in self.fp32]
        for d, t0, f in zip(self.disp_sum, self.theta0, self.fp32):
            d.add_(f).sub_(t0)
        self.tasks_done += 1
        self.restore()

    @torch.no_grad()
    def inner_step(self, lr: float) -> None:
        """One inner update from the gradient the last backward left in the partitions; then clear
        DeepSpeed's gradient state so the next backward starts from zero. Piece by piece (views into
        the flat partitions): no temporary of a group's size."""
        _sync()
        if self.inner_optimizer == "adam":
            self.adam_t += 1
        b1, b2 = self.betas
        for i, f in enumerate(self.fp32):
            for a, g in self.parts.grads(i):
                n = g.numel()
                g = g.to(device=f.device, dtype=torch.float32)
                w = f.narrow(0, a, n)
                if self.inner_optimizer == "sgd":
                    w.add_(g, alpha=-lr)
                    continue
                m, v = self.adam_m[i].narrow(0, a, n), self.adam_v[i].narrow(0, a, n)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** self.adam_t)).sqrt_().add_(INNER_EPS)
                w.addcdiv_(m, denom, value=-lr / (1 - b1 ** self.adam_t))
        self.parts.clear_grads()
        self.publish()

    @torch.no_grad()
    def displacement_sq(self) -> Tensor:
        """This rank's |θ − θ₀|² (after ``end_task()``: of the tasks' mean displacement; float64, on the
        model's device; the sum over ranks is the global one)."""
        total = torch.zeros((), dtype=torch.float64, device=self.parts.device)
        for i, (t0, f) in enumerate(zip(self.theta0, self.fp32)):
            for s in range(0, f.numel(), CHUNK):  # float64 temporaries of one chunk, not of a sub-group
                e = min(f.numel(), s + CHUNK)
                if self.tasks_done:
                    d = self.disp_sum[i][s:e].double() / self.tasks_done
                else:
                    d = f[s:e].double() - t0[s:e].double()
                total += d.square().sum().to(total.device)
        return total

    @torch.no_grad()
    def reptile_outer(self, eps: float) -> None:
        """θ ← θ₀ + ε (θ − θ₀), partition by partition (batched: θ₀ + ε · mean of the tasks' θ_k − θ₀)."""
        for i, (t0, f) in enumerate(zip(self.theta0, self.fp32)):
            if self.tasks_done:
                f.copy_(t0).add_(self.disp_sum[i], alpha=eps / self.tasks_done)
            else:
                f.sub_(t0).mul_(eps).add_(t0)
        self.publish()

    @torch.no_grad()
    def restore(self, publish: bool = True) -> None:
        """θ ← θ₀ (a skipped Reptile step; first-order MAML before the outer optimizer's step, with
        ``publish=False``: that step publishes the weights itself -- ``publish()`` if it was skipped)."""
        for t0, f in zip(self.theta0, self.fp32):
            f.copy_(t0)
        if publish:
            self.publish()

    def publish(self) -> None:
        """The fp32 partitions into the model-dtype parameters the forwards use, as DeepSpeed's own
        step does (ZeRO-3: local copies and the persistent parameters' re-gather; ZeRO-1/2: the
        all-gather of the bit16 slices)."""
        self.parts.publish()

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """The inner optimizer's state (this rank's partitions). θ₀ is not saved: a checkpoint is
        written between outer steps, where θ₀ is the weights themselves (re-taken by begin_outer)."""
        state: dict[str, Any] = {"inner_optimizer": self.inner_optimizer, "local_numel": self.local_numel,
                                 "adam_t": self.adam_t}
        if self.adam_m is not None:
            state["adam_m"] = [m.detach().cpu() for m in self.adam_m]
            state["adam_v"] = [v.detach().cpu() for v in self.adam_v]
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("inner_optimizer") != self.inner_optimizer or int(state.get("local_numel", -1)) != self.local_numel:
            raise ValueError(f"meta: the checkpoint's inner state ({state.get('inner_optimizer')}, "
                             f"{state.get('local_numel')} local elements) does not match this run "
                             f"({self.inner_optimizer}, {self.local_numel}); meta.inner_optimizer or the number of "
                             "ranks changed")
        self.adam_t = int(state.get("adam_t", 0))
        if self.adam_m is not None:
            for dst, src in zip(self.adam_m, state["adam_m"]):
                dst.copy_(src)
            for dst, src in zip(self.adam_v, state["adam_v"]):
                dst.copy_(src)


def reptile_epsilon(outer_lr: float, schedule: str, step: int, max_steps: int) -> float:
    """Reptile's outer step size ε for 0-based outer step ``step``: constant, or linearly annealed
    to 0 over the run (Nichol et al. 2018: ε = outer_lr · (1 − step / max_steps))."""
    if schedule == "constant":
        return outer_lr
    if schedule == "linear":
        return outer_lr * (1.0 - step / max(1, max_steps))
    raise ValueError(f"meta.outer_lr_schedule: {schedule!r} is not one of constant, linear")


def sample_meta_tasks(rates: dict[str, float], tasks: list[str], seed: int, step: int, n: int = 1) -> list[str]:
    """The ``n`` tasks of outer step ``step`` (with replacement), drawn by the mixture ``rates`` from a
    generator seeded by (seed, step) alone: identical on every rank without a collective, and again
    on resume."""
    import random

    weights = [max(0.0, float(rates.get(t, 0.0))) for t in tasks]
    if not any(w > 0 for w in weights):
        weights = [1.0] * len(tasks)
    rng = random.Random(int(seed) * 1_000_003 + int(step))
    return rng.choices(tasks, weights=weights, k=n)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
