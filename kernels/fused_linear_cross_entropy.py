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

Loop order: vocabulary blocks outside, token blocks inside. The forward merges each
block into a running (max, sum-exp) per token. In the backward, grad_weight rows of a
vocabulary block are finished after its inner token loop (fp32 accumulator of one block,
``[chunk_vocab, H]``), while grad_hidden accumulates across vocabulary blocks in fp32
``[N_active, H]``, which is smaller than the ``[V, H]`` one the other order would need
whenever a micro-batch has fewer tokens than the vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch

from .task_cross_entropy import HAS_TRITON, TorchRowOps, TritonRowOps

BACKENDS = ("auto", "triton", "torch")

# Logits elements per block (chunk_tokens × chunk_vocab). CPU: 16M fp32 = 64 MiB, large
# enough for full-speed matmuls; CUDA: 64M bf16 = 128 MiB, half of Liger's chunk at
# H=4096, V=128256, N=32768, with matmuls of ≥ 0.5 TFLOP per block.
_BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}
_DEFAULT_CHUNK_TOKENS = {"cpu": 4096, "cuda": 8192}


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

_MM_OUT_DTYPE_OK: dict = {}


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32, also for bf16/fp16 operands."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        ok = _MM_OUT_DTYPE_OK.get(a.dtype)
        if ok is None or ok:
            try:  # torch >= 2.8 on CUDA: fp32 output straight from the GEMM
                out = torch.mm(a, b, out_dtype=torch.float32)
                _MM_OUT_DTYPE_OK[a.dtype] = True
                return out
            except (TypeError, RuntimeError):
                _MM_OUT_DTYPE_OK[a.dtype] = False
        return (a @ b).float()
    # CPU low precision is not a hot path: upcast the (chunk-sized) operands instead.
    return a.float() @ b.float()


def _add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` with ``out`` fp32; in place (no temporary) when the operands are fp32."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
    else:
        out.add_(_mm_fp32(a, b))


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
                    grad_bias[v0:v1] += d.float().sum(0)
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
                label_smoothing, z_loss, use_triton, chunk_tokens):
        ops = TritonRowOps if use_triton else TorchRowOps
        index, labels_v, tasks_v = _active_tokens(labels, task_ids, ignore_index, num_tasks, weight.shape[0])
        # autocast would turn the block matmuls into bf16 behind our back: dtypes are explicit here
        with torch.autocast(device_type=hidden.device.type, enabled=False):
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
        if weight.numel() == 0:
            raise RuntimeError(
                "fused_linear_task_cross_entropy backward: the LM head weight is an empty ZeRO-3 shard "
                "now; call the loss inside the module whose forward gathered it, so DeepSpeed's "
                "backward hooks gather it again (Liger-Kernel #1048, TRL #3368)"
            )
        label_smoothing, z_loss, use_triton, chunk_tokens = ctx.config
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            grads = _backward(TritonRowOps if use_triton else TorchRowOps, grad_loss_sum, hidden, weight, bias,
                              index, labels_v, tasks_v, lse, label_smoothing, z_loss, chunk_tokens,
                              need_hidden, need_weight, need_bias and bias is not None)
        return (*grads, None, None, None, None, None, None, None, None)


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
            elements.

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
    return FusedLinearTaskCrossEntropyFunction.apply(
        hidden, weight, bias, labels, task_ids, num_tasks, ignore_index,
        float(label_smoothing), float(z_loss), use_triton, chunk_tokens,
    )
