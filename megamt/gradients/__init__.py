"""Multitask gradient handling: loss balancing, gradient surgery on ZeRO partitions, monitoring.

- ``methods``: Gram matrix -> combination coefficients (PCGrad, CAGrad, MGDA, Aligned-MTL,
  GradVac, sum), plus naive vector references.
- ``balancing``: per-task loss weights (equal, static, uncertainty, DWA, GradNorm, FAMO).
- ``surgery``: per-task gradient partitions under DeepSpeed ZeRO-1/2/3, one all-reduce of G.
- ``representation``: per-task gradient norms at the shared hidden states from one mixed
  backward (GradNorm on steps without G).
- ``monitor``: cosine matrix and norms to TensorBoard.
"""

from megamt.gradients.balancing import LossBalancer, build_balancer
from megamt.gradients.methods import METHODS, GradientMethod, build_method, cosine_matrix
from megamt.gradients.monitor import log_task_gradients
from megamt.gradients.surgery import GradientSurgery, SurgeryStats

__all__ = [
    "GradientMethod",
    "GradientSurgery",
    "LossBalancer",
    "METHODS",
    "SurgeryStats",
    "build_balancer",
    "build_method",
    "cosine_matrix",
    "log_task_gradients",
]
