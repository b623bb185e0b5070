"""Triton kernels of megamt (importable as ``megamt.kernels``), each with a plain-torch reference."""
