"""Gradient surgery on DeepSpeed ZeRO gradient partitions (stages 1, 2 and 3).

No device holds a full gradient under ZeRO-3, let alone one per task; under ZeRO-1/2 the
gradient is partitioned too. Each rank holds the averaged gradient *partition* of its share
of the parameters, and that is enough:

1. One task-homogeneous micro-batch per task inside one accumulation window; after
   each task's ``engine.backward()`` the rank's partition is copied into row ``k`` of a
   flat ``[T, n_local]`` fp32 buffer.
2. ``finish()``: the rows are per-task partitions (see below). The local Gram matrix
   (``megamt.kernels.task_gram``) over disjoint partitions sums to the global one: ONE
   all-reduce of ``T x T`` numbers. Every rank computes the same coefficients from it
   (``methods.py``), forms its combined partition ``sum_j c_j g_j`` locally
   (``task_combine``) and writes it back before ``engine.step()``.

How the per-task partitions are read depends on the stage (checked in deepspeed 0.19.8
source, ``utils/tensor_fragment.py``, ``runtime/zero/stage3.py``, ``stage_1_and_2.py``, and
held to a single-process reference on 2 CPU ranks in tests/integration/test_grad_surgery.py):

- ZeRO-3: the reduce-scatter runs after every backward and adds into the partition, so
  each snapshot is a running sum (``deepspeed.utils.safe_get_local_grad``); ``finish()``
  differences consecutive rows in place (``row_k -= row_{k-1}``, last to first; DeepSpeed
  copies, not adds, on the first micro-step of a window, so row 0 is task 0's already).
  Write-back: ``safe_set_local_grad`` (or one copy into ``grad_partitions_flat_buffer``
  when the partitions tile it). With CPU offload (``offload_optimizer``) the mid-window
  snapshots read the partition buffer that accumulates every backward
  (``__param_id_to_grad_partition``, private), since the optimizer's fp32 ``.grad`` is
  filled only at the boundary; write-back goes to both.
- ZeRO-1/2: ZeRO-1 reduces only at the accumulation boundary and ZeRO-2 keeps fp32
  accumulation state whose layout depends on the mode (contiguous, compact bf16
  accumulation, offload). So on a measured step every task's backward is made an
  accumulation boundary (``engine.set_gradient_accumulation_boundary(True)``:
  ``before_backward()``): DeepSpeed reduces it to the owning rank, where the partition
  is read through the parameter's ``_hp_mapping`` fragment (the storage
  ``safe_get_full_grad``/``safe_set_full_grad`` use, without their full all-reduce), then
  zeroed (and, with CPU offload, the CPU accumulation buffer of the window too), so the
  next task's read is that task alone; the boundary is turned off again so the
  intervening ``engine.step()`` does not update the weights. ``finish()`` writes the
  combined partition into the fragments (also for ``sum``/``none``: they were zeroed),
  refreshes the per-parameter norm the CPU-offload clipping reads, and sets the boundary
  for the real ``engine.step()``. Cost: one reduce per task, which ZeRO-2 pays anyway
  (it reduces every micro-step) and ZeRO-1 pays T times instead of once.
- ZeRO-0 (no partitions), fp16 with dynamic loss scaling (partitions carry the loss
  scale until the step) and NVMe offload are refused with a named error.

Scaling. ``engine.backward(loss)`` divides the loss by ``gradient_accumulation_steps``
(``scale_wrt_gas=True``, the default) and ZeRO averages over the data-parallel ranks,
so a per-task partition is ``g_t = mean_ranks(grad L_t) / GAS``. The Gram matrix,
cosines and norms in :class:`SurgeryStats` are reported for ``grad L_t`` (multiplied
back by GAS), i.e. in units of each task's (balancer-weighted) loss. The coefficients
are scale-invariant and are applied to the DeepSpeed-scaled ``g_t``: the written
gradient is ``sum_j c_j g_j = (1/GAS) sum_j c_j grad L_j``. With ``method=sum``
(``c = 1``) that is exactly what DeepSpeed accumulates, the sum of per-task gradients
in DeepSpeed's units; under ZeRO-3 nothing is written back then (measure-only).

Memory: ``T_train * n_local`` fp32 (``n_local = params / world_size``; ``T_train`` = the
training tasks, zero-shot tasks never have a backward), e.g. 4 tasks on a 7B model over 8
ranks = 4 * 0.875e9 * 4 B = 14 GB per rank. With a gradient method every step measures, so
the buffer is kept from step to step (freeing it would not lower the peak, which recurs at
every step, and would only churn the allocator). Monitoring-only steps (``method="none"``,
every ``monitor_every`` steps) free it after ``finish()``; or, with
``gradients.monitor_sketch_dim = k``, need no buffer at all:

Sketch (monitoring only). A CountSketch (a sparse Johnson-Lindenstrauss transform) maps each
coordinate ``i`` of a task's partition to one of ``k`` buckets ``h(i)`` with a random sign
``s(i)``: ``(S g)_b = sum_{h(i)=b} s(i) g_i``, so ``<S a, S b>`` estimates ``<a, b>``
without bias, with variance ``(|a|^2 |b|^2 + <a,b>^2 - 2 sum_i a_i^2 b_i^2) / k`` — at most
``(G_aa G_bb + G_ab^2) / k``. Each rank hashes its own partition (hash seeded by step and
rank, regenerated chunk by chunk, never stored), sums the ±entries per bucket in float64
(``[T_train, k]`` per rank), and ONE all-reduce of the ``T x k`` sketches gives the sketch of
the whole gradient; ``G_hat = S S^T``. Under ZeRO-3 the snapshots are running sums: by
linearity the sketch of task t is the difference of the sketches of consecutive running
sums (float64, so the difference is exact to ~1e-16 of the sum). Under ZeRO-1/2 the
partitions are zeroed after each task, so one fp32 row accumulates their sum for the
write-back (the step's gradient) instead of ``T`` rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from megamt.gradients.methods import GradientMethod, build_method, cosine_matrix

COMBINE_CHUNK = 1 << 24
"""Columns per chunk of the in-place combine into row 0 (bounds the temporary)."""

SKETCH_CHUNK = 1 << 22
"""Elements per chunk of the CountSketch (its int32 hash, fp32 signed and float64 copies: 64 MiB)."""


def countsketch(parts: Sequence[Tensor], k: int, seed: int) -> Tensor:
    """The CountSketch ``S x`` (float64 ``[k]``) of the concatenation of ``parts``.

    Coordinate ``i`` goes to bucket ``h(i)`` with sign ``s(i)``, both drawn from one
    ``randint(0, 2k)`` per coordinate, chunk by chunk from generators seeded by ``(seed,
    part, chunk)``: the same ``seed`` and layout give the same hash, nothing ``n``-sized is
    kept. ``<S a, S b>`` is an unbiased estimate of ``<a, b>`` (see the module docstring).
    """
    device = parts[0].device if parts else torch.device("cpu")
    out = torch.zeros(k, dtype=torch.float64, device=device)
    gen = torch.Generator(device=device)
    for p_idx, part in enumerate(parts):
        flat = part.reshape(-1)
        for c_idx, start in enumerate(range(0, flat.numel(), SKETCH_CHUNK)):
            chunk = flat[start:start + SKETCH_CHUNK]
            gen.manual_seed(((seed * 1_000_003 + p_idx) * 65_537 + c_idx) % (1 << 63))
            r = torch.randint(0, 2 * k, (chunk.numel(),), generator=gen, device=device, dtype=torch.int32)
            signed = (r & 1).to(torch.float32).mul_(-2).add_(1).mul_(chunk)  # s(i) = ±1 from the low bit (exact)
            out.index_add_(0, r >> 1, signed.double())  # h(i) = r // 2, summed in float64
    return out


@dataclass
class SurgeryStats:
    """What one ``finish()`` measured. Matrices are ``[T, T]`` over ALL tasks (float64, CPU);
    rows/columns of tasks absent from the step are 0 and ``present`` is False there."""

    tasks: list[str]
    present: Tensor  # bool [T]
    gram: Tensor  # G[i, j] = <grad L_i, grad L_j>, rank-averaged task-loss gradients
    cosine: Tensor
    norms: Tensor  # sqrt(diag(G))
    coeffs: Tensor  # c_j of the applied combination (in DeepSpeed's scale); 0 for absent tasks
    conflicts: int  # pairs of present tasks with negative cosine
    method: str
    applied: bool  # whether the method changed the gradient (coefficients not all 1)
    timings: dict[str, float] = field(default_factory=dict)
    """seconds: snapshot (sum over the window's backwards), gram, allreduce, method, combine (incl. write-back)."""
    buffer_bytes: int = 0


class GradientSurgery:
    """Per-task gradient partitions of a DeepSpeed engine and their combination.

    ``method``: a ``gradients.method`` name (default ``gcfg.method``); ``"none"`` measures
    only (for ``gradients.monitor_every``). ``scale_wrt_gas`` must match the trainer's
    ``engine.backward(loss, scale_wrt_gas=...)``. ``backend``: kernels' backend
    (default ``gcfg.grad_backend``).

    Per window: ``begin_step()``; per task ``before_backward()``, ``engine.backward``,
    ``after_backward(task)``, ``engine.step()`` except after the last; ``finish()``; the
    last ``engine.step()``. ``before_backward`` matters under ZeRO-1/2 only.
    """

    def __init__(self, engine, gcfg, task_names: Sequence[str], *, method: Optional[str] = None,
                 scale_wrt_gas: bool = True, backend: Optional[str] = None, flat_fast_path: bool = True,
                 train_tasks: Optional[Sequence[str]] = None):
        self.engine = engine
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        # rows per window: the tasks that can have a backward (zero-shot tasks never do)
        train_tasks = self.task_names if train_tasks is None else list(train_tasks)
        unknown = [t for t in train_tasks if t not in self.task_names]
        if unknown or not train_tasks:
            raise ValueError(f"gradient surgery: train_tasks {unknown or train_tasks} must be a non-empty subset of "
                             f"the tasks {self.task_names}")
        self.max_rows = len(train_tasks)
        self.method_name = gcfg.method if method is None else method
        self.method: Optional[GradientMethod] = None
        if self.method_name not in ("none",):
            self.method = build_method(self.method_name, self.num_tasks, cagrad_c=gcfg.cagrad_c,
                                       gradvac_beta=gcfg.gradvac_beta, seed=gcfg.seed)
        self.scale_wrt_gas = scale_wrt_gas
        self.backend = backend or getattr(gcfg, "grad_backend", "auto")
        self.flat_fast_path = flat_fast_path
        # a gradient method measures at every step: its buffer is kept (see the module docstring)
        self.keep_buffer = self.method is not None
        # monitoring only: a k-dimensional CountSketch per task instead of the [T, n_local] buffer
        self.sketch_dim = int(getattr(gcfg, "monitor_sketch_dim", 0) or 0) if self.method is None else 0
        self.seed = int(getattr(gcfg, "seed", 0))
        self.windows = 0  # measuring windows begun (varies the sketch's hash from step to step)

        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in (1, 2, 3):
            raise NotImplementedError(
                f"gradient surgery needs a DeepSpeed ZeRO stage 1, 2 or 3 config (got stage {self.stage}): the "
                "per-task gradients are kept as this rank's gradient partitions. Use ds_configs/zero3.json or "
                "zero2.json, or gradients.method=none")
        if engine.fp16_enabled():
            raise NotImplementedError("gradient surgery with fp16 loss scaling is not supported; use bf16 or fp32")
        offload = engine.zero_offload_optimizer()
        device = str(getattr(offload, "device", "none")) if offload is not None else "none"
        if device.endswith("nvme"):
            raise NotImplementedError("gradient surgery with NVMe optimizer offload is not supported; "
                                      "use offload_optimizer.device=cpu or none")
        self.offload = device.endswith("cpu")
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("gradient surgery: the model has no trainable parameter")
        # ZeRO-1/2: reduce every task's backward on its own (see the module docstring)
        self.reduce_each_backward = self.stage in (1, 2)
        if self.stage == 3 and not all(hasattr(p, "ds_id") for p in self.params):
            raise RuntimeError("gradient surgery: parameters are not ZeRO-3 partitioned (no ds_id); "
                               "build it after deepspeed.initialize")
        if self.reduce_each_backward and not all(hasattr(p, "_hp_mapping") for p in self.params):
            raise RuntimeError(f"gradient surgery: ZeRO-{self.stage} parameters have no optimizer fragment mapping "
                               "(_hp_mapping); build it after deepspeed.initialize")
        self.group = getattr(engine.optimizer, "dp_process_group", None)
        self.buffer: Optional[Tensor] = None  # [train tasks, n_local] fp32
        self.sketch: Optional[Tensor] = None  # [train tasks, k] float64 (sketch mode)
        self._prev_sketch: Optional[Tensor] = None  # ZeRO-3 sketch mode: sketch of the last running sum
        self._sum_row: Optional[Tensor] = None  # ZeRO-1/2 sketch mode: fp32 [n_local], the tasks' sum
        self.sizes: list[int] = []
        self.offsets: list[tuple[int, int]] = []
        self.flat: Optional[Tensor] = None  # ZeRO-3: the optimizer's own flat gradient partition, when contiguous
        self.rows: list[int] = []  # task index of each filled row, in backward order
        self.snapshot_s = 0.0
        self.partitions_hook = None
        """Called by ``finish()`` as ``hook(partitions [k, n_local] fp32, task indices of the rows,
        scale)`` once the rows are per-task partitions, before any combination overwrites them
        (the gradient of task ``rows[r]``'s loss is ``partitions[r] * scale``); it must not
        write into them. Used by megamt.gradients.affinity (the TAG lookahead). Collective if
        the hook is."""

    # ------------------------------------------------------------------ window

    def begin_step(self) -> None:
        """Start an accumulation window (call before the first task's backward)."""
        self.rows = []
        self.snapshot_s = 0.0
        self.windows += 1
        self.sketch = self._prev_sketch = self._sum_row = None

    def before_backward(self) -> None:
        """Call before each task's ``engine.backward`` (after setting the trainer's own
        boundary): under ZeRO-1/2 every task's backward is an accumulation boundary."""
        if self.reduce_each_backward:
            self.engine.set_gradient_accumulation_boundary(True)

    def after_backward(self, task_index: int) -> None:
        """Snapshot the rank's partition right after task ``task_index``'s backward."""
        if not 0 <= task_index < self.num_tasks:
            raise IndexError(f"after_backward: task index {task_index} out of range for tasks {self.task_names}")
        if task_index in self.rows:
            raise RuntimeError(f"after_backward: task {self.task_names[task_index]!r} already had a backward in "
                               "this window; one micro-batch per task per optimizer step (call begin_step())")
        if len(self.rows) >= self.max_rows:
            raise RuntimeError(f"after_backward: more backwards in this window than the {self.max_rows} training "
                               "tasks the surgery was built for (train_tasks)")
        _sync()
        t0 = time.perf_counter()
        parts = self._local_parts()
        if self.sketch_dim:
            self._sketch_after_backward(parts)
            self.rows.append(task_index)
            _sync()
            self.snapshot_s += time.perf_counter() - t0
            return
        if self.buffer is None:
            self._allocate(parts)
        else:
            self._check_layout(parts)
        row = self.buffer[len(self.rows)]
        flat = self.flat if self.stage == 3 else (self._contiguous_flat(parts) if self.flat_fast_path else None)
        if flat is not None:
            row.copy_(flat)
        else:
            for (a, b), part in zip(self.offsets, parts):
                row[a:b].copy_(part.reshape(-1))
        if self.reduce_each_backward:
            # the next task's backward must find empty partitions; the engine.step() that the
            # caller runs before it must not update the weights
            self._zero12(parts)
            self.engine.set_gradient_accumulation_boundary(False)
        self.rows.append(task_index)
        _sync()
        self.snapshot_s += time.perf_counter() - t0

    def finish(self) -> SurgeryStats:
        """Gram, all-reduce, coefficients, combine and write-back; call before ``engine.step()``."""
        if not self.rows:
            raise RuntimeError("finish(): no after_backward() in this window")
        if self.sketch_dim:
            return self._finish_sketch()
        from megamt import comm

        k = len(self.rows)
        buf = self.buffer[:k]
        timings = {"snapshot": self.snapshot_s}
        _sync()
        t0 = time.perf_counter()
        if not self.reduce_each_backward:
            for r in range(k - 1, 0, -1):  # ZeRO-3 running sums -> per-task partitions
                buf[r].sub_(buf[r - 1])
        if self.partitions_hook is not None:  # its time is not the Gram's
            h0 = time.perf_counter()
            self.partitions_hook(buf, list(self.rows), float(self.engine.gradient_accumulation_steps()
                                                             if self.scale_wrt_gas else 1))
            timings["partitions_hook"] = time.perf_counter() - h0
            t0 += timings["partitions_hook"]
        from megamt.kernels.task_gram import task_gram

        local = task_gram(buf, backend=self.backend).double()
        _sync()
        t1 = time.perf_counter()
        comm.all_reduce(comm.on_device(local, self.group), group=self.group)
        _sync()
        t2 = time.perf_counter()
        gas = self.engine.gradient_accumulation_steps() if self.scale_wrt_gas else 1
        G_sub = local * float(gas) ** 2  # task-loss units
        coeffs_sub = torch.ones(k, dtype=torch.float64)
        if self.method is not None:
            coeffs_sub = self.method.coefficients(G_sub, tasks=list(self.rows)).to(torch.float64)
        t3 = time.perf_counter()
        changed = self.method is not None and not torch.equal(coeffs_sub, torch.ones_like(coeffs_sub))
        if changed or self.reduce_each_backward:  # ZeRO-1/2: the partitions were zeroed, always write
            self._combine_and_write(buf, coeffs_sub)
        if self.reduce_each_backward:
            self.engine.set_gradient_accumulation_boundary(True)  # the real step
        _sync()
        t4 = time.perf_counter()
        timings.update(gram=t1 - t0, allreduce=t2 - t1, method=t3 - t2, combine=t4 - t3)
        stats = self._stats(G_sub, coeffs_sub, changed, timings, self.buffer.numel() * self.buffer.element_size())
        if not self.keep_buffer:  # monitoring only: the next measuring step is monitor_every steps away
            self.buffer = None
        return stats

    # ------------------------------------------------------------------ sketch (monitoring only)

    def _sketch_after_backward(self, parts: list[Tensor]) -> None:
        from megamt import comm

        device = parts[0].device if parts else torch.device("cpu")
        if self.sketch is None:  # the window's first task
            self._set_layout(parts)
            self.sketch = torch.zeros((self.max_rows, self.sketch_dim), dtype=torch.float64, device=device)
        else:
            self._check_layout(parts)

        # one hash per window and rank: every task of the window is projected alike
        seed = (self.seed * 1_000_003 + self.windows) * 4_099 + comm.rank(self.group)
        s = countsketch(parts, self.sketch_dim, seed)
        row = self.sketch[len(self.rows)]
        if self.reduce_each_backward:  # ZeRO-1/2: this task's partition alone; keep the sum for the step
            row.copy_(s)
            if self._sum_row is None:
                self._sum_row = torch.zeros(sum(self.sizes), dtype=torch.float32, device=device)
            a = 0
            for part in parts:
                self._sum_row[a:a + part.numel()].add_(part.reshape(-1))
                a += part.numel()
            self._zero12(parts)
            self.engine.set_gradient_accumulation_boundary(False)
        else:  # ZeRO-3: a running sum; the sketch is linear, so difference the sketches
            row.copy_(s if self._prev_sketch is None else s - self._prev_sketch)
            self._prev_sketch = s

    def _finish_sketch(self) -> SurgeryStats:
        from megamt import comm

        k = len(self.rows)
        timings = {"snapshot": self.snapshot_s}
        _sync()
        t0 = time.perf_counter()
        # the sum of the ranks' sketches is the sketch of the whole gradient: T x k numbers
        sk = comm.all_reduce(comm.on_device(self.sketch[:k], self.group), group=self.group)
        _sync()
        t1 = time.perf_counter()
        gas = self.engine.gradient_accumulation_steps() if self.scale_wrt_gas else 1
        G_sub = (sk @ sk.T).cpu() * float(gas) ** 2  # G_hat = S S^T, in task-loss units
        coeffs_sub = torch.ones(k, dtype=torch.float64)
        t2 = time.perf_counter()
        if self.reduce_each_backward:  # the partitions were zeroed: write the step's gradient back
            self._write12(self._sum_row)
            self.engine.set_gradient_accumulation_boundary(True)
        _sync()
        t3 = time.perf_counter()
        timings.update(gram=t2 - t1, allreduce=t1 - t0, method=0.0, combine=t3 - t2)
        held = self.sketch.numel() * self.sketch.element_size() + (
            self._sum_row.numel() * self._sum_row.element_size() if self._sum_row is not None else 0)
        stats = self._stats(G_sub, coeffs_sub, False, timings, held)
        self.sketch = self._prev_sketch = self._sum_row = None
        return stats

    # ------------------------------------------------------------------ internals

    def _local_parts(self) -> list[Tensor]:
        """This rank's gradient partition, one tensor per parameter it owns a part of."""
        if self.stage == 3:
            if self.offload:
                table = self.engine.optimizer._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
                return [table[p.ds_id] for p in self.params]
            from deepspeed.utils import safe_get_local_grad

            return [safe_get_local_grad(p) for p in self.params]
        return [frag for _, frag in self._fragments()]

    def _fragments(self) -> list[tuple[Tensor, Tensor]]:
        """ZeRO-1/2: (param, 1-D view of the rank's fp32/accumulation gradient fragment)
        for every parameter with a fragment on this rank. Looked up on every call: DeepSpeed
        may rebuild these buffers at every boundary."""
        out = []
        for p in self.params:
            mapping = p._hp_mapping
            if mapping is None:  # no element of p in this rank's partition
                continue
            grad = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
            address = mapping.lp_fragment_address
            if grad.numel() != address.numel:  # a full-size accumulation buffer: this rank's slice of it
                grad = grad.narrow(0, address.start, address.numel)
            out.append((p, grad))
        return out

    def _zero12(self, parts: list[Tensor]) -> None:
        for part in parts:
            part.zero_()
        if self.offload:  # the CPU accumulation buffers of the window (ZeRO-1/2 offload)
            opt = self.engine.optimizer
            acc = getattr(opt, "accumulated_grads_in_cpu", {})
            for p in self.params:
                buf = acc.get(opt.get_param_id(p))
                if buf is not None:
                    buf.zero_()

    def _set_layout(self, parts: list[Tensor]) -> None:
        self.sizes = [p.numel() for p in parts]
        self.offsets, a = [], 0
        for s in self.sizes:
            self.offsets.append((a, a + s))
            a += s

    def _allocate(self, parts: list[Tensor]) -> None:
        self._set_layout(parts)
        device = parts[0].device if parts else torch.device("cpu")
        self.buffer = torch.empty((self.max_rows, sum(self.sizes)), dtype=torch.float32, device=device)
        if self.stage == 3 and self.flat_fast_path and not self.offload:
            self.flat = self._contiguous_flat(parts)

    def _check_layout(self, parts: list[Tensor]) -> None:
        if [p.numel() for p in parts] != self.sizes:
            raise RuntimeError("gradient surgery: this rank's gradient partition changed layout between "
                               f"backwards ({len(parts)} fragments vs {len(self.sizes)}); DeepSpeed repartitioned?")

    @staticmethod
    def _contiguous_flat(parts: list[Tensor]) -> Optional[Tensor]:
        """The parts as ONE flat view when they tile one fp32 storage in order (ZeRO-3's
        ``grad_partitions_flat_buffer``): one copy per snapshot instead of one per parameter."""
        if not parts:
            return None
        first = parts[0]
        if any(p.dtype != torch.float32 or not p.is_contiguous() for p in parts):
            return None
        storage = first.untyped_storage()
        offset = first.storage_offset()
        for p in parts:
            if p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != offset:
                return None
            offset += p.numel()
        flat = torch.empty(0, dtype=torch.float32, device=first.device)
        flat.set_(storage, first.storage_offset(), (offset - first.storage_offset(),))
        return flat

    def _combine_and_write(self, buf: Tensor, coeffs: Tensor) -> None:
        from megamt.kernels.task_gram import task_combine

        c = coeffs.to(torch.float32)
        out = buf[0]  # in place, chunk by chunk: each chunk reads all rows before row 0 is overwritten
        n = buf.shape[1]
        for s in range(0, n, COMBINE_CHUNK):
            e = min(n, s + COMBINE_CHUNK)
            out[s:e].copy_(task_combine(buf[:, s:e], c, backend=self.backend))
        if self.reduce_each_backward:
            self._write12(out)
            return
        if self.flat is not None:
            self.flat.copy_(out)
            return
        from deepspeed.utils import safe_set_local_grad

        table = (self.engine.optimizer._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
                 if self.offload else None)
        for (a, b), p in zip(self.offsets, self.params):
            safe_set_local_grad(p, out[a:b])
            if table is not None:  # a later boundary copy (unmanaged accumulation) must see it too
                table[p.ds_id].view(-1).copy_(out[a:b])

    def _write12(self, out: Tensor) -> None:
        frags = self._fragments()
        self._check_layout([f for _, f in frags])
        opt = self.engine.optimizer
        norms = getattr(opt, "norm_for_param_grads", None) if self.offload else None
        for (a, b), (p, frag) in zip(self.offsets, frags):
            frag.copy_(out[a:b])
            if norms is not None:  # CPU offload's clipping reads each fragment's norm from here
                pid = opt.get_param_id(p)
                old = norms.get(pid)
                norms[pid] = frag.detach().to(old.dtype if torch.is_tensor(old) else torch.float32).norm(2)

    def _stats(self, G_sub: Tensor, coeffs_sub: Tensor, applied: bool, timings: dict,
               buffer_bytes: int) -> SurgeryStats:
        T = self.num_tasks
        idx = torch.tensor(self.rows)
        gram = torch.zeros((T, T), dtype=torch.float64)
        gram[idx[:, None], idx[None, :]] = G_sub.cpu()
        present = torch.zeros(T, dtype=torch.bool)
        present[idx] = True
        coeffs = torch.zeros(T, dtype=torch.float64)
        coeffs[idx] = coeffs_sub
        cos = cosine_matrix(gram)
        conflicts = int(sum(1 for a in range(T) for b in range(a + 1, T)
                            if present[a] and present[b] and cos[a, b] < 0))
        return SurgeryStats(tasks=self.task_names, present=present, gram=gram, cosine=cos,
                            norms=gram.diagonal().clamp_min(0).sqrt(), coeffs=coeffs, conflicts=conflicts,
                            method=self.method_name, applied=applied, timings=timings,
                            buffer_bytes=buffer_bytes)

    def state_dict(self) -> dict:
        # windows: the sketch's hash of the next monitoring step (exact resume of its estimate)
        return {"method": self.method.state_dict() if self.method is not None else {}, "windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        if self.method is not None:
            self.method.load_state_dict(state.get("method", {}))
        self.windows = int(state.get("windows", 0))


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
