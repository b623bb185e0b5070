"""Row-wise pieces of the fused per-task cross-entropy, on one chunk of logits.

The chunk driver in ``fused_linear_cross_entropy.py`` computes a ``[n, v]`` block of
logits (``n`` active tokens × ``v`` vocabulary entries starting at ``v_start``) with a
matmul, then calls three row-wise operations on it. Each exists twice with the same
signature: a Triton kernel behind a host function (``TritonRowOps``) and plain torch
(``TorchRowOps``, the CPU path):

1. ``lse_update``: fold the block into each token's running log-sum-exp
   (``m`` = running max, ``s`` = sum of ``exp(x - m)``), pick up the target's logit
   ``x_y`` when the target lies in the block, and add the row sum ``Σ_j x_j`` (only
   needed for label smoothing). Online softmax across vocabulary blocks:
   ``M = max(m, max_j x_j)``, ``s ← s·exp(m − M) + Σ_j exp(x_j − M)``, ``m ← M``.
2. ``finalize``: ``lse = m + log s`` and the per-token loss (see below), summed per task
   into ``loss_sum[T]`` and ``count[T]``.
3. ``logits_grad_``: overwrite the block with ``∂(Σ_t g_t L_t)/∂x`` for the tokens'
   per-token scale ``c_i = g[task_i]``.

Math (ε = label_smoothing, z = z_loss, V = vocabulary size, p = softmax(x)):
  torch's label smoothing mixes the one-hot target with the uniform distribution,
    loss_i = (1−ε)(lse_i − x_{i,y}) + (ε/V) Σ_j (lse_i − x_ij) + z·lse_i²
           = lse_i − (1−ε) x_{i,y} − (ε/V) Σ_j x_ij + z·lse_i²
  and, since ∂lse_i/∂x_ij = p_ij,
    ∂loss_i/∂x_ij = p_ij (1 + 2 z lse_i) − (1−ε) δ_{j,y_i} − ε/V.
  With L_t = Σ_{i ∈ t} loss_i and an upstream gradient g_t per task,
    ∂(Σ_t g_t L_t)/∂x_ij = c_i · ∂loss_i/∂x_ij,   c_i = g_{task_i},
  a per-token (row) scale that the kernel folds in *before* the driver's matmuls sum
  over tokens (grad_weight = Dᵀ·hidden), which is why it cannot be applied afterwards.

4. ``loss_and_grad_`` (the hinted forward, see ``fused_linear_cross_entropy.py``): on a
   block that holds *whole* rows (all V columns), ``lse`` is known from the block alone,
   so ops 1–3 run on it in one go: per-task loss into ``loss_sum``/``count``, ``lse``
   stored, and the block overwritten with ``D`` for a per-token scale ``c_i`` given up
   front. The torch version makes one ``exp`` pass: with ``m_i = max_j x_ij`` and
   ``e_ij = exp(x_ij − m_i)``, ``s_i = Σ_j e_ij``, ``lse_i = m_i + log s_i`` and
   ``p_ij = e_ij / s_i``, so ``D_ij = e_ij · c_i (1 + 2 z lse_i) / s_i − c_i ε/V − c_i (1−ε) δ_{j,y_i}``.
   The Triton version chains the three kernels above (one more read of the block).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch path does not need triton
    triton = None
    tl = None
    HAS_TRITON = False


# --------------------------------------------------------------------------------------
# Layer 1: Triton kernels
# --------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _lse_update_kernel(
        logits_ptr,
        logits_row_stride,
        labels_ptr,
        m_ptr,
        s_ptr,
        target_logit_ptr,
        row_sum_ptr,
        n_cols,
        v_start,
        HAS_SMOOTHING: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per token row: fold a [v] block of logits into the running lse."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride  # int64: row * stride can exceed 2**31

        blk_max = float("-inf")
        blk_sum = 0.0
        row_sum = 0.0
        for off in range(0, n_cols, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(blk_max, tl.max(x, axis=0))
            # every block holds at least one real column, so new_max is finite
            blk_sum = blk_sum * tl.exp(blk_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            blk_max = new_max
            if HAS_SMOOTHING:
                row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)

        m_old = tl.load(m_ptr + row)
        s_old = tl.load(s_ptr + row)
        m_new = tl.maximum(m_old, blk_max)
        # m_old is -inf before the first block: exp(-inf) = 0 drops the empty state
        s_new = s_old * tl.exp(m_old - m_new) + blk_sum * tl.exp(blk_max - m_new)
        tl.store(m_ptr + row, m_new)
        tl.store(s_ptr + row, s_new)

        label = tl.load(labels_ptr + row).to(tl.int64)
        local = label - v_start
        in_block = (local >= 0) & (local < n_cols)
        x_target = tl.load(row_ptr + tl.where(in_block, local, 0)).to(tl.float32)
        old_target = tl.load(target_logit_ptr + row)
        tl.store(target_logit_ptr + row, old_target + tl.where(in_block, x_target, 0.0))
        if HAS_SMOOTHING:
            tl.store(row_sum_ptr + row, tl.load(row_sum_ptr + row) + row_sum)

    @triton.jit
    def _task_loss_kernel(
        m_ptr,
        s_ptr,
        target_logit_ptr,
        row_sum_ptr,
        tasks_ptr,
        lse_ptr,
        loss_sum_ptr,
        count_ptr,
        n_rows,
        n_classes,
        label_smoothing,
        z_loss,
        HAS_SMOOTHING: tl.constexpr,
        HAS_Z_LOSS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Per-token loss from the finished lse state, summed per task with atomics."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_rows
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        s = tl.load(s_ptr + offs, mask=mask, other=1.0)
        lse = m + tl.log(s)
        loss = lse - (1.0 - label_smoothing) * tl.load(target_logit_ptr + offs, mask=mask, other=0.0)
        if HAS_SMOOTHING:
            loss -= (label_smoothing / n_classes) * tl.load(row_sum_ptr + offs, mask=mask, other=0.0)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(lse_ptr + offs, lse, mask=mask)
        task = tl.load(tasks_ptr + offs, mask=mask, other=0)
        tl.atomic_add(loss_sum_ptr + task, loss, mask=mask)
        tl.atomic_add(count_ptr + task, tl.where(mask, 1.0, 0.0), mask=mask)

    @triton.jit
    def _logits_grad_kernel(
        logits_ptr,
        logits_row_stride,
        labels_ptr,
        lse_ptr,
        scale_ptr,
        n_cols,
        v_start,
        n_classes,
        label_smoothing,
        z_loss,
        HAS_SMOOTHING: tl.constexpr,
        HAS_Z_LOSS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per token row: logits block → c_i·(p(1+2z·lse) − (1−ε)δ_y − ε/V), in place."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_row_stride
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr + row)
        p_coef = scale
        if HAS_Z_LOSS:
            p_coef = scale * (1.0 + 2.0 * z_loss * lse)
        uniform = scale * label_smoothing / n_classes
        target = scale * (1.0 - label_smoothing)
        local = tl.load(labels_ptr + row).to(tl.int64) - v_start
        for off in range(0, n_cols, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.exp(x - lse) * p_coef
            if HAS_SMOOTHING:
                d -= uniform
            d = tl.where(cols == local, d - target, d)
            tl.store(row_ptr + cols, d.to(logits_ptr.dtype.element_ty), mask=mask)


def _runnable(kernel, device: torch.device):
    """The kernel, after checking that it can run on ``device``.

    ``triton.jit`` picks compiled or interpreted mode from ``TRITON_INTERPRET`` when a
    function is decorated, and Triton's own library (``tl.max``, ``tl.sum``) is decorated
    when ``triton`` is first imported: the mode is fixed per process at that import.
    """
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            "backend='triton' on a CPU tensor needs the Triton interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before triton is first imported (tests only; it is slow), "
            "or use backend='torch' on the CPU"
        )
    return kernel


# --------------------------------------------------------------------------------------
# Layer 2: host functions (validation, contiguity, grid, constexpr flags)
# --------------------------------------------------------------------------------------


def _block_v(n_cols: int) -> int:
    # At most 8192 elements per loop step: larger tiles spill registers, smaller ones
    # loop more often (Liger and Triton's softmax tutorial use 32768 with 32 warps).
    return min(8192, triton.next_power_of_2(max(n_cols, 16)))


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


class TritonRowOps:
    """Row-wise ops on a logits chunk, as Triton kernels."""

    @staticmethod
    def lse_update(logits, v_start, labels, m, s, target_logit, row_sum):
        n_rows, n_cols = logits.shape
        if n_rows == 0:
            return
        assert logits.stride(1) == 1, "logits chunk must be row-major"
        for t in (labels, m, s, target_logit):
            assert t.is_contiguous()
        grid = (n_rows,)
        _runnable(_lse_update_kernel, logits.device)[grid](
            logits,
            logits.stride(0),
            labels,
            m,
            s,
            target_logit,
            row_sum if row_sum is not None else m,  # never read without smoothing
            n_cols,
            v_start,
            HAS_SMOOTHING=row_sum is not None,
            BLOCK_V=_block_v(n_cols),
            num_warps=_num_warps(_block_v(n_cols)),
        )

    @staticmethod
    def finalize(m, s, target_logit, row_sum, tasks, loss_sum, count, n_classes, label_smoothing, z_loss):
        n_rows = m.numel()
        lse = torch.empty_like(m)
        if n_rows == 0:
            return lse
        block = 1024
        grid = (triton.cdiv(n_rows, block),)
        _runnable(_task_loss_kernel, m.device)[grid](
            m,
            s,
            target_logit,
            row_sum if row_sum is not None else m,
            tasks,
            lse,
            loss_sum,
            count,
            n_rows,
            n_classes,
            float(label_smoothing),
            float(z_loss),
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_Z_LOSS=z_loss > 0,
            BLOCK=block,
        )
        return lse

    @staticmethod
    def logits_grad_(logits, v_start, labels, lse, scale, n_classes, label_smoothing, z_loss):
        n_rows, n_cols = logits.shape
        if n_rows == 0:
            return logits
        assert logits.stride(1) == 1, "logits chunk must be row-major"
        _runnable(_logits_grad_kernel, logits.device)[(n_rows,)](
            logits,
            logits.stride(0),
            labels,
            lse,
            scale,
            n_cols,
            v_start,
            n_classes,
            float(label_smoothing),
            float(z_loss),
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_Z_LOSS=z_loss > 0,
            BLOCK_V=_block_v(n_cols),
            num_warps=_num_warps(_block_v(n_cols)),
        )
        return logits

    @staticmethod
    def loss_and_grad_(logits, labels, tasks, scale, lse_out, loss_sum, count, label_smoothing, z_loss):
        """Whole-row block: loss per task, ``lse_out``, and the block → ``D`` (ops 1–3 chained)."""
        n_rows, n_classes = logits.shape
        f32 = dict(dtype=torch.float32, device=logits.device)
        m = torch.full((n_rows,), float("-inf"), **f32)
        s = torch.zeros(n_rows, **f32)
        target_logit = torch.zeros(n_rows, **f32)
        row_sum = torch.zeros(n_rows, **f32) if label_smoothing > 0 else None
        TritonRowOps.lse_update(logits, 0, labels, m, s, target_logit, row_sum)
        lse = TritonRowOps.finalize(m, s, target_logit, row_sum, tasks, loss_sum, count, n_classes,
                                    label_smoothing, z_loss)
        lse_out.copy_(lse)
        return TritonRowOps.logits_grad_(logits, 0, labels, lse, scale, n_classes, label_smoothing, z_loss)


class TorchRowOps:
    """The same row-wise ops in plain torch (the CPU path). Work in place where possible."""

    @staticmethod
    def lse_update(logits, v_start, labels, m, s, target_logit, row_sum):
        n_cols = logits.shape[1]
        x = logits.float()  # the chunk is ours: an fp32 chunk is reused in place below
        local = labels - v_start
        in_block = (local >= 0) & (local < n_cols)
        picked = x.gather(1, local.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
        target_logit.add_(torch.where(in_block, picked, torch.zeros_like(picked)))
        if row_sum is not None:
            row_sum.add_(x.sum(1))
        m_new = torch.maximum(m, x.amax(1))
        blk_sum = x.sub_(m_new.unsqueeze(1)).exp_().sum(1)
        s.mul_(torch.exp(m - m_new)).add_(blk_sum)
        m.copy_(m_new)

    @staticmethod
    def accumulate_loss_(lse, target_logit, row_sum, tasks, loss_sum, count, n_classes, label_smoothing, z_loss):
        """Per-token loss from its log-sum-exp, added into its task's ``loss_sum`` and ``count``:
        ``lse - (1-eps) x_y - (eps/V) sum_j x_j + z lse^2``."""
        loss = lse - (1.0 - label_smoothing) * target_logit
        if label_smoothing > 0:
            loss -= (label_smoothing / n_classes) * row_sum
        if z_loss > 0:
            loss += z_loss * lse.square()
        loss_sum.index_add_(0, tasks, loss)
        count.add_(torch.bincount(tasks, minlength=count.numel()).to(count.dtype))

    @staticmethod
    def finalize(m, s, target_logit, row_sum, tasks, loss_sum, count, n_classes, label_smoothing, z_loss):
        lse = m + torch.log(s)
        TorchRowOps.accumulate_loss_(lse, target_logit, row_sum, tasks, loss_sum, count, n_classes, label_smoothing,
                                     z_loss)
        return lse

    @staticmethod
    def logits_grad_(logits, v_start, labels, lse, scale, n_classes, label_smoothing, z_loss):
        n_cols = logits.shape[1]
        x = logits.float()
        p_coef = scale * (1.0 + 2.0 * z_loss * lse) if z_loss > 0 else scale
        x.sub_(lse.unsqueeze(1)).exp_().mul_(p_coef.unsqueeze(1))
        if label_smoothing > 0:
            x.sub_((scale * (label_smoothing / n_classes)).unsqueeze(1))
        local = labels - v_start
        in_block = (local >= 0) & (local < n_cols)
        target = torch.where(in_block, scale * (1.0 - label_smoothing), torch.zeros_like(scale))
        x.scatter_add_(1, local.clamp(0, n_cols - 1).unsqueeze(1), -target.unsqueeze(1))
        if x.dtype != logits.dtype:
            logits.copy_(x)
            return logits
        return x

    @staticmethod
    def loss_and_grad_(logits, labels, tasks, scale, lse_out, loss_sum, count, label_smoothing, z_loss):
        """Whole-row block: loss per task, ``lse_out``, and the block → ``D`` with one exp pass."""
        n_classes = logits.shape[1]
        x = logits.float()
        target_logit = x.gather(1, labels.unsqueeze(1)).squeeze(1)
        row_sum = x.sum(1) if label_smoothing > 0 else None
        m = x.amax(1)
        s = x.sub_(m.unsqueeze(1)).exp_().sum(1)  # x now holds e_ij = exp(x_ij - m_i)
        lse = m + torch.log(s)
        TorchRowOps.accumulate_loss_(lse, target_logit, row_sum, tasks, loss_sum, count, n_classes, label_smoothing,
                                     z_loss)
        lse_out.copy_(lse)
        p_coef = scale * (1.0 + 2.0 * z_loss * lse) if z_loss > 0 else scale
        x.mul_((p_coef / s).unsqueeze(1))  # c_i (1 + 2z lse_i) p_ij
        if label_smoothing > 0:
            x.sub_((scale * (label_smoothing / n_classes)).unsqueeze(1))
        x.scatter_add_(1, labels.unsqueeze(1), -(scale * (1.0 - label_smoothing)).unsqueeze(1))
        if x.dtype != logits.dtype:
            logits.copy_(x)
            return logits
        return x
