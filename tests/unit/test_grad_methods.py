"""Gram-only gradient methods against constructed cases and naive vector references."""

import numpy as np
import pytest
import torch

from megamt.gradients.methods import (
    CAGrad, GradVac, MGDA, PCGrad, AlignedMTL, SumMethod, build_method, cosine_matrix, min_norm_weights,
    pcgrad_matrix, projection_orders, reference_aligned_mtl, reference_cagrad, reference_gradvac,
    reference_mgda, reference_pcgrad,
)


def combine(grads, coeffs):
    return coeffs.to(torch.float64) @ grads.to(torch.float64)


def gram(grads):
    g = grads.to(torch.float64)
    return g @ g.T


def random_grads(T, n, seed, conflict=True):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(T, n, generator=gen, dtype=torch.float64)
    if conflict:  # make some pairs conflict strongly
        g[1] = -0.7 * g[0] + 0.5 * g[1]
    return g


def test_pcgrad_removes_conflicting_component_exactly():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    grads = torch.stack([g1, g2])
    m = PCGrad(seed=0)
    d = combine(grads, m.coefficients(gram(grads)))
    # g1 projected off g2: g1 - (-1/2) g2 = (0.5, 0.5); g2 projected off g1: (0, 1)
    assert torch.allclose(d, torch.tensor([0.5, 1.5], dtype=torch.float64), atol=1e-15)
    M = m.last_matrix
    p1, p2 = M.to(torch.float64) @ grads
    assert abs(float(p1 @ g2)) < 1e-15 and abs(float(p2 @ g1)) < 1e-15


def test_no_conflict_passes_through_unchanged():
    grads = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.1, 0.0, 1.0]], dtype=torch.float64)
    G = gram(grads)
    assert (G >= 0).all()
    for m in (PCGrad(seed=3), SumMethod(), GradVac(3, beta=0.01)):
        assert torch.allclose(m.coefficients(G), torch.ones(3, dtype=torch.float64)), m.name


def test_mgda_orthogonal_unit_vectors_gives_midpoint():
    grads = torch.eye(2, dtype=torch.float64)
    c = MGDA().coefficients(gram(grads))
    assert torch.allclose(c, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(combine(grads, c), torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (5, 2), (8, 3)])
def test_pcgrad_matches_vector_reference(T, seed):
    grads = random_grads(T, 50, seed)
    m = PCGrad(seed=seed)
    m.step = 7
    orders = projection_orders(T, seed, 7)
    got = combine(grads, m.coefficients(gram(grads)))
    assert torch.allclose(got, reference_pcgrad(grads, orders), rtol=1e-12, atol=1e-12)
    # the order is random but different per step and reproducible
    assert projection_orders(T, seed, 7) == orders


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (4, 5), (6, 2), (10, 3)])
def test_mgda_matches_vector_reference_and_kkt(T, seed):
    grads = random_grads(T, max(3, T - 2), seed)  # n < T for T>=6: a degenerate, non-trivial support
    w = MGDA().coefficients(gram(grads))
    assert abs(float(w.sum()) - 1) < 1e-12 and (w >= -1e-15).all()
    d = combine(grads, w)
    pytest.importorskip("scipy")
    ref = reference_mgda(grads)
    assert torch.allclose(d, ref, atol=1e-6 * float(grads.norm(dim=1).max()))
    # KKT of the min-norm problem: <g_i, d> >= |d|^2 for every i
    assert (grads @ d >= float(d @ d) - 1e-9).all()


def test_mgda_solver_exact_on_random_full_rank():
    for seed in range(5):
        grads = random_grads(4, 40, seed)
        G = gram(grads).numpy()
        w = min_norm_weights(G)
        d = w @ grads.numpy()
        assert (grads.numpy() @ d >= d @ d - 1e-10).all()


@pytest.mark.parametrize("T,seed,c", [(2, 0, 0.5), (3, 1, 0.5), (4, 2, 0.2), (6, 3, 0.8)])
def test_cagrad_matches_scipy_reference(T, seed, c):
    pytest.importorskip("scipy")
    grads = random_grads(T, 30, seed)
    got = combine(grads, CAGrad(c=c).coefficients(gram(grads)))
    ref = reference_cagrad(grads, c=c)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.norm())), (got - ref).abs().max()


def test_cagrad_c0_is_mean_and_conflict_reduced():
    grads = random_grads(3, 20, 4)
    c0 = CAGrad(c=0.0).coefficients(gram(grads))
    assert torch.allclose(c0, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6)
    d = combine(grads, CAGrad(c=0.5).coefficients(gram(grads)))
    mean = grads.mean(0)
    # CAGrad improves the worst task's first-order decrease over the mean direction
    assert float((grads @ d).min() / d.norm()) > float((grads @ mean).min() / mean.norm())


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (5, 2)])
def test_aligned_mtl_matches_svd_reference(T, seed):
    grads = random_grads(T, 25, seed)
    got = combine(grads, AlignedMTL().coefficients(gram(grads)))
    assert torch.allclose(got, reference_aligned_mtl(grads), rtol=1e-8, atol=1e-8)
    # the aligned gradients are orthogonal with equal norms; each task's component is equal
    U, S, Vh = torch.linalg.svd(grads, full_matrices=False)
    aligned = S[-1] * U @ Vh
    aG = aligned @ aligned.T
    assert torch.allclose(aG, S[-1] ** 2 * torch.eye(T, dtype=torch.float64), atol=1e-8)


def test_gradvac_matches_vector_reference_over_steps():
    T = 4
    m = GradVac(T, beta=0.3, seed=5)
    rho = np.zeros((T, T))
    for step in range(4):
        grads = random_grads(T, 30, 10 + step)
        got = combine(grads, m.coefficients(gram(grads)))
        ref, rho = reference_gradvac(grads, projection_orders(T, 5, step), rho, beta=0.3)
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
        assert np.allclose(m.rho_hat, rho)
    state = m.state_dict()
    m2 = GradVac(T, beta=0.3, seed=5)
    m2.load_state_dict(state)
    grads = random_grads(T, 30, 99)
    assert torch.equal(m.coefficients(gram(grads)), m2.coefficients(gram(grads)))


def test_gradvac_subset_of_tasks_uses_global_pairs():
    m = GradVac(4, beta=0.5)
    grads = random_grads(2, 10, 0)
    m.coefficients(gram(grads), tasks=[1, 3])
    assert m.rho_hat[1, 3] != 0 and m.rho_hat[0, 1] == 0


def test_pcgrad_matrix_zero_gradient_is_skipped():
    G = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert np.allclose(pcgrad_matrix(G, [[1], [0]]), np.eye(2))


def test_build_method_and_errors():
    assert build_method("cagrad", 3, cagrad_c=0.3).c == 0.3
    with pytest.raises(ValueError, match="unknown gradient method"):
        build_method("nash", 3)
    with pytest.raises(FloatingPointError, match="non-finite"):
        MGDA().coefficients(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        MGDA().coefficients(torch.ones(2, 3))


def test_cosine_matrix():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    cos = cosine_matrix(gram(grads))
    assert cos[0, 1] == -1 and cos[0, 0] == 1 and cos[2, 2] == 0 and cos[0, 2] == 0
