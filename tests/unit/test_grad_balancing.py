"""Loss balancers: combine() contract and each balancer's learning rule."""

import math

import pytest
import torch

from megamt.config import GradientConfig
from megamt.gradients.balancing import (
    DWABalancer, FAMOBalancer, GradNormBalancer, UncertaintyBalancer, build_balancer,
)

TASKS = ["a", "b", "c"]


def means(*v, grad=False):
    return torch.tensor(v, dtype=torch.float32, requires_grad=grad)


@pytest.mark.parametrize("name", ["equal", "static", "uncertainty", "dwa", "gradnorm", "famo"])
def test_combine_weights_only_present_tasks_and_round_trips(name):
    gcfg = GradientConfig(loss_weighting=name, static_weights={"b": 2.0})
    bal = build_balancer(gcfg, TASKS)
    m = means(1.0, float("nan"), 3.0, grad=True)  # b absent: NaN must not leak
    present = torch.tensor([True, False, True])
    loss = bal.combine(m, present)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    w = bal.weights()
    assert set(w) == set(TASKS)
    assert m.grad[1] == 0
    assert torch.allclose(m.grad[[0, 2]], torch.tensor([w["a"], w["c"]]))
    # state round trip into a fresh balancer
    bal.update(0, means(1.0, 2.0, 3.0))
    fresh = build_balancer(gcfg, TASKS)
    fresh.load_state_dict(bal.state_dict())
    assert fresh.weights() == bal.weights()


def test_equal_and_static_values():
    m, present = means(1.0, 2.0, 4.0), torch.ones(3, dtype=torch.bool)
    assert float(build_balancer(GradientConfig(), TASKS).combine(m, present)) == 7.0
    static = build_balancer(GradientConfig(loss_weighting="static", static_weights={"c": 0.5}), TASKS)
    assert float(static.combine(m, present)) == 1.0 + 2.0 + 2.0
    with pytest.raises(ValueError, match="unknown tasks"):
        build_balancer(GradientConfig(loss_weighting="static", static_weights={"zzz": 1.0}), TASKS)


def test_uncertainty_learns_inverse_loss_weights():
    bal = UncertaintyBalancer(TASKS, lr=0.05)
    target = torch.tensor([0.5, 2.0, 8.0])
    for step in range(1500):
        loss = bal.combine(target.clone(), torch.ones(3, dtype=torch.bool))
        loss.backward()
        bal.update(step, target)
    w = torch.tensor(list(bal.weights().values()))
    # optimum of exp(-s) L + s is s = log L: weight 1/L
    assert torch.allclose(w, 1 / target, rtol=0.05), w
    assert bal.weights()["a"] > bal.weights()["c"]


def test_dwa_uses_loss_ratios():
    bal = DWABalancer(TASKS, temperature=2.0)
    bal.update(0, means(1.0, 1.0, 1.0))
    assert bal.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}  # one period: not enough history
    bal.update(1, means(0.5, 1.0, 2.0))  # a halves, b flat, c doubles
    r = torch.tensor([0.5, 1.0, 2.0])
    want = 3 * torch.softmax(r / 2.0, 0)
    got = torch.tensor(list(bal.weights().values()))
    assert torch.allclose(got, want, atol=1e-6)
    assert abs(float(got.sum()) - 3) < 1e-5


def test_dwa_window_and_absent_task():
    bal = DWABalancer(TASKS, temperature=1.0, window=2)
    bal.update(0, means(1.0, float("nan"), 1.0))
    bal.update(1, means(3.0, float("nan"), 1.0))  # period 1: a=2, b=absent, c=1
    bal.update(2, means(1.0, 5.0, 1.0))
    bal.update(3, means(1.0, 5.0, 1.0))  # period 2: a=1, b=5, c=1
    r = torch.tensor([0.5, 1.0, 1.0])  # b has no previous period: ratio 1
    assert torch.allclose(torch.tensor(list(bal.weights().values())), 3 * torch.softmax(r, 0), atol=1e-6)


def test_gradnorm_moves_weight_to_the_task_with_small_gradient():
    bal = GradNormBalancer(TASKS, alpha=0.0, lr=0.05)  # alpha 0: equalise the weighted gradient norms
    norms = torch.tensor([1.0, 4.0, 2.0])
    for step in range(300):
        w = torch.tensor(list(bal.weights().values()), dtype=torch.float64)
        G = torch.diag((w * norms.double()) ** 2)  # gradients of w_t L_t
        bal.update(step, means(1.0, 1.0, 1.0), gram=G)
    w = torch.tensor(list(bal.weights().values()))
    assert abs(float(w.sum()) - 3) < 1e-4
    assert w[0] > w[2] > w[1]
    weighted = w * norms
    assert float(weighted.max() / weighted.min()) < 1.2, weighted
    # without G and without representation norms the weights stay
    before = bal.weights()
    bal.update(999, means(1.0, 1.0, 1.0), gram=None)
    assert bal.weights() == before


def test_gradnorm_from_representation_norms_equals_from_gram():
    """Steps without G use the per-task norms given directly: the same update as diag(G)."""
    a, b = GradNormBalancer(TASKS, alpha=1.5, lr=0.05), GradNormBalancer(TASKS, alpha=1.5, lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for step in range(20):
        n = torch.rand(3, generator=gen, dtype=torch.float64) + 0.1
        m = means(*(torch.rand(3, generator=gen) + 0.5).tolist())
        G = torch.randn(3, 3, generator=gen, dtype=torch.float64) * 0.01
        G = G + G.T
        G.diagonal().copy_(n ** 2)  # off-diagonal entries do not matter to GradNorm
        a.update(step, m, gram=G)
        b.update(step, m, grad_norms=n)
        assert a.weights() == pytest.approx(b.weights(), abs=1e-6)
    assert max(abs(v - 1.0) for v in a.weights().values()) > 1e-3  # they moved


def test_famo_favours_the_task_that_improves_slowly():
    bal = FAMOBalancer(TASKS, lr=0.1, gamma=0.0)
    loss = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    for step in range(50):
        bal.update(step, loss.float())
        loss = loss * torch.tensor([0.9, 0.99, 0.9], dtype=torch.float64)  # b barely improves
    z = torch.softmax(bal.logits.detach(), 0)
    assert z[1] > z[0] and z[1] > z[2]
    w = bal.weights()
    # weights = T z / (c L): positive, and they weigh the loss terms so that sum_t w_t L_t / T = 1 / c
    assert all(v > 0 for v in w.values())
    c = float((z.double() / bal.prev).sum())
    assert math.isclose(sum(w[t] * float(bal.prev[i]) for i, t in enumerate(TASKS)), 3 / c, rel_tol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="unknown balancer"):
        build_balancer(type("Section", (), {"loss_weighting": "magic"})(), TASKS)
    bal = build_balancer(GradientConfig(), TASKS)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        bal.combine(torch.ones(2), torch.ones(2, dtype=torch.bool))
    other = build_balancer(GradientConfig(loss_weighting="dwa"), TASKS)
    with pytest.raises(ValueError, match="loss_weighting changed"):
        bal.load_state_dict(other.state_dict())
