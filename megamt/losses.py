"""The per-task loss contract and its global normalisation.

Every model forward returns a :class:`TaskLoss`: for each task ``t`` the *sum* of its
loss terms over the local micro-batch (``loss_sum[t]``) and how many terms there were
(``count[t]``). Sums, not means, so that the trainer can normalise by the **global**
per-task count of the whole optimizer step (all micro-batches, all ranks), all-reduced
once per step before any forward (see :func:`count_targets`):

    mean_t  = (sum over ranks r, micro-batches m of loss_sum[r, m, t]) / N_t
    total   = sum_t w_t * mean_t                        (w_t = 1 here: equal weights)

Each rank's micro-batch contributes ``sum_t w_t * loss_sum[t] / N_t``; the sum of those
contributions over the step is exactly ``total``. See :func:`step_loss` for the factor
that undoes DeepSpeed's own averaging over ranks and accumulation steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class TaskLoss(NamedTuple):
    """Per-task loss of one micro-batch on one rank (both fp32 ``[T]``).

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds a module's output tensors (to
    hook its backward) only inside tuples, lists and dicts.
    """

    loss_sum: torch.Tensor
    """Sum of loss terms (target-token cross-entropy for causal LMs) per task; has grad."""
    count: torch.Tensor
    """Number of loss terms (target tokens) per task; no grad."""

    def plus(self, other: "TaskLoss") -> "TaskLoss":
        return TaskLoss(self.loss_sum + other.loss_sum, self.count + other.count)


def count_targets(labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Target tokens per task of a packed batch, from the labels alone (before any forward).

    Returns fp32 ``[num_tasks]``. The trainer sums this over the step's micro-batches and
    all-reduces it once: that is the global ``N_t`` of the module docstring.
    """
    valid = (labels != ignore_index) & (task_ids >= 0)
    counts = torch.zeros(num_tasks, dtype=torch.float32, device=labels.device)
    return counts.scatter_add_(0, task_ids[valid].long(), torch.ones_like(task_ids[valid], dtype=torch.float32))


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
                       num_tasks: int, *, ignore_index: int = IGNORE_INDEX,
                       label_smoothing: float = 0.0) -> TaskLoss:
    """Plain-torch per-task cross-entropy (the unfused path and the reference).

    ``logits [B, L, V]`` (any float dtype; computed in fp32), ``labels [B, L]`` already
    shifted (``labels[b, t]`` is the token to predict at position ``t``), ``task_ids [B, L]``.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    flat_tasks = task_ids.reshape(-1)
    valid = (flat_labels != ignore_index) & (flat_tasks >= 0)
    # cross_entropy already gives 0 on ignore_index rows; the mask also drops tokens
    # labelled but owned by no task (padding with a stray label would be a packer bug).
    ce = F.cross_entropy(flat_logits, flat_labels, reduction="none", ignore_index=ignore_index,
                         label_smoothing=label_smoothing)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    index = torch.where(valid, flat_tasks, torch.zeros_like(flat_tasks)).long()
    loss_sum = torch.zeros(num_tasks, dtype=torch.float32, device=logits.device).scatter_add(0, index, ce)
    count = torch.zeros(num_tasks, dtype=torch.float32, device=logits.device).scatter_add(
        0, index, valid.float())
    return TaskLoss(loss_sum, count)


def task_cross_entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   task_ids: torch.Tensor, num_tasks: int, *, bias: torch.Tensor | None = None,
                                   fused: bool = True, chunk_tokens: int | None = None,
                                   ignore_index: int = IGNORE_INDEX,
                                   grad_scale_hint: torch.Tensor | None = None) -> TaskLoss:
    """Per-task CE of ``hidden @ weight.T (+ bias)`` without materialising all logits when fused.

    fused: ``megamt.kernels.fused_linear_task_cross_entropy`` (Triton on GPU, chunked torch on
    CPU). Unfused: full logits, then :func:`task_cross_entropy`.
    ``grad_scale_hint`` (fused only): the expected upstream gradient on ``loss_sum`` up to one
    scalar, ``w_t / N_t`` (see :func:`step_loss`); the kernel then computes the gradients in
    the forward pass (3 matmuls instead of 4) and checks the hint in the backward.
    """
    if fused:
        from megamt.kernels import fused_linear_task_cross_entropy

        h = hidden.reshape(-1, hidden.shape[-1])
        loss_sum, count = fused_linear_task_cross_entropy(
            h, weight, labels.reshape(-1), task_ids.reshape(-1), num_tasks, bias=bias,
            ignore_index=ignore_index, chunk_tokens=chunk_tokens, grad_scale_hint=grad_scale_hint)
        return TaskLoss(loss_sum.float(), count.float())
    logits = F.linear(hidden, weight, bias)
    return task_cross_entropy(logits, labels, task_ids, num_tasks, ignore_index=ignore_index)


class LMHeadTaskLoss(nn.Module):
    """The fused LM-head loss as its own (parameter-free) module: ``forward(hidden, *, head,
    labels, task_ids, grad_scale_hint=None) -> TaskLoss``.

    Why a module: the fused loss reads the head's weight outside ``lm_head.forward`` (which it
    never runs), so under ZeRO-3 the weight must be registered as an *external parameter* of
    the module whose forward reads it. DeepSpeed gathers a module's (external) parameters in
    its forward pre-hook and before its backward, and releases them in its post-backward hook,
    which fires when the gradient of the module's tensor inputs (``hidden``) is computed.
    Registered on the root ``MultitaskModel`` the head stayed gathered until the end of the
    whole backward (the root's post-backward); registered here (``register_head``) it is
    released as soon as this module's backward is done (when DeepSpeed's reuse-distance rule
    does not keep it for a nearby use: the tied input embedding at the end of the backward).

    ``hidden`` is the only positional argument: DeepSpeed's hooks see positional tensors only
    (hooking the head module or the labels would be wrong). ``head`` is passed at each call,
    not stored: the head stays owned (and named) by the backbone.
    """

    def __init__(self, num_tasks: int, chunk_tokens: int | None = None):
        super().__init__()
        self.num_tasks = num_tasks
        self.chunk_tokens = chunk_tokens

    def register_head(self, head: nn.Module) -> None:
        """Have ZeRO-3 gather ``head``'s weight (and bias) around this module; inert without ZeRO-3."""
        try:  # `deepspeed.zero` is an attribute of the package, not an importable module path
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter
        except ImportError:
            return
        for p in (head.weight, getattr(head, "bias", None)):
            if isinstance(p, nn.Parameter):
                register_external_parameter(self, p)

    def forward(self, hidden: torch.Tensor, *, head: nn.Module, labels: torch.Tensor, task_ids: torch.Tensor,
                grad_scale_hint: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> TaskLoss:
        """``bias``: the logits' bias when it is not the head's own (BART's ``final_logits_bias``)."""
        return task_cross_entropy_from_hidden(hidden, head.weight, labels, task_ids, self.num_tasks,
                                              bias=getattr(head, "bias", None) if bias is None else bias, fused=True,
                                              chunk_tokens=self.chunk_tokens, grad_scale_hint=grad_scale_hint)


def task_means(loss_sum: torch.Tensor, global_count: torch.Tensor) -> torch.Tensor:
    """Per-task mean over the step; 0 for a task with no target token in the step."""
    return loss_sum / global_count.clamp_min(1.0)


def step_loss(task_loss: TaskLoss, global_count: torch.Tensor, weights: torch.Tensor,
              world_size: int, grad_accum: int) -> torch.Tensor:
    """The scalar this rank hands to ``engine.backward`` for one micro-batch.

    Contribution to the step's objective: ``sum_t w_t * loss_sum[t] / N_t`` (N_t global).
    DeepSpeed divides the loss by ``gradient_accumulation_steps`` in ``engine.backward``
    and averages gradients over the ``world_size`` data-parallel ranks; multiplying by
    ``world_size * grad_accum`` here cancels both, so that after the step the gradient
    held by DeepSpeed is exactly ``d(total)/d(theta)`` with
    ``total = sum_t w_t * mean_t`` (the same objective a single process would compute on
    the whole global batch).
    """
    contribution = (weights.to(task_loss.loss_sum) * task_means(task_loss.loss_sum, global_count)).sum()
    return contribution * float(world_size * grad_accum)
