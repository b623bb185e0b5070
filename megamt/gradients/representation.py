"""Per-task gradient norms at the shared representation, from ONE mixed backward.

GradNorm needs ``n_t = |grad (w_t L_t)|`` per task on every step. With per-task gradients
measured (gradient-method mode, monitoring steps) it is ``sqrt(diag G)`` over all
parameters. On the other steps (plain training with mixed, packed micro-batches) there is
one backward of ``sum_t w_t L_t``, and ZeRO-3 cannot backward twice through one forward,
so the classic "gradient of the last shared layer per task" is out of reach. What is in
reach: the gradient of the objective with respect to the **last shared hidden states**
``h`` (the decoder's / encoder's output). Every loss term reads only its own position's
``h`` (the LM head, a token-tagging head, a span head) or its own example's first token
(a classification head), and every position belongs to one task (``task_ids``), so

    d(sum_s w_s L_s)/dh_i = d(w_t L_t)/dh_i   for the task t of position i, 0 elsewhere,

and ``n_t^2 = sum_{i in task t} |dObjective/dh_i|^2``: every task's representation-gradient
norm from the one backward that training runs anyway (LibMTL's ``rep_grad`` variant of
GradNorm). A tensor hook on ``h`` adds the per-position squared norms by task id; one
all-reduce of ``T`` numbers per optimizer step sums the ranks' positions.

Scale: the hook sees the gradient of what ``engine.backward`` receives; the trainer's
``step_loss`` is ``world * sum_t w_t loss_sum_t / N_t`` after DeepSpeed's ``1/GAS``, so
``take()`` divides by ``world``: ``n_t = |d(w_t L_t)/dh|`` with ``L_t`` the global mean.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from megamt.gradients.balancing import world_sum_


class RepresentationGradNorms:
    """Collects ``sum_{i in task t} |dObjective/dh_i|^2`` over one optimizer step.

    ``attach(module)`` once (a forward hook on the shared trunk); per micro-batch the model
    calls ``set_task_ids(task_ids)`` before its forward. ``enabled`` switches the tensor
    hook per step (the trainer turns it off on steps that measure ``G`` instead).
    ``take(world_size)`` returns ``n_t`` (float64, ``[T]``) and resets.
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.enabled = True
        self.sq = torch.zeros(num_tasks, dtype=torch.float64)
        self._task_ids: Optional[Tensor] = None
        self._handle = None

    def attach(self, module: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = module.register_forward_hook(self._on_forward)

    def set_task_ids(self, task_ids: Tensor) -> None:
        self._task_ids = task_ids

    def _on_forward(self, module, args, output) -> None:
        if not self.enabled or not torch.is_grad_enabled():
            return
        hidden = output if torch.is_tensor(output) else output[0]
        if not hidden.requires_grad:
            return
        task_ids = self._task_ids
        if task_ids is None or tuple(task_ids.shape) != tuple(hidden.shape[:-1]):
            raise RuntimeError(
                f"representation gradient norms: the trunk's output {tuple(hidden.shape)} does not match the "
                f"batch's task_ids {None if task_ids is None else tuple(task_ids.shape)} (call set_task_ids "
                "before each forward)")
        ids = task_ids.reshape(-1)
        keep = ids >= 0

        def hook(grad: Tensor) -> None:
            per_position = grad.detach().float().pow(2).sum(-1).reshape(-1)
            if self.sq.device != grad.device:  # stays on the device: no sync per micro-batch
                self.sq = self.sq.to(grad.device)
            self.sq.index_add_(0, ids[keep].to(grad.device), per_position[keep].to(device=grad.device).double())

        hidden.register_hook(hook)

    def take(self, world_size: int = 1) -> Tensor:
        """The step's per-task norms, summed over the ranks (collective when distributed)."""
        sq = world_sum_(self.sq.detach().clone())
        self.sq.zero_()
        return sq.cpu().clamp_min(0).sqrt() / max(1, world_size)
