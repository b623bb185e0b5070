"""Fused LM head + per-task cross-entropy that never holds the ``[N, V]`` logits.

    loss_sum, count = fused_linear_task_cross_entropy(hidden, weight, labels, task_ids, T)

is ``reference_linear_task_cross_entropy`` (kernels/reference.py) computed block by block:
blocks of ``chunk_tokens`` active tokens × ``chunk_vocab`` vocabulary rows of ``weight``.
The row-wise math (online log-sum-exp, loss, logits gradient) and its derivation live in
``task_cross_entropy.py``; this file holds the chunk driver, the ``autograd.Function``
and the functional wrapper.

Design: why the backward recomputes the logits
----------------------------------------------
Liger-Kernel computes the logits gradient inside the forward, assuming an upstream
gradient of 1, and in backward multiplies grad_hidden / grad_weight by the one scalar it
receives. Here the upstream gradient is a vector ``g[T]`` (a weight per task), so the
logits gradient is scaled per token row, ``D_ij = g_{task_i} · ∂loss_i/∂x_ij``.
grad_hidden = D·W has one row per token and could be rescaled afterwards, but
grad_weight = Dᵀ·hidden sums over tokens of every task: once summed, the per-task parts
cannot be separated again. Keeping them apart would need one ``[V, H]`` accumulator per
task present (T × 1 GiB at V=128k, H=4096 bf16). So the forward keeps only the per-token
log-sum-exp (fp32 ``[N]``), and the backward, which knows ``g``, recomputes each logits
block, turns it into ``D`` in place with the per-token scale, and does the two gradient
matmuls. Cost: 4 matmuls of 2·N·H·V flops (the unfused path and Liger do 3) and no
``[N, V]`` memory; rows whose scale is 0 (ignored tokens, tasks with g_t = 0) are
skipped in both passes.

Design: the hinted forward (``grad_scale_hint``), 3 matmuls when the upstream is known
--------------------------------------------------------------------------------------
In training the upstream gradient is known before the forward up to one scalar: the
trainer's objective is ``Σ_t w_t · L_t / N_t`` (global token counts ``N_t``), so
``g_t = c · w_t / N_t`` where ``c`` collects what is applied later as one scalar (loss
scaling, gradient accumulation, world size). Given ``hint[T] = w_t / N_t``, the forward
does what Liger does with a scalar: token blocks of *whole* vocabulary rows (``lse`` is
then known within the block), logits → ``D`` with ``c_i = hint[task_i]`` (one exp pass,
``loss_and_grad_`` in task_cross_entropy.py) → ``grad_hidden rows += D·W``,
``grad_weight += Dᵀ·hidden``, ``grad_bias += Σ_i D_i`` in fp32, kept for backward.
Since every gradient is linear in ``g`` (``D`` is linear in ``c_i``), a backward that
receives ``g = c · hint`` on the tasks that have tokens (tasks without tokens contribute
nothing whatever their ``g_t``) returns the kept gradients times ``c``: 3 matmuls in
all. The kept gradients are used once (a second backward with ``retain_graph=True``
recomputes).

Checking ``g = c · hint`` (relative tolerance 1e-6) needs the answer on the host to pick a
path, i.e. a host–device sync per call. So by default the check runs on the device only:
``c`` and the verdict stay tensors, and a ``g`` that is not ``c · hint`` turns the returned
gradients into NaN — a loud non-finite gradient, never a silently wrong one. The debug switch
``MEGAMT_CHECK_HINT=1`` (environment, read at the forward) checks on the host and takes the
recompute path below when the check fails, which is exact for every ``g`` (counted as
``hint_mismatch`` in ``backward_path_counts``).

Low precision: ``D`` is written in the input dtype before the matmuls. With the trainer's
hint (``w_t / N_t`` ≈ 1e-5) times softmax entries (≈ 1/V) it would underflow in fp16 (the
gradients came out wrong by percents). The forward therefore uses the scales
``hint[task_i] / unit`` with ``unit = max_i |hint[task_i]| / 2**10`` (over this call's tokens,
a device scalar): the largest ``|D|`` is ~2**10, far inside fp16's range, and the backward
multiplies the kept fp32 gradients by ``c · unit``.

Memory: fp32 ``[V, H]`` + ``[N_active, H]`` kept from forward to backward (the gradients the
reference allocates too, in fp32) + one ``[nt, V]`` block, ``nt = chunk_tokens``
(``model.loss_chunk_tokens``; default ``block elements // V``). The products are added into
the fp32 accumulators in place (``_add_mm_``): with bf16/fp16 operands its temporaries are
slabs of at most 16M (CUDA) / 4M (CPU) elements, never a second fp32 ``[V, H]`` per block.

Loop order: vocabulary blocks outside, token blocks inside. The forward merges each
block into a running (max, sum-exp) per token. In the backward, grad_weight rows of a
vocabulary block are finished after its inner token loop (fp32 accumulator of one block,
``[chunk_vocab, H]``), while grad_hidden accumulates across vocabulary blocks in fp32
``[N_active, H]``, which is smaller than the ``[V, H]`` one the other order would need
whenever a micro-batch has fewer tokens than the vocabulary.
"""

from __future__ import annotations

import collections
import os
from typing import Optional

import torch

from .task_cross_entropy import HAS_TRITON, TorchRowOps, TritonRowOps

BACKENDS = ("auto", "triton", "torch")

# Logits elements per block (chunk_tokens × chunk_vocab). CPU: 16M fp32 = 64 MiB, large
# enough for full-speed matmuls; CUDA: 64M bf16 = 128 MiB, half of Liger's chunk at
# H=4096, V=128256, N=32768, with matmuls of ≥ 0.5 TFLOP per block.
_BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}
_DEFAULT_CHUNK_TOKENS = {"cpu": 4096, "cuda": 8192}

# grad_scale_hint: the upstream g must equal c · hint to this relative tolerance for the
# kept gradients to be used (their error is then ≤ 1e-6 relative, far below fp32's 1e-5).
_HINT_RTOL = 1e-6

# The hinted forward stores D with its per-token scales normalised so that the largest is
# this power of two: |D| ≤ ~1 · _KEPT_RANGE, far below fp16's 65504, while softmax entries
# down to 6e-5 / _KEPT_RANGE ≈ 6e-8 stay normal fp16 numbers (bf16/fp32: no effect).
_KEPT_RANGE = 2.0 ** 10

# Debug switch: "1" makes the backward check g = c · hint on the host (one sync per call) and
# recompute exactly when it does not hold. Off, the check runs on the device and a mismatch
# turns the gradients into NaN (never a silently wrong gradient, no sync).
HINT_CHECK_ENV = "MEGAMT_CHECK_HINT"

# How often each backward path ran in this process ("hinted": kept gradients × c;
# "recompute": logits recomputed; "hint_mismatch": MEGAMT_CHECK_HINT=1 found g ≠ c · hint and
# recomputed). For tests and profiling; never reset by the library.
backward_path_counts: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

_MM_OUT_DTYPE_OK: dict = {}

# Temporaries of the low-precision accumulation ``out += a @ b`` (fp32 ``out``) hold at most
# this many elements each: never a second ``[V, H]`` in fp32. CUDA: 16M (64 MiB; at H=8192,
# 2048-row GEMMs of >= 0.5 TFLOP per 2048-token block); CPU: 4M (16 MiB; BLAS packs a copy of
# each upcast operand too, so the slab is paid about twice).
_SLAB_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}


def _has_fp32_output_gemm(a: torch.Tensor) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for ``a``'s device and dtype
    (CUDA with torch >= 2.8); probed once per dtype on a 1×1 product."""
    if not a.is_cuda:
        return False
    ok = _MM_OUT_DTYPE_OK.get(a.dtype)
    if ok is None:
        one = torch.ones(1, 1, dtype=a.dtype, device=a.device)
        try:
            torch.mm(one, one, out_dtype=torch.float32)
            ok = True
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE_OK[a.dtype] = ok
    return ok


def _gemm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bf16/fp16 operands, accumulated and returned in fp32 by the GEMM (CUDA)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` in place, ``out`` fp32, products accumulated in fp32.

    fp32 operands: one ``addmm_``. bf16/fp16 operands never make an fp32 temporary the size of
    ``out`` or of an operand (at ``out = grad_weight`` that would be a second fp32 ``[V, H]``
    per token block, 2 GiB at V=128k, H=4096): on CUDA the fp32-output GEMM runs on slabs
    of ``out``'s rows (torch's ``addmm`` with ``out_dtype`` wants its added input in the
    operands' dtype, so it cannot accumulate into an fp32 ``out`` itself); elsewhere (the
    CPU, or torch without ``out_dtype``) the operands are upcast slab by slab along the
    contraction and added with ``addmm_``. Each temporary has at most ``_SLAB_ELEMENTS``
    elements.
    """
    if a.dtype == torch.float32:
        out.addmm_(a, b)
        return
    m, k = a.shape
    n = b.shape[1]
    slab = _SLAB_ELEMENTS["cuda" if a.is_cuda else "cpu"]
    if _has_fp32_output_gemm(a):
        rows = max(1, slab // max(n, 1))
        for r0 in range(0, m, rows):
            out[r0:r0 + rows].add_(_gemm_fp32_out(a[r0:r0 + rows], b))
        return
    step = max(1, slab // max(m, n, 1))
    for k0 in range(0, k, step):
        out.addmm_(a[:, k0:k0 + step].float(), b[k0:k0 + step].float())


def _linear_block(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], buf: torch.Tensor) -> torch.Tensor:
    """Logits block ``h @ wᵀ (+ b)`` in the input dtype, row-major, written into ``buf``.

    One buffer serves every block: on the CPU a fresh 64 MiB tensor per block would be
    returned to the OS on free and page-faulted in again each time.
    """
    out = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _rows(x: torch.Tensor, index: Optional[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the active rows of ``x`` (all rows when ``index`` is None)."""
    if index is None:
        return x[start:stop]
    return x.index_select(0, index[start:stop])


def _chunk_sizes(device: torch.device, n_rows: int, vocab: int, chunk_tokens: Optional[int]):
    kind = "cuda" if device.type == "cuda" else "cpu"
    tokens = chunk_tokens or _DEFAULT_CHUNK_TOKENS[kind]
    tokens = max(1, min(tokens, max(n_rows, 1)))
    per_block = _BLOCK_ELEMENTS[kind] // tokens
    vocab_block = max(128, per_block // 128 * 128)
    return tokens, min(vocab_block, vocab)


def _validate(hidden, weight, labels, task_ids, num_tasks, bias, ignore_index, label_smoothing, z_loss, backend):
    where = "fused_linear_task_cross_entropy"
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend={backend!r}; expected one of {BACKENDS}")
    if weight.numel() == 0:
        raise ValueError(
            f"{where}: weight has shape {tuple(weight.shape)}. Under DeepSpeed ZeRO-3 the LM head "
            "is a 0-size shard outside its module's forward: gather it "
            "(deepspeed.zero.GatheredParameters) inside the engine's forward before this call"
        )
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{where}: hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)} (flatten batch and sequence dims first: hidden.reshape(-1, H))"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden is [N, {hidden.shape[1]}] but weight is [V, {weight.shape[1]}]")
    n = hidden.shape[0]
    if labels.shape != (n,) or task_ids.shape != (n,):
        raise ValueError(
            f"{where}: labels and task_ids must be [N={n}]; got {tuple(labels.shape)} and {tuple(task_ids.shape)}"
        )
    if labels.dtype.is_floating_point or task_ids.dtype.is_floating_point:
        raise TypeError(f"{where}: labels and task_ids must be integer tensors")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(
            f"{where}: hidden ({hidden.dtype}), weight ({weight.dtype})"
            + (f" and bias ({bias.dtype})" if bias is not None else "")
            + " must share one dtype; cast hidden to the LM head's dtype"
        )
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"{where}: hidden must be floating point, got {hidden.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{where}: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, weight, labels, task_ids) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{where}: num_tasks must be an int >= 1, got {num_tasks!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"{where}: z_loss must be >= 0, got {z_loss}")


def _active_tokens(labels, task_ids, ignore_index, num_tasks, vocab):
    """Indices of non-ignored tokens (None when all are), their labels and task ids.

    Checks, with one host sync, that every non-ignored token has a label in [0, V) and a
    task id in [0, T); ignored tokens may carry anything (task id -1 on padding).
    """
    valid = labels != ignore_index
    index = valid.nonzero().squeeze(1)  # syncs: the active count sizes every block
    if index.numel() == labels.numel():
        index = None
        labels_v, tasks_v = labels.long(), task_ids.long()
    else:
        labels_v, tasks_v = labels[index].long(), task_ids[index].long()
    bad_label = (labels_v < 0) | (labels_v >= vocab)
    bad_task = (tasks_v < 0) | (tasks_v >= num_tasks)
    if bool((bad_label | bad_task).any()):
        pos = int((bad_label | bad_task).nonzero()[0, 0])
        tok = pos if index is None else int(index[pos])
        raise ValueError(
            f"fused_linear_task_cross_entropy: token {tok} has label {int(labels_v[pos])} and task id "
            f"{int(tasks_v[pos])}; non-ignored tokens need a label in [0, {vocab}) and a task id in "
            f"[0, {num_tasks}) (mark tokens without a target with ignore_index={ignore_index})"
        )
    return index, labels_v.contiguous(), tasks_v.contiguous()


# --------------------------------------------------------------------------------------
# Chunk driver (shared by both backends; the row ops differ)
# --------------------------------------------------------------------------------------


def _forward(ops, hidden, weight, bias, index, labels_v, tasks_v, num_tasks, label_smoothing, z_loss, chunk_tokens):
    device = hidden.device
    n_active = labels_v.numel()
    vocab = weight.shape[0]
    loss_sum = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    count = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    m = torch.full((n_active,), float("-inf"), **f32)
    s = torch.zeros(n_active, **f32)
    target_logit = torch.zeros(n_active, **f32)
    row_sum = torch.zeros(n_active, **f32) if label_smoothing > 0 else None
    if n_active == 0:
        return loss_sum, count, m
    nt, nv = _chunk_sizes(device, n_active, vocab, chunk_tokens)
    buf = torch.empty(nt * nv, dtype=hidden.dtype, device=device)
    for v0 in range(0, vocab, nv):
        v1 = min(v0 + nv, vocab)
        w_blk = weight[v0:v1]
        b_blk = bias[v0:v1] if bias is not None else None
        for t0 in range(0, n_active, nt):
            t1 = min(t0 + nt, n_active)
            logits = _linear_block(_rows(hidden, index, t0, t1), w_blk, b_blk, buf)
            ops.lse_update(
                logits, v0, labels_v[t0:t1], m[t0:t1], s[t0:t1], target_logit[t0:t1],
                row_sum[t0:t1] if row_sum is not None else None,
            )
            del logits
    lse = ops.finalize(m, s, target_logit, row_sum, tasks_v, loss_sum, count, vocab, label_smoothing, z_loss)
    return loss_sum, count, lse


def _hinted_token_block(device: torch.device, n_active: int, vocab: int, chunk_tokens: Optional[int]) -> int:
    """Tokens per block of the hinted forward (whole vocabulary rows): ``chunk_tokens`` when
    given (``model.loss_chunk_tokens``), else as many as fill one default block."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    tokens = chunk_tokens or max(1, _BLOCK_ELEMENTS[kind] // vocab)
    return max(1, min(tokens, n_active))


def _forward_hinted(ops, hidden, weight, bias, index, labels_v, tasks_v, num_tasks, label_smoothing, z_loss,
                    chunk_tokens, hint, need_hidden, need_weight, need_bias):
    """Loss and the fp32 gradients for the per-token scale ``hint[task_i]`` (see the design note).

    Returns ``loss_sum, count, lse, kept, unit``: ``kept = (grad_hidden_rows, grad_weight,
    grad_bias)``, fp32, ``None`` where not needed, ``grad_hidden_rows`` ``[N_active, H]``
    (``[N, H]`` when every token is active), computed for the scale ``hint[task_i] / unit``;
    ``unit`` (a 0-dim fp32 tensor, no host sync) is the largest ``|hint|`` over this call's
    tokens divided by ``_KEPT_RANGE``, so the kept gradients times ``unit`` are those of ``hint``.
    """
    device, dtype = hidden.device, hidden.dtype
    n_active = labels_v.numel()
    vocab, h_dim = weight.shape
    f32 = dict(dtype=torch.float32, device=device)
    loss_sum = torch.zeros(num_tasks, **f32)
    count = torch.zeros(num_tasks, **f32)
    lse = torch.empty(n_active, **f32)
    gh = torch.zeros(n_active, h_dim, **f32) if need_hidden else None
    gw = torch.zeros(vocab, h_dim, **f32) if need_weight else None
    gb = torch.zeros(vocab, **f32) if need_bias else None
    unit = torch.ones((), **f32)
    if n_active == 0:
        return loss_sum, count, lse, (gh, gw, gb), unit
    scale = hint.to(device=device, dtype=torch.float32)[tasks_v]  # hint[task_i]
    # D = scale_i · ∂loss_i/∂x is stored in the input dtype before the matmuls: at the
    # trainer's hint (w_t / N_t ≈ 1e-5) times softmax entries (≈ 1/V) it would underflow in
    # fp16. Normalise the scales so the largest is _KEPT_RANGE; ``unit`` undoes it in backward.
    biggest = scale.abs().amax()
    unit = torch.where(biggest > 0, biggest / _KEPT_RANGE, torch.ones_like(biggest))
    scale = scale / unit
    nt = _hinted_token_block(device, n_active, vocab, chunk_tokens)
    buf = torch.empty(nt * vocab, dtype=dtype, device=device)
    for t0 in range(0, n_active, nt):
        t1 = min(t0 + nt, n_active)
        h_blk = _rows(hidden, index, t0, t1)
        d = _linear_block(h_blk, weight, bias, buf)
        d = ops.loss_and_grad_(d, labels_v[t0:t1], tasks_v[t0:t1], scale[t0:t1], lse[t0:t1], loss_sum, count,
                               label_smoothing, z_loss)
        if need_hidden:
            _add_mm_(gh[t0:t1], d, weight)
        if need_weight:
            _add_mm_(gw, d.t(), h_blk)  # in place: no second fp32 [V, H]
        if need_bias:
            gb += d.sum(0, dtype=torch.float32)
        del d
    return loss_sum, count, lse, (gh, gw, gb), unit


def hint_check_enabled() -> bool:
    """Whether the backward checks ``g = c · hint`` on the host (``MEGAMT_CHECK_HINT=1``)."""
    return os.environ.get(HINT_CHECK_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _hint_factor(grad_loss_sum, hint, count):
    """``(c, ok)`` as 0-dim device tensors, without a host sync: ``g ≈ c · hint`` on the tasks
    that have tokens (relative tolerance ``_HINT_RTOL``), ``c = 0`` when none has."""
    g = grad_loss_sum.float()
    h = hint.to(g.device, torch.float32)
    present = count > 0
    k = torch.where(present, h.abs(), torch.full_like(h, -1.0)).argmax().view(1)
    hk, gk = h.gather(0, k)[0], g.gather(0, k)[0]  # gather: indexing by a tensor would sync
    c = torch.where(hk != 0, gk / torch.where(hk != 0, hk, torch.ones_like(hk)), torch.zeros_like(hk))
    close = (g - c * h).abs() <= _HINT_RTOL * (c * h).abs()
    ok = torch.where(present, close, torch.ones_like(close)).all() & torch.isfinite(c)
    return c, ok


def _scale_kept(kept, factor, hidden, weight, bias, index):
    """The kept fp32 gradients times ``factor`` (a 0-dim tensor), in the inputs' dtypes and
    shapes. Scaled in place, then converted: ``torch.mul(..., out=<bf16>)`` would compute into
    a hidden fp32 temporary of the full size (a second fp32 ``[V, H]``) before the cast."""
    gh, gw, gb = kept

    def scaled(g, dtype):
        g.mul_(factor)
        return g if dtype == torch.float32 else g.to(dtype)

    n, h_dim = hidden.shape
    if gh is not None:
        if index is None and gh.shape[0] == n:
            gh = scaled(gh, hidden.dtype)
        else:
            out = torch.zeros(n, h_dim, dtype=hidden.dtype, device=hidden.device)
            if gh.shape[0]:
                out.index_copy_(0, index, scaled(gh, hidden.dtype))
            gh = out
    if gw is not None:
        gw = scaled(gw, weight.dtype)
    if gb is not None:
        gb = scaled(gb, bias.dtype)
    return gh, gw, gb


def _backward(ops, grad_loss_sum, hidden, weight, bias, index, labels_v, tasks_v, lse,
              label_smoothing, z_loss, chunk_tokens, need_hidden, need_weight, need_bias):
    device, dtype = hidden.device, hidden.dtype
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    scale = grad_loss_sum.float()[tasks_v]  # c_i = g[task_i]
    # Rows with c_i = 0 (e.g. tasks whose loss weight is 0) add nothing: skip them.
    keep = (scale != 0).nonzero().squeeze(1)
    if keep.numel() != scale.numel():
        index = keep if index is None else index[keep]
        labels_v, tasks_v, lse, scale = labels_v[keep], tasks_v[keep], lse[keep], scale[keep]
    n_active = scale.numel()

    grad_hidden = grad_weight = grad_bias = None
    if need_weight:
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if need_bias:
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device)
    gh_acc = None
    if need_hidden:
        if index is None and dtype == torch.float32 and n_active == n:
            gh_acc = grad_hidden = torch.zeros(n, h_dim, dtype=torch.float32, device=device)
        else:
            gh_acc = torch.zeros(n_active, h_dim, dtype=torch.float32, device=device)
    if n_active > 0:
        nt, nv = _chunk_sizes(device, n_active, vocab, chunk_tokens)
        buf = torch.empty(nt * nv, dtype=dtype, device=device)
        for v0 in range(0, vocab, nv):
            v1 = min(v0 + nv, vocab)
            w_blk = weight[v0:v1]
            b_blk = bias[v0:v1] if bias is not None else None
            gw_acc = None
            if need_weight:  # fp32 rows of this vocabulary block, finished after the token loop
                gw_acc = grad_weight[v0:v1] if dtype == torch.float32 else torch.zeros(
                    v1 - v0, h_dim, dtype=torch.float32, device=device)
            for t0 in range(0, n_active, nt):
                t1 = min(t0 + nt, n_active)
                h_blk = _rows(hidden, index, t0, t1)
                d = _linear_block(h_blk, w_blk, b_blk, buf)
                d = ops.logits_grad_(d, v0, labels_v[t0:t1], lse[t0:t1], scale[t0:t1],
                                     vocab, label_smoothing, z_loss)
                if need_hidden:
                    _add_mm_(gh_acc[t0:t1], d, w_blk)
                if need_weight:
                    _add_mm_(gw_acc, d.t(), h_blk)
                if need_bias:
                    grad_bias[v0:v1] += d.sum(0, dtype=torch.float32)
                del d
            if need_weight and dtype != torch.float32:
                grad_weight[v0:v1] = gw_acc
    if need_hidden and grad_hidden is None:
        grad_hidden = torch.zeros(n, h_dim, dtype=dtype, device=device)
        if n_active:
            if index is None:
                grad_hidden.copy_(gh_acc)
            else:
                grad_hidden.index_copy_(0, index, gh_acc.to(dtype))
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


# --------------------------------------------------------------------------------------
# Layer 3: autograd.Function
# --------------------------------------------------------------------------------------


class FusedLinearTaskCrossEntropyFunction(torch.autograd.Function):
    """(hidden, weight, bias) → (loss_sum [T], count [T]); backward takes any g = ∂/∂loss_sum."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, num_tasks, ignore_index,
                label_smoothing, z_loss, use_triton, chunk_tokens, grad_scale_hint, hint_needs):
        ops = TritonRowOps if use_triton else TorchRowOps
        index, labels_v, tasks_v = _active_tokens(labels, task_ids, ignore_index, num_tasks, weight.shape[0])
        ctx.kept = None
        # autocast would turn the block matmuls into bf16 behind our back: dtypes are explicit here
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if grad_scale_hint is not None and any(hint_needs):
                loss_sum, count, lse, ctx.kept, ctx.unit = _forward_hinted(
                    ops, hidden, weight, bias, index, labels_v, tasks_v, num_tasks, label_smoothing, z_loss,
                    chunk_tokens, grad_scale_hint, *hint_needs)
                ctx.hint, ctx.count = grad_scale_hint, count.clone()
                ctx.check_hint = hint_check_enabled()
            else:
                loss_sum, count, lse = _forward(ops, hidden, weight, bias, index, labels_v, tasks_v, num_tasks,
                                                label_smoothing, z_loss, chunk_tokens)
        ctx.save_for_backward(hidden, weight, bias, index, labels_v, tasks_v, lse)
        ctx.config = (label_smoothing, z_loss, use_triton, chunk_tokens)
        ctx.mark_non_differentiable(count)
        return loss_sum, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss_sum, _grad_count):
        hidden, weight, bias, index, labels_v, tasks_v, lse = ctx.saved_tensors
        none = (None,) * 10
        if ctx.kept is not None:
            kept, ctx.kept = ctx.kept, None  # used at most once: returned tensors may become .grad
            c, ok = _hint_factor(grad_loss_sum, ctx.hint, ctx.count)
            if not ctx.check_hint:  # no host sync: a g that is not c · hint gives NaN gradients
                use_kept, factor = True, torch.where(ok, c * ctx.unit, torch.full_like(c, float("nan")))
            elif bool(ok):  # MEGAMT_CHECK_HINT=1: checked on the host
                use_kept, factor = True, c * ctx.unit
            else:
                use_kept, factor = False, None
                backward_path_counts["hint_mismatch"] += 1
            if use_kept:
                backward_path_counts["hinted"] += 1
                grads = _scale_kept(kept, factor, hidden, weight, bias, index)
                needs = ctx.needs_input_grad[:3]
                return (*(g if need else None for g, need in zip(grads, needs)), *none)
            del kept
        if weight.numel() == 0:
            raise RuntimeError(
                "fused_linear_task_cross_entropy backward: the LM head weight is an empty ZeRO-3 shard "
                "now; call the loss inside the module whose forward gathered it, so DeepSpeed's "
                "backward hooks gather it again (Liger-Kernel #1048, TRL #3368)"
            )
        backward_path_counts["recompute"] += 1
        label_smoothing, z_loss, use_triton, chunk_tokens = ctx.config
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            grads = _backward(TritonRowOps if use_triton else TorchRowOps, grad_loss_sum, hidden, weight, bias,
                              index, labels_v, tasks_v, lse, label_smoothing, z_loss, chunk_tokens,
                              need_hidden, need_weight, need_bias and bias is not None)
        return (*grads, *none)


# --------------------------------------------------------------------------------------
# Layer 4: functional wrapper
# --------------------------------------------------------------------------------------


def fused_linear_task_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str = "auto",
    chunk_tokens: Optional[int] = None,
    grad_scale_hint: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task summed cross-entropy of ``hidden @ weightᵀ (+ bias)`` without the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states (any strides; fp32, bf16 or fp16).
        weight: ``[V, H]`` LM head (may be the tied input embedding), same dtype as hidden.
        labels: ``[N]`` target ids; ``ignore_index`` marks tokens without a loss.
        task_ids: ``[N]`` task of each token, in ``[0, num_tasks)`` for non-ignored tokens
            (ignored tokens may carry anything, e.g. -1 on padding).
        num_tasks: T.
        bias: optional ``[V]``.
        label_smoothing: as ``F.cross_entropy``'s (uniform mixing over the V classes).
        z_loss: adds ``z_loss * logsumexp(logits)**2`` per non-ignored token (PaLM).
        backend: ``"triton"`` (Triton row kernels; CUDA, or CPU under TRITON_INTERPRET=1),
            ``"torch"`` (chunked plain torch, the CPU path) or ``"auto"`` (triton on CUDA
            when importable, torch otherwise).
        chunk_tokens: active tokens per block (default 4096 on CPU, 8192 on CUDA); the
            vocabulary block is sized so one logits block holds 16M (CPU) / 64M (CUDA)
            elements. The hinted forward's blocks hold whole vocabulary rows:
            ``[chunk_tokens, V]`` (default ``16M or 64M // V`` tokens).
        grad_scale_hint: optional ``[T]``, the expected upstream gradient on ``loss_sum`` up
            to one scalar (in training ``w_t / global_count_t``). When given and a gradient
            is needed, the forward also computes the gradients for ``g = hint`` (3 matmuls in
            all instead of 4); the backward returns them times ``c`` when the real ``g``
            equals ``c · hint`` on the tasks that have tokens. Otherwise the gradients are
            NaN (the check stays on the device: no host sync), or, with the debug switch
            ``MEGAMT_CHECK_HINT=1``, the backward checks on the host and recomputes exactly.
            Costs fp32 ``[V, H]`` + ``[N, H]`` of memory from forward to backward.

    Returns:
        ``(loss_sum [T], count [T])``, fp32. ``loss_sum`` is differentiable w.r.t. hidden,
        weight and bias for any upstream gradient (a weight per task); gradients are
        accumulated in fp32 and returned in the input dtype. ``count`` is not differentiable.
    """
    _validate(hidden, weight, labels, task_ids, num_tasks, bias, ignore_index, label_smoothing, z_loss, backend)
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"fused_linear_task_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    if backend == "auto":
        use_triton = HAS_TRITON and hidden.is_cuda
    elif backend == "triton":
        if not HAS_TRITON:
            raise ImportError("fused_linear_task_cross_entropy: backend='triton' needs `pip install triton`")
        use_triton = True
    else:
        use_triton = False
    hint_needs = (False, False, False)
    if grad_scale_hint is not None:
        if grad_scale_hint.shape != (num_tasks,) or not grad_scale_hint.dtype.is_floating_point:
            raise ValueError(
                f"fused_linear_task_cross_entropy: grad_scale_hint must be a float tensor of shape "
                f"[num_tasks={num_tasks}], got {grad_scale_hint.dtype} {tuple(grad_scale_hint.shape)}"
            )
        grad_scale_hint = grad_scale_hint.detach()
        if torch.is_grad_enabled():  # the kept gradients are only worth computing when a backward follows
            hint_needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return FusedLinearTaskCrossEntropyFunction.apply(
        hidden, weight, bias, labels, task_ids, num_tasks, ignore_index,
        float(label_smoothing), float(z_loss), use_triton, chunk_tokens, grad_scale_hint, hint_needs,
    )
