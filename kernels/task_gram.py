"""Task Gram matrix and task combination over gradient partitions.

Two passes over the ``T`` per-task gradient partitions that a rank holds (``grads
[T, n]``, one row per task, ``n`` up to ~1e9 on a large model):

- ``task_gram(grads) -> G [T, T] fp32``, ``G[i, j] = <g_i, g_j>``: reads each row once.
- ``task_combine(grads, coeffs [T]) -> out [n]``, ``out = sum_t coeffs[t] g_t``: reads each
  row once and writes ``out`` once.

Both are memory-bound (2 T^2 / (4 T) flop/byte for the Gram at fp32, far below any
GPU's ridge point), so the kernels are judged against the memory bandwidth.

Layers, as in every megamt kernel: ``@triton.jit`` kernel -> host function (checks,
contiguity, grid) -> ``torch.autograd.Function`` -> functional wrapper with
``backend="auto" | "torch" | "triton"``. The torch path (BLAS matmul/GEMV in fp32
chunks) is the CPU path; ``reference_task_gram`` / ``reference_task_combine`` are the
naive float64 references the tests hold both to.

Kernel design
- Gram: a persistent grid of ``P`` programs; each loads ``[T_PAD, BLOCK]`` tiles of all
  ``T`` rows at a stride of ``P * BLOCK`` columns, accumulates ``tile @ tile^T`` in fp32
  registers (``T > 8``: ``tl.dot`` on 16+ rows in full IEEE fp32, no TF32; ``T <= 8``: a
  broadcast multiply-reduce, since padding 2 tasks to 16 rows would do 64x the useful
  FMAs and make the kernel compute-bound), and writes one ``[T_PAD, T_PAD]`` partial. The ``P`` partials are summed by torch (deterministic, no atomics), so every
  rank gets reproducible results.
- Combine: one program per ``BLOCK`` columns loads the ``[T_PAD, BLOCK]`` tile, scales
  rows by ``coeffs`` (fp32) and reduces over the task axis.
- Row offsets are int64 (``T * n`` exceeds 2^31 at n = 2e8, T = 16).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch path still works
    triton = None
    tl = None
    HAS_TRITON = False

MAX_TASKS = 64
"""Task rows a kernel tile holds (``T_PAD``, a power of two >= 16 for ``tl.dot``)."""

TORCH_CHUNK = 1 << 22
"""Columns per chunk of the torch combine for non-fp32 inputs (bounds the fp32 copy)."""

GRAM_CHUNK = 1 << 16
"""Columns per chunk of the torch Gram (fp32 products, fp64 sum of the T x T partials)."""


# --------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _task_gram_kernel(
        grads_ptr,  # [T, n], row stride `stride_t`, unit column stride
        partial_ptr,  # [P, T_PAD, T_PAD] fp32
        T,
        n,
        stride_t,
        T_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_programs = tl.num_programs(0)
        rows = tl.arange(0, T_PAD)
        cols = tl.arange(0, BLOCK)
        row_mask = rows < T
        row_off = rows.to(tl.int64) * stride_t  # int64: T * n may exceed 2^31
        acc = tl.zeros((T_PAD, T_PAD), dtype=tl.float32)
        for start in range(pid * BLOCK, n, num_programs * BLOCK):
            col = start + cols
            mask = row_mask[:, None] & (col < n)[None, :]
            tile = tl.load(grads_ptr + row_off[:, None] + col[None, :].to(tl.int64), mask=mask, other=0.0)
            tile = tile.to(tl.float32)
            if USE_DOT:  # tensor-core shaped tiles need 16 rows; full IEEE fp32, no TF32
                acc += tl.dot(tile, tl.trans(tile), input_precision="ieee")
            else:  # few tasks: a padded 16-row dot would do up to 64x the useful FMAs
                acc += tl.sum(tile[:, None, :] * tile[None, :, :], axis=2)
        out = partial_ptr + pid.to(tl.int64) * T_PAD * T_PAD + rows[:, None] * T_PAD + rows[None, :]
        tl.store(out, acc)

    @triton.jit
    def _task_combine_kernel(
        grads_ptr,  # [T, n]
        coeffs_ptr,  # [T] fp32
        out_ptr,  # [n]
        T,
        n,
        stride_t,
        T_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = tl.arange(0, T_PAD)
        col = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        row_mask = rows < T
        coeffs = tl.load(coeffs_ptr + rows, mask=row_mask, other=0.0)
        mask = row_mask[:, None] & (col < n)[None, :]
        tile = tl.load(grads_ptr + rows.to(tl.int64)[:, None] * stride_t + col[None, :], mask=mask, other=0.0)
        acc = tl.sum(tile.to(tl.float32) * coeffs[:, None], axis=0)
        tl.store(out_ptr + col, acc.to(out_ptr.dtype.element_ty), mask=col < n)


def _t_pad(T: int, for_dot: bool) -> int:
    p = triton.next_power_of_2(T)
    return max(16, p) if for_dot else max(2, p)


MAX_COLUMNS = 2**31 - 2**20
"""Columns per row the kernels index with int32 column offsets inside a row."""


def _check_grads(grads: Tensor, name: str) -> Tensor:
    if grads.dim() != 2:
        raise ValueError(f"{name}: grads must be [T, n] (one row per task), got shape {tuple(grads.shape)}")
    if grads.shape[0] < 1:
        raise ValueError(f"{name}: grads has no task rows")
    if not grads.dtype.is_floating_point:
        raise TypeError(f"{name}: grads must be floating point, got {grads.dtype}")
    if grads.stride(-1) != 1:
        grads = grads.contiguous()
    return grads


def _num_programs(device: torch.device, n_blocks: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks, 4 * sms))
    return max(1, min(n_blocks, 4))  # interpreter: few programs, it runs them serially


def triton_task_gram(grads: Tensor, block: int = 0) -> Tensor:
    """Host function of the Gram kernel: ``[T, n]`` -> ``[T, T]`` fp32."""
    if not HAS_TRITON:
        raise RuntimeError("task_gram(backend='triton') needs the triton package; use backend='torch'")
    grads = _check_grads(grads, "task_gram")
    T, n = grads.shape
    if T > MAX_TASKS:
        raise ValueError(f"task_gram: at most {MAX_TASKS} tasks per kernel tile, got {T}; use backend='torch'")
    if n > MAX_COLUMNS:
        raise ValueError(f"task_gram: at most {MAX_COLUMNS} columns per row, got {n}; split the partition")
    use_dot = T > 8
    t_pad = _t_pad(T, use_dot)
    # the broadcast path holds T_PAD^2 * BLOCK products in registers
    block = block or ((128 if t_pad <= 16 else 64) if use_dot else min(2048, max(64, 8192 // (t_pad * t_pad))))
    P = _num_programs(grads.device, triton.cdiv(max(n, 1), block))
    partial = torch.empty((P, t_pad, t_pad), dtype=torch.float32, device=grads.device)
    _task_gram_kernel[(P,)](grads, partial, T, n, grads.stride(0), T_PAD=t_pad, BLOCK=block, USE_DOT=use_dot)
    return partial.sum(0)[:T, :T]


def triton_task_combine(grads: Tensor, coeffs: Tensor, out: Optional[Tensor] = None, block: int = 0) -> Tensor:
    """Host function of the combine kernel: ``out[n] = coeffs @ grads`` (fp32 accumulation)."""
    if not HAS_TRITON:
        raise RuntimeError("task_combine(backend='triton') needs the triton package; use backend='torch'")
    grads = _check_grads(grads, "task_combine")
    T, n = grads.shape
    coeffs = _check_coeffs(coeffs, T, grads.device)
    if T > MAX_TASKS:
        raise ValueError(f"task_combine: at most {MAX_TASKS} tasks per kernel tile, got {T}; use backend='torch'")
    out = _check_out(out, n, grads)
    if n > MAX_COLUMNS:
        raise ValueError(f"task_combine: at most {MAX_COLUMNS} columns per row, got {n}; split the partition")
    t_pad = _t_pad(T, False)
    block = block or max(64, 4096 // t_pad)
    grid = (triton.cdiv(max(n, 1), block),)
    _task_combine_kernel[grid](grads, coeffs, out, T, n, grads.stride(0), T_PAD=t_pad, BLOCK=block)
    return out


def _check_coeffs(coeffs: Tensor, T: int, device, dtype=torch.float32) -> Tensor:
    coeffs = torch.as_tensor(coeffs)
    if coeffs.shape != (T,):
        raise ValueError(f"task_combine: coeffs must have shape ({T},) to match grads' {T} rows, got {tuple(coeffs.shape)}")
    return coeffs.to(device=device, dtype=dtype).contiguous()


def _check_out(out: Optional[Tensor], n: int, grads: Tensor) -> Tensor:
    if out is None:
        return torch.empty(n, dtype=grads.dtype, device=grads.device)
    if out.shape != (n,) or not out.is_contiguous() or out.device != grads.device:
        raise ValueError(f"task_combine: out must be a contiguous ({n},) tensor on {grads.device}, "
                         f"got {tuple(out.shape)} on {out.device}")
    return out


# --------------------------------------------------------------------------- torch path


def torch_task_gram(grads: Tensor, chunk: int = GRAM_CHUNK) -> Tensor:
    """``grads @ grads.T`` by column chunks: fp32 BLAS products (fp64 for fp64 input)
    summed in fp64.

    One ``[T, 2e6] @ [2e6, T]`` sgemm was both 2.3x slower (BLAS handles the long inner
    dimension badly, 1 thread, 2-core CPU) and ~100x less accurate (one fp32 dot over 2e6
    terms) than 64K-column chunks whose ``T x T`` partials are added in fp64.
    """
    grads = _check_grads(grads, "task_gram")
    T, n = grads.shape
    if grads.dtype == torch.float64:
        return grads @ grads.T
    G = torch.zeros((T, T), dtype=torch.float64, device=grads.device)
    for s in range(0, n, chunk):
        part = grads[:, s:s + chunk]
        part = part if part.dtype == torch.float32 else part.float()
        G += (part @ part.T).double()
    return G.float()


def torch_task_combine(grads: Tensor, coeffs: Tensor, out: Optional[Tensor] = None, chunk: int = TORCH_CHUNK) -> Tensor:
    """``coeffs @ grads`` (a GEMV, one read of each row) in fp32 (fp64 for fp64 input)."""
    grads = _check_grads(grads, "task_combine")
    T, n = grads.shape
    wide = grads.dtype in (torch.float32, torch.float64)
    coeffs = _check_coeffs(coeffs, T, grads.device, grads.dtype if wide else torch.float32)
    out = _check_out(out, n, grads)
    if wide:
        torch.mv(grads.t(), coeffs, out=out)
        return out
    for s in range(0, n, chunk):
        out[s:s + chunk] = (coeffs @ grads[:, s:s + chunk].float()).to(out.dtype)
    return out


# --------------------------------------------------------------------------- autograd + wrappers


def _use_triton(grads: Tensor, backend: str) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return HAS_TRITON and grads.is_cuda and grads.shape[0] <= MAX_TASKS
    return backend == "triton"


class TaskGram(torch.autograd.Function):
    """``G = X X^T``; backward ``dX = (dG + dG^T) X``."""

    @staticmethod
    def forward(ctx, grads, use_triton):
        ctx.save_for_backward(grads)
        return triton_task_gram(grads) if use_triton else torch_task_gram(grads)

    @staticmethod
    def backward(ctx, dG):
        (grads,) = ctx.saved_tensors
        return ((dG + dG.T).to(grads.dtype) @ grads), None


class TaskCombine(torch.autograd.Function):
    """``y = c X``; backward ``dX = c^T dy``, ``dc = X dy``."""

    @staticmethod
    def forward(ctx, grads, coeffs, use_triton):
        ctx.save_for_backward(grads, coeffs)
        return triton_task_combine(grads, coeffs) if use_triton else torch_task_combine(grads, coeffs)

    @staticmethod
    def backward(ctx, dy):
        grads, coeffs = ctx.saved_tensors
        dgrads = coeffs.to(grads.dtype)[:, None] * dy[None, :].to(grads.dtype)
        dcoeffs = (grads.float() @ dy.float()).to(coeffs.dtype)
        return dgrads, dcoeffs, None


def task_gram(grads: Tensor, *, backend: str = "auto") -> Tensor:
    """Gram matrix of the task rows: ``[T, n] -> [T, T]`` fp32 (``G[i, j] = <g_i, g_j>``).

    ``backend="auto"``: the Triton kernel on CUDA, the torch (BLAS) path elsewhere.
    """
    use_triton = _use_triton(grads, backend)
    if torch.is_grad_enabled() and grads.requires_grad:
        return TaskGram.apply(grads, use_triton)
    return triton_task_gram(grads) if use_triton else torch_task_gram(grads)


def task_combine(grads: Tensor, coeffs: Tensor, *, out: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``sum_t coeffs[t] * grads[t]``: ``[T, n], [T] -> [n]`` in ``grads``' dtype, fp32 accumulation.

    ``out`` (no-grad use only) receives the result in place, e.g. a flat gradient buffer.
    """
    use_triton = _use_triton(grads, backend)
    if torch.is_grad_enabled() and (grads.requires_grad or torch.as_tensor(coeffs).requires_grad):
        if out is not None:
            raise ValueError("task_combine: out= is not supported when autograd records the call")
        return TaskCombine.apply(grads, coeffs, use_triton)
    if use_triton:
        return triton_task_combine(grads, coeffs, out=out)
    return torch_task_combine(grads, coeffs, out=out)


# --------------------------------------------------------------------------- references


def reference_task_gram(grads: Tensor) -> Tensor:
    """Naive float64 Gram: one dot product per pair."""
    g = grads.double()
    T = g.shape[0]
    G = torch.empty((T, T), dtype=torch.float64, device=g.device)
    for i in range(T):
        for j in range(T):
            G[i, j] = (g[i] * g[j]).sum()
    return G


def reference_task_combine(grads: Tensor, coeffs: Tensor) -> Tensor:
    """Naive float64 combination: a Python sum of scaled rows."""
    g = grads.double()
    c = torch.as_tensor(coeffs).double().to(g.device)
    out = torch.zeros_like(g[0])
    for t in range(g.shape[0]):
        out += c[t] * g[t]
    return out
