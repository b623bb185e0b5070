"""Triton kernels of megamt (importable as ``megamt.kernels``), each with a plain-torch reference."""

from .task_gram import task_combine
from .task_gram import task_gram
