"""Gradient methods that need nothing but the task Gram matrix.

Every method here maps ``G[i, j] = <g_i, g_j>`` (``T x T``) to coefficients ``c``
(``T``) such that the update direction is ``d = sum_j c_j g_j``. No method ever sees a
gradient vector, so under ZeRO-3 each rank forms its slice of ``d`` from its own
gradient partitions after one all-reduce of ``G`` (see ``surgery.py``).

PCGrad and GradVac project sequentially: each projected ``g_i'`` is a linear
combination of the original ``g``'s, so we carry its coefficient row ``m_i`` (``g_i' =
sum_j m_i[j] g_j``) and evaluate every inner product through ``G``:
``<g_i', g_j> = m_i @ G[:, j]`` and ``|g_i'|^2 = m_i @ G @ m_i``.

All arithmetic is float64 on the CPU (``T <= 16``; the cost is microseconds). Every
rank receives the same all-reduced ``G`` and the same seeds, so every rank computes
bit-identical coefficients without a further collective.

The bottom of the file holds naive references that work on full gradient vectors
(``reference_*``); the tests hold the Gram-only methods to them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

METHODS = ("sum", "pcgrad", "cagrad", "mgda", "aligned_mtl", "gradvac")


# --------------------------------------------------------------------------- helpers


def _as_gram(gram: Tensor) -> np.ndarray:
    g = gram.detach().to("cpu", torch.float64).numpy()
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gradient methods need a square T x T Gram matrix, got shape {tuple(gram.shape)}")
    if not np.isfinite(g).all():
        raise FloatingPointError("task Gram matrix holds a non-finite value (a task gradient overflowed); "
                                 "skip this step or lower the learning rate")
    return 0.5 * (g + g.T)  # fp32 partial sums are symmetric only up to rounding


def projection_orders(num_tasks: int, seed: int, step: int) -> list[list[int]]:
    """PCGrad/GradVac order: for each task ``i`` a random order of the other tasks.

    Seeded by ``(seed, step)`` so every rank (and the vector reference) draws the same one.
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    orders = []
    for i in range(num_tasks):
        perm = torch.randperm(num_tasks, generator=gen).tolist()
        orders.append([j for j in perm if j != i])
    return orders


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _minimize_on_simplex(f: Callable[[np.ndarray], float], grad: Callable[[np.ndarray], np.ndarray],
                         w0: np.ndarray, max_iter: int = 5000, tol: float = 1e-13) -> np.ndarray:
    """Accelerated projected gradient (FISTA with backtracking and restart) on the simplex."""
    w = project_simplex(w0)
    y, t, L = w.copy(), 1.0, 1.0
    fw = f(w)
    for _ in range(max_iter):
        gy, fy = grad(y), f(y)
        while True:  # backtracking on the local Lipschitz constant
            w_new = project_simplex(y - gy / L)
            diff = w_new - y
            if f(w_new) <= fy + gy @ diff + 0.5 * L * (diff @ diff) + 1e-15 or L > 1e30:
                break
            L *= 2.0
        f_new = f(w_new)
        if f_new > fw:  # restart momentum when it overshoots
            y, t = w.copy(), 1.0
            L *= 2.0
            continue
        step = np.abs(w_new - w).max()
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = w_new + ((t - 1.0) / t_new) * (w_new - w)
        w, fw, t = w_new, f_new, t_new
        L = max(L / 1.5, 1e-12)
        gw = grad(w)
        gap = gw @ w - gw.min()  # Frank-Wolfe duality gap: f(w) - f* <= gap
        if step < tol or gap <= tol * max(1.0, abs(fw)):
            break
    return w


def _newton_polish_on_face(f, grad, hess, w: np.ndarray, iters: int = 30) -> np.ndarray:
    """Newton's method on the face of the simplex that a first-order solver found.

    First-order methods crawl along ill-conditioned faces (a duality gap of 1e-9 after
    thousands of steps); on the face the objective is smooth, so equality-constrained
    Newton steps (KKT system with the sum-to-one row) reach machine precision in a few
    iterations. A step that leaves the face or does not decrease ``f`` is refused.
    """
    S = np.nonzero(w > 1e-12)[0]
    if len(S) < 2:
        return w
    k = len(S)
    cur = w.copy()
    for _ in range(iters):
        g, H = grad(cur)[S], hess(cur)[np.ix_(S, S)]
        K = np.zeros((k + 1, k + 1))
        K[:k, :k] = H
        K[:k, k] = 1.0
        K[k, :k] = 1.0
        try:
            delta = np.linalg.lstsq(K, np.concatenate([-g, [0.0]]), rcond=None)[0][:k]
        except np.linalg.LinAlgError:
            break
        step = 1.0
        f0 = f(cur)
        while step > 1e-6:
            cand = cur.copy()
            cand[S] = cur[S] + step * delta
            if (cand[S] >= 0).all() and f(cand) <= f0 + 1e-16 * abs(f0):
                break
            step *= 0.5
        else:
            break
        moved = np.abs(cand - cur).max()
        cur = cand
        if moved < 1e-15:
            break
    return cur if f(cur) <= f(w) else w


def min_norm_weights(gram: np.ndarray, max_iter: int = 1000, tol: float = 1e-12) -> np.ndarray:
    """MGDA: ``argmin_{w in simplex} |sum_i w_i g_i|^2`` from ``G`` alone.

    Frank-Wolfe with fully corrective steps, i.e. Wolfe's min-norm-point algorithm
    (Wolfe 1976), written on inner products only. Plain Frank-Wolfe (Sener & Koltun's
    MinNormSolver) converges as O(1/k); the corrective steps make it exact in a finite
    number of iterations: the Frank-Wolfe vertex ``argmin_i (G w)_i`` joins the active
    set S, then ``w`` moves towards the affine minimiser of S, dropping vertices whose
    weight reaches zero. It stops when the Frank-Wolfe duality gap
    ``w G w - min_i (G w)_i`` is below ``tol`` (relative).
    """
    T = gram.shape[0]
    if T == 1:
        return np.ones(1)
    scale = max(np.abs(np.diag(gram)).max(), 1e-300)
    first = int(np.argmin(np.diag(gram)))
    S = [first]
    w = np.zeros(T)
    w[first] = 1.0
    for _ in range(max_iter):
        gw = gram @ w
        t = int(np.argmin(gw))
        if w @ gw - gw[t] <= tol * scale or t in S:
            break
        S.append(t)
        for _ in range(T + 1):  # minor cycles: at most one vertex leaves per cycle
            u = _affine_min_norm(gram, S)
            if (u > tol).all():
                w = np.zeros(T)
                w[S] = u
                break
            wS = w[S]
            neg = u <= tol
            theta = min(1.0, np.min(wS[neg] / np.maximum(wS[neg] - u[neg], 1e-300)))
            wS = wS + theta * (u - wS)
            w = np.zeros(T)
            w[S] = wS
            keep = [i for i, wi in zip(S, wS) if wi > tol]
            S = keep if keep else [S[int(np.argmax(wS))]]
            w[[i for i in range(T) if i not in S]] = 0.0
            w /= w.sum()
    return w


def _affine_min_norm(gram: np.ndarray, S: list[int]) -> np.ndarray:
    """Weights (summing to 1) of the min-norm point of the affine hull of the vertices S."""
    k = len(S)
    A = np.zeros((k + 1, k + 1))
    A[:k, :k] = gram[np.ix_(S, S)]
    A[:k, k] = 1.0
    A[k, :k] = 1.0
    b = np.zeros(k + 1)
    b[k] = 1.0
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x[:k]


# --------------------------------------------------------------------------- methods


class GradientMethod:
    """Maps the task Gram matrix to combination coefficients; may carry state across steps.

    ``coefficients(gram, tasks)`` gets the Gram matrix of the tasks present this step and
    their global indices (``tasks``), so stateful methods (GradVac's targets) keep one
    entry per task pair even when a task skips a step.
    """

    name = "base"

    def coefficients(self, gram: Tensor, tasks: Optional[list[int]] = None) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SumMethod(GradientMethod):
    """Plain sum of the task gradients (measure-only: what DeepSpeed would have applied)."""

    name = "sum"

    def coefficients(self, gram, tasks=None):
        return torch.ones(gram.shape[0], dtype=torch.float64)


class PCGrad(GradientMethod):
    """PCGrad (Yu et al. 2020): project each g_i off every g_j it conflicts with, in random order; sum.

    The projections use the original ``g_j`` (as the authors' code and LibMTL do). The
    coefficient matrix ``M`` (row i = g_i' in terms of the g's) is kept for inspection.
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.step = 0
        self.last_matrix: Optional[Tensor] = None

    def coefficients(self, gram, tasks=None):
        G = _as_gram(gram)
        T = G.shape[0]
        M = pcgrad_matrix(G, projection_orders(T, self.seed, self.step))
        self.step += 1
        self.last_matrix = torch.from_numpy(M)
        return torch.from_numpy(M.sum(axis=0))

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def pcgrad_matrix(G: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """Row i: coefficients of PCGrad's projected g_i over the original gradients."""
    T = G.shape[0]
    M = np.eye(T)
    for i in range(T):
        m = M[i]
        for j in orders[i]:
            if G[j, j] <= 0:
                continue  # a zero gradient cannot conflict
            dot = m @ G[:, j]  # <g_i', g_j>
            if dot < 0:
                m[j] -= dot / G[j, j]
    return M


class CAGrad(GradientMethod):
    """CAGrad (Liu et al. 2021), the authors' formulation with ``rescale=1``.

    ``w* = argmin_{w in simplex} <g_w, g_0> + c |g_0| |g_w|`` with ``g_0`` the mean
    gradient and ``g_w = sum w_i g_i``; direction ``d = g_0 + (c |g_0| / |g_w|) g_w``,
    divided by ``1 + c^2``. In coefficients: ``(1/T + lambda w) / (1 + c^2)``.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.5):
        self.c = c

    def coefficients(self, gram, tasks=None):
        G = _as_gram(gram)
        return torch.from_numpy(cagrad_coefficients(G, self.c))


def cagrad_coefficients(G: np.ndarray, c: float) -> np.ndarray:
    T = G.shape[0]
    b = np.full(T, 1.0 / T)
    # w is found on G scaled to unit largest diagonal (the problem is scale-invariant but
    # the solver's step sizes are not); the authors' 1e-8 guards stay in the original units
    s = max(float(np.diag(G).max()), 1e-30)
    Gs = G / s
    Gb = Gs @ b
    cs = c * math.sqrt(max(b @ Gb, 0.0) + 1e-8 / s) + 1e-8 / math.sqrt(s)

    def f(w):
        return w @ Gb + cs * math.sqrt(max(w @ Gs @ w, 0.0) + 1e-8 / s)

    def grad(w):
        Gw = Gs @ w
        return Gb + cs * Gw / math.sqrt(max(w @ Gw, 0.0) + 1e-8 / s)

    def hess(w):
        Gw = Gs @ w
        r = math.sqrt(max(w @ Gw, 0.0) + 1e-8 / s)
        return cs * (Gs / r - np.outer(Gw, Gw) / r**3)

    # a few hundred first-order steps find the face; Newton on it finishes. Only when the
    # duality gap says the face was wrong does the first-order solver continue.
    w = b.copy()
    for max_iter in (300, 3000):
        w = _newton_polish_on_face(f, grad, hess, _minimize_on_simplex(f, grad, w, max_iter=max_iter, tol=1e-10))
        gw = grad(w)
        if gw @ w - gw.min() <= 1e-12 * max(1.0, abs(f(w))):
            break
    g0_norm = math.sqrt(max(b @ G @ b, 0.0) + 1e-8)
    cc = c * g0_norm + 1e-8
    gw_norm = math.sqrt(max(w @ G @ w, 0.0))
    lam = cc / (gw_norm + 1e-8)
    return (b + lam * w) / (1.0 + c * c)


class MGDA(GradientMethod):
    """MGDA-UB's min-norm point (Sener & Koltun 2018): d = sum w_i g_i, w on the simplex."""

    name = "mgda"

    def coefficients(self, gram, tasks=None):
        return torch.from_numpy(min_norm_weights(_as_gram(gram)))


class AlignedMTL(GradientMethod):
    """Aligned-MTL (Senushkin et al. 2023), LibMTL's form.

    With ``G = V diag(lambda) V^T`` (rank r, eigenvalues descending), the aligned system is
    ``B = sqrt(lambda_r) V diag(lambda)^-1/2 V^T`` and the coefficients are ``B.sum(0)``:
    the aligned gradients have equal norms and are orthogonal, scaled by the smallest
    singular value.
    """

    name = "aligned_mtl"

    def coefficients(self, gram, tasks=None):
        return torch.from_numpy(aligned_mtl_coefficients(_as_gram(gram)))


def aligned_mtl_coefficients(G: np.ndarray) -> np.ndarray:
    lam, V = np.linalg.eigh(G)
    order = np.argsort(lam)[::-1]
    lam, V = lam[order], V[:, order]
    tol = max(lam.max(), 0.0) * G.shape[0] * np.finfo(np.float64).eps * 1e3
    r = int((lam > tol).sum())
    if r == 0:
        return np.zeros(G.shape[0])
    lam, V = lam[:r], V[:, :r]
    B = math.sqrt(lam[-1]) * (V * (1.0 / np.sqrt(lam))) @ V.T
    return B.sum(axis=0)


class GradVac(GradientMethod):
    """Gradient Vaccine (Wang et al. 2021), LibMTL's form, from ``G`` alone.

    Keeps an EMA target ``rho_hat[i, j]`` of the cosine between task gradients (per
    global task pair). In random order, when ``cos(g_i', g_j) < rho_hat[i, j]``, adds
    ``a g_j`` to ``g_i'`` with ``a = |g_i'| (rho_hat sqrt(1 - rho^2) - rho sqrt(1 - rho_hat^2))
    / (|g_j| sqrt(1 - rho_hat^2))`` so the cosine reaches the target; then
    ``rho_hat <- (1 - beta) rho_hat + beta rho``. The direction is the sum of the ``g_i'``.
    """

    name = "gradvac"

    def __init__(self, num_tasks: int, beta: float = 0.01, seed: int = 0):
        self.beta = beta
        self.seed = seed
        self.step = 0
        self.rho_hat = np.zeros((num_tasks, num_tasks))

    def coefficients(self, gram, tasks=None):
        G = _as_gram(gram)
        T = G.shape[0]
        tasks = list(range(T)) if tasks is None else list(tasks)
        M, self.rho_hat = gradvac_matrix(G, projection_orders(T, self.seed, self.step), self.rho_hat, tasks, self.beta)
        self.step += 1
        return torch.from_numpy(M.sum(axis=0))

    def state_dict(self):
        return {"step": self.step, "rho_hat": torch.from_numpy(self.rho_hat.copy())}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.rho_hat = state["rho_hat"].to(torch.float64).numpy().copy()


def gradvac_matrix(G: np.ndarray, orders, rho_hat: np.ndarray, tasks: list[int], beta: float):
    T = G.shape[0]
    rho_hat = rho_hat.copy()
    M = np.eye(T)
    norms = np.sqrt(np.maximum(np.diag(G), 0.0))
    for i in range(T):
        m = M[i]
        for j in orders[i]:
            if norms[j] == 0:
                continue
            pc_norm = math.sqrt(max(m @ G @ m, 0.0))
            if pc_norm == 0:
                continue
            rho = (m @ G[:, j]) / (pc_norm * norms[j])
            target = rho_hat[tasks[i], tasks[j]]
            if rho < target:
                a = pc_norm * (target * math.sqrt(max(1 - rho * rho, 0.0)) - rho * math.sqrt(max(1 - target * target, 0.0)))
                a /= norms[j] * math.sqrt(max(1 - target * target, 1e-12))
                m[j] += a
            rho_hat[tasks[i], tasks[j]] = (1 - beta) * target + beta * rho
    return M, rho_hat


def build_method(name: str, num_tasks: int, *, cagrad_c: float = 0.5, gradvac_beta: float = 0.01,
                 seed: int = 0) -> GradientMethod:
    """The gradient method called ``name`` (``gradients.method``)."""
    if name == "sum":
        return SumMethod()
    if name == "pcgrad":
        return PCGrad(seed=seed)
    if name == "cagrad":
        return CAGrad(c=cagrad_c)
    if name == "mgda":
        return MGDA()
    if name == "aligned_mtl":
        return AlignedMTL()
    if name == "gradvac":
        return GradVac(num_tasks, beta=gradvac_beta, seed=seed)
    raise ValueError(f"gradients.method: unknown gradient method {name!r}; choose one of {METHODS}")


def cosine_matrix(gram: Tensor) -> Tensor:
    """Cosine similarities from the Gram matrix; 0 where a gradient is zero."""
    g = gram.to(torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))


# --------------------------------------------------------------------------- references
# Naive versions on full gradient vectors ``grads [T, n]``: what a single-GPU library does.
# They compute every inner product from the vectors themselves, after every update.


def reference_pcgrad(grads: Tensor, orders: list[list[int]]) -> Tensor:
    g = grads.to(torch.float64)
    out = torch.zeros_like(g[0])
    for i in range(g.shape[0]):
        gi = g[i].clone()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0 and g[j] @ g[j] > 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out += gi
    return out


def reference_mgda(grads: Tensor) -> Tensor:
    """The min-norm point of the gradients' convex hull, by scipy's SLSQP on the vectors.

    An independent solver on purpose: plain Frank-Wolfe (Sener & Koltun's MinNormSolver)
    needs tens of thousands of iterations to reach 1e-6 on degenerate inputs.
    """
    from scipy.optimize import minimize

    g = grads.to(torch.float64)
    T = g.shape[0]
    gn = g.numpy()
    scale = float((g * g).sum(1).max()) or 1.0

    def obj(x):
        d = x @ gn
        return float(d @ d) / scale, 2.0 * (gn @ d) / scale

    res = minimize(obj, np.full(T, 1.0 / T), jac=True, bounds=[(0, 1)] * T,
                   constraints=({"type": "eq", "fun": lambda x: 1 - x.sum(), "jac": lambda x: -np.ones(T)},),
                   method="SLSQP", options={"ftol": 1e-16, "maxiter": 2000})
    return torch.from_numpy(np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()) @ g


def reference_cagrad(grads: Tensor, c: float = 0.5) -> Tensor:
    """The authors' CAGrad on vectors, with the simplex problem solved by scipy's SLSQP as they do."""
    from scipy.optimize import minimize

    g = grads.to(torch.float64)
    T = g.shape[0]
    g0 = g.mean(0)
    g0_norm = math.sqrt(float(g0 @ g0) + 1e-8)
    cc = c * g0_norm + 1e-8
    gn = g.numpy()
    g0n = g0.numpy()

    def obj(x):
        gw = x @ gn
        return float(gw @ g0n + cc * math.sqrt(gw @ gw + 1e-8))

    res = minimize(obj, np.full(T, 1.0 / T), bounds=[(0, 1)] * T,
                   constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},), method="SLSQP",
                   options={"ftol": 1e-14, "maxiter": 1000})
    gw = torch.from_numpy(res.x) @ g
    lam = cc / (float(gw.norm()) + 1e-8)
    return (g0 + lam * gw) / (1 + c * c)


def reference_aligned_mtl(grads: Tensor) -> Tensor:
    """Aligned-MTL on vectors via the SVD of the gradient matrix (``grads = U S V^T``).

    The aligned gradients are ``sigma_min U V^T`` (rows); their sum is the direction.
    """
    g = grads.to(torch.float64)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    r = int((S > S.max() * g.shape[0] * 1e-13).sum())
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    aligned = S[-1] * U @ Vh
    return aligned.sum(0)


def reference_gradvac(grads: Tensor, orders, rho_hat: np.ndarray, beta: float):
    g = grads.to(torch.float64)
    T = g.shape[0]
    rho_hat = rho_hat.copy()
    out = torch.zeros_like(g[0])
    for i in range(T):
        gi = g[i].clone()
        for j in orders[i]:
            nj = float(g[j].norm())
            ni = float(gi.norm())
            if nj == 0 or ni == 0:
                continue
            rho = float(gi @ g[j]) / (ni * nj)
            target = rho_hat[i, j]
            if rho < target:
                a = ni * (target * math.sqrt(1 - rho * rho) - rho * math.sqrt(1 - target * target))
                a /= nj * math.sqrt(max(1 - target * target, 1e-12))
                gi = gi + a * g[j]
            rho_hat[i, j] = (1 - beta) * target + beta * rho
        out += gi
    return out, rho_hat
