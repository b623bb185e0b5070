"""task_gram / task_combine: torch path and Triton kernels (interpreter) against naive references."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megamt.kernels.task_gram import (
    reference_task_combine, reference_task_gram, task_combine, task_gram, torch_task_combine, torch_task_gram,
)

SHAPES = [(1, 1), (2, 7), (3, 300), (5, 1000), (8, 129), (16, 513)]


@pytest.mark.parametrize("T,n", SHAPES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
def test_torch_path_matches_reference(T, n, dtype, rtol):
    gen = torch.Generator().manual_seed(T * 1000 + n)
    grads = torch.randn(T, n, generator=gen).to(dtype)
    coeffs = torch.randn(T, generator=gen, dtype=torch.float64)
    G = task_gram(grads, backend="torch")
    assert G.dtype == torch.float32 and G.shape == (T, T)
    ref = reference_task_gram(grads)
    scale = float(grads.double().norm(dim=1).max() ** 2)
    assert torch.allclose(G.double(), ref, rtol=rtol, atol=rtol * scale)
    out = task_combine(grads, coeffs, backend="torch")
    assert out.dtype == dtype and out.shape == (n,)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 output rounding
    assert torch.allclose(out.double(), reference_task_combine(grads, coeffs), rtol=tol, atol=tol * 4)


def test_torch_path_chunks_and_out():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 1001, generator=gen).to(torch.bfloat16)
    assert torch.allclose(torch_task_gram(grads, chunk=100), torch_task_gram(grads, chunk=10**6), rtol=1e-6, atol=1e-4)
    # fp64 summation of chunk partials: far more accurate than one long fp32 dot
    long = torch.randn(4, 300_000, generator=gen) + 1.0
    ref = reference_task_gram(long)
    err = float((torch_task_gram(long).double() - ref).abs().max() / ref.abs().max())
    err_one_dot = float(((long @ long.T).double() - ref).abs().max() / ref.abs().max())
    assert err < 3e-6 and err <= err_one_dot, (err, err_one_dot)
    out = torch.empty(1001, dtype=torch.bfloat16)
    r = torch_task_combine(grads, torch.tensor([1.0, -2.0, 0.5]), out=out, chunk=64)
    assert r.data_ptr() == out.data_ptr()
    ref = reference_task_combine(grads, torch.tensor([1.0, -2.0, 0.5]))
    assert torch.allclose(out.double(), ref, rtol=8e-3, atol=3e-2)
    # a strided (non-contiguous rows) view is accepted
    big = torch.randn(3, 40, generator=gen)
    assert torch.allclose(task_gram(big[:, ::2], backend="torch"), reference_task_gram(big[:, ::2]).float(), atol=1e-4)


def test_autograd_matches_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    # float64 through the torch path keeps gradcheck meaningful
    assert torch.autograd.gradcheck(lambda x: task_gram(x, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda x, c: task_combine(x, c, backend="torch"), (x, c))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\[T, n\]"):
        task_gram(torch.ones(5))
    with pytest.raises(ValueError, match=r"coeffs must have shape \(2,\)"):
        task_combine(torch.ones(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        task_gram(torch.ones(2, 4), backend="cuda")
    with pytest.raises(ValueError, match="out must be"):
        task_combine(torch.ones(2, 4), torch.ones(2), out=torch.empty(3))


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from megamt.kernels.task_gram import (reference_task_combine, reference_task_gram,
                                          triton_task_combine, triton_task_gram, task_gram)
    shapes = [(1, 1), (2, 7), (3, 300), (5, 130), (8, 200), (9, 77), (16, 300), (17, 40)]
    for T, n in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(T * 1000 + n)
            grads = torch.randn(T, n, generator=gen).to(dtype)
            coeffs = torch.randn(T, generator=gen)
            G = triton_task_gram(grads, block=64)
            ref = reference_task_gram(grads)
            scale = float(grads.double().norm(dim=1).max() ** 2)
            assert G.shape == (T, T) and G.dtype == torch.float32
            assert torch.allclose(G.double(), ref, rtol=2e-5, atol=2e-5 * scale), (T, n, dtype, (G.double() - ref).abs().max())
            out = triton_task_combine(grads, coeffs, block=64)
            tol = 1e-5 if dtype == torch.float32 else 8e-3
            r = reference_task_combine(grads, coeffs)
            assert out.dtype == dtype and torch.allclose(out.double(), r, rtol=tol, atol=4 * tol), (T, n, dtype)
    # strided rows (a [T, n] view of a wider buffer) and the functional wrapper
    buf = torch.randn(3, 100)
    v = buf[:, :70]
    assert torch.allclose(task_gram(v, backend="triton").double(), reference_task_gram(v), rtol=2e-5, atol=1e-3)
    print("TRITON_OK")
    """
)


@pytest.mark.triton
def test_triton_kernels_match_reference_under_interpreter():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton is imported, so the kernels run in a
    # fresh process; this keeps the flag out of the other tests of this pytest process.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "TRITON_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
