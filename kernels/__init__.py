"""Triton kernels of megamt (importable as ``megamt.kernels``), each with a plain-torch reference."""

from .fused_linear_cross_entropy import fused_linear_task_cross_entropy
from .reference import reference_linear_task_cross_entropy
from .task_gram import task_combine
from .task_gram import task_gram
