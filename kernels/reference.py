"""Plain, unfused references for megamt's kernels (tests and benchmarks only).

Each reference has the same contract as its fused op and is written the obvious
way, with the whole intermediate in memory, so the fused code can be held to it.
Other kernel modules add their own references in their own files.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def reference_linear_task_cross_entropy(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused per-task cross-entropy: materialises the full ``[N, V]`` logits.

    ``F.linear`` → ``F.cross_entropy(reduction="none", label_smoothing=...)`` (in fp32)
    → ``+ z_loss * logsumexp(logits)**2`` (PaLM's z-loss) on non-ignored tokens →
    ``scatter_add`` by task. Returns ``(loss_sum [T], count [T])`` in fp32 (float64 for
    float64 inputs: the tests' ground truth); ``count`` is not differentiable. Ignored tokens may carry any task id (-1 included).
    """
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays fp64
    per_token = F.cross_entropy(
        logits, labels, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    valid = labels != ignore_index
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).square()
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    safe_tasks = torch.where(valid, task_ids, torch.zeros_like(task_ids)).long()
    zeros = torch.zeros(num_tasks, dtype=logits.dtype, device=hidden.device)
    loss_sum = zeros.scatter_add(0, safe_tasks, per_token)
    count = zeros.scatter_add(0, safe_tasks, valid.to(zeros.dtype))
    return loss_sum, count
