"""task_gram / task_combine Triton kernels on a GPU vs float64 references (skipped without CUDA).

Odd sizes (not multiples of any block), T from 1 to 16, fp32 and bf16 rows, fresh random
inputs per case; and the dispatcher picks Triton for CUDA tensors. The CPU interpreter runs
the same kernels on small shapes in tests/unit/test_grad_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from megamt.kernels.task_gram import (
    reference_task_combine, reference_task_gram, task_combine, task_gram, triton_task_combine, triton_task_gram,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("T", [1, 2, 3, 8, 13, 16])
@pytest.mark.parametrize("n", [1, 4097, 1_000_003, 33_554_467])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_gram_and_combine_match_float64(T, n, dtype, tol):
    if T * n > 2**28:
        pytest.skip("keeps the case under 1 GiB")
    gen = torch.Generator(device="cuda").manual_seed(T * 7919 + n)
    grads = torch.randn(T, n, device="cuda", generator=gen).to(dtype)
    coeffs = torch.randn(T, device="cuda", generator=gen)
    G = triton_task_gram(grads)
    ref = reference_task_gram(grads)
    scale = float(grads.double().norm(dim=1).max() ** 2)
    # fp32 accumulation over n elements: relative error grows like sqrt(n) * eps at worst
    assert (G.double() - ref.to(G.device)).abs().max().item() <= tol * scale * max(1.0, (n / 1e6) ** 0.5)
    out = triton_task_combine(grads, coeffs)
    want = reference_task_combine(grads, coeffs).to(out.device)
    ctol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 output rounding
    assert torch.allclose(out.double(), want, rtol=ctol, atol=ctol * 4)


def test_dispatch_uses_triton_on_cuda_and_agrees_with_torch():
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = torch.randn(5, 123_457, device="cuda", generator=gen)
    coeffs = torch.randn(5, device="cuda", generator=gen)
    assert torch.allclose(task_gram(grads), task_gram(grads, backend="torch"), rtol=1e-5, atol=1e-2)
    assert torch.allclose(task_combine(grads, coeffs), task_combine(grads, coeffs, backend="torch"), rtol=1e-5,
                          atol=1e-5)
