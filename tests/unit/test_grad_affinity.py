"""TAG affinity bookkeeping and the lookahead's arithmetic (megamt.gradients.affinity).

The lookahead on real ZeRO-3 partitions is held to a single-process reference in
tests/integration/test_affinity.py (2 ranks). Here a stand-in engine of one rank whose
parameters' ``ds_tensor`` is the parameter itself (what ZeRO-3 on one rank holds) checks
``measure()``'s arithmetic, restore and call sequence on fresh random inputs, fast."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megamt.gradients.affinity import LookaheadAffinity, TaskAffinity, first_order_affinity
from megamt.losses import TaskLoss


def test_first_order_formula_and_absent_tasks():
    g = torch.randn(3, 11, dtype=torch.float64)
    G = g @ g.T
    L = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)
    Z = first_order_affinity(G, L, 0.1)
    for i in range(3):
        for j in range(3):
            assert float(Z[i, j]) == pytest.approx(0.1 * float(g[i] @ g[j]) / float(L[j]))
    Z = first_order_affinity(G, torch.tensor([2.0, float("nan"), 0.0]), 0.1, present=torch.tensor([True, True, True]))
    assert math.isfinite(Z[0, 0]) and Z[:, 1].isnan().all() and Z[1, :].isnan().all() and Z[:, 2].isnan().all()


class TinyTasks(torch.nn.Module):
    """Task t's loss: mean squared error of a shared linear map plus a per-task bias, per row."""

    def __init__(self, T):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(5, 3))
        self.b = torch.nn.Parameter(torch.randn(T, 3) * 0.1)
        self.T = T

    def forward(self, batch):
        x, y, t = batch["x"], batch["y"], batch["task"]
        per_row = ((x @ self.w + self.b[t] - y) ** 2).sum(1)
        loss_sum = torch.zeros(self.T).index_add(0, torch.full((len(x),), t), per_row)
        return TaskLoss(loss_sum, torch.zeros(self.T).index_add(0, torch.full((len(x),), t), torch.ones(len(x))))


class StandInEngine:
    """One ZeRO-3 rank: ds_tensor = the whole parameter (same storage); forward = the module's."""

    def __init__(self, module):
        self.module, self.training, self.calls = module, True, []
        for p in module.parameters():
            p.ds_tensor = p.data.view(-1)
        self.optimizer = SimpleNamespace(parameter_offload=SimpleNamespace(
            partition_all_parameters=lambda: self.calls.append("release")))

    def zero_optimization_stage(self):
        return 3

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def __call__(self, batch):
        self.calls.append("forward")
        return self.module(batch)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookahead_arithmetic_restore_and_sequence(seed):
    torch.manual_seed(seed)
    T = 3
    model = TinyTasks(T)
    engine = StandInEngine(model)
    params = list(model.parameters())
    batches = {t: {"x": torch.randn(4 + t, 5), "y": torch.randn(4 + t, 3), "task": t} for t in range(T)}
    grads = []
    for t in range(T):  # per-task gradients of the mean loss (what the surgery buffer holds, scale 1)
        model.zero_grad()
        out = model(batches[t])
        (out.loss_sum[t] / out.count[t]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    partitions = torch.stack(grads) / 2.0  # DeepSpeed units with scale 2 (e.g. GAS 2)
    before = [p.detach().clone() for p in params]
    lr = 0.3
    Z, base = LookaheadAffinity(engine, [f"t{i}" for i in range(T)], params).measure(
        partitions, list(range(T)), 2.0, lr, batches, engine)
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # restored to the bit
    assert engine.training  # back in training mode
    # release before the base forwards, after each shift, and at the end; T forwards each time
    assert engine.calls == (["release"] + ["forward"] * T + (["release"] + ["forward"] * T) * T + ["release"])
    with torch.no_grad():
        for i in range(T):
            shifted = TinyTasks(T)
            offset = 0
            for q, p in zip(shifted.parameters(), params):
                q.copy_(p - lr * grads[i][offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            for j in range(T):
                out0, out1 = model(batches[j]), shifted(batches[j])
                want = 1 - (out1.loss_sum[j] / out1.count[j]) / (out0.loss_sum[j] / out0.count[j])
                assert float(Z[i, j]) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
                assert float(base[j]) == pytest.approx(float(out0.loss_sum[j] / out0.count[j]), rel=1e-6)
    # small steps: the lookahead approaches the first-order estimate
    small = LookaheadAffinity(engine, [f"t{i}" for i in range(T)], params).measure(
        partitions.double(), list(range(T)), 2.0, 1e-4, batches, engine)[0]
    G = torch.stack(grads).double() @ torch.stack(grads).double().T
    Z1 = first_order_affinity(G, base, 1e-4)
    assert torch.allclose(small, Z1, rtol=2e-2, atol=1e-8)


def test_lookahead_refuses_zero12():
    engine = SimpleNamespace(zero_optimization_stage=lambda: 2)
    with pytest.raises(NotImplementedError, match="needs ZeRO-3"):
        LookaheadAffinity(engine, ["a", "b"], [torch.nn.Parameter(torch.zeros(2))])


def test_task_affinity_means_scalars_and_file(tmp_path):
    gcfg = SimpleNamespace(affinity_every=2, affinity_lr=None, affinity_lookahead=False)
    tracker = TaskAffinity(gcfg, ["a", "b", "c"], lr=0.5, run_dir=tmp_path, rank=0)
    assert tracker.lr == 0.5 and not tracker.due(1) and tracker.due(4)
    G1 = torch.tensor([[4.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    stats = SimpleNamespace(gram=G1, present=torch.tensor([True, True, False]))
    assert not tracker.update(1, stats, [1.0, 2.0, float("nan")])  # not a measuring step
    assert tracker.update(2, stats, [1.0, 2.0, float("nan")])
    s = tracker.scalars()
    assert s == {"affinity_first_order/a/b": 0.5 * 1.0 / 2.0, "affinity_first_order/b/a": 0.5 * 1.0 / 1.0}
    assert tracker.update(4, SimpleNamespace(gram=3 * G1, present=stats.present), [1.0, 2.0, float("nan")])
    m = tracker.mean("first_order")
    assert m[0, 1] == pytest.approx(0.5 * 2.0 / 2.0) and np.isnan(m[0, 2]) and m[1, 1] == pytest.approx(0.5 * 18 / 2.0)
    saved = json.loads((tmp_path / "affinity.json").read_text())
    assert saved["first_order"]["steps"] == 2 and saved["lookahead"]["steps"] == 0
    assert [r["step"] for r in saved["per_step"]] == [2, 4]
    assert saved["first_order"]["mean"][0][2] is None and saved["tasks"] == ["a", "b", "c"]
    assert tracker.heatmap().shape[0] == 3


def test_a_resumed_run_continues_the_means_without_replayed_steps(tmp_path):
    gcfg = SimpleNamespace(affinity_every=1, affinity_lr=1.0, affinity_lookahead=False)
    G = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    present = torch.tensor([True, True])
    first = TaskAffinity(gcfg, ["a", "b"], lr=1.0, run_dir=tmp_path, rank=0)
    for step in (1, 2, 3):  # the launch is killed after step 3; its checkpoint was at step 2
        first.update(step, SimpleNamespace(gram=step * G, present=present), [1.0, 1.0])
    resumed = TaskAffinity(gcfg, ["a", "b"], lr=1.0, run_dir=tmp_path, rank=0)
    for step in (3, 4):  # step 3 again (after the checkpoint), then on
        resumed.update(step, SimpleNamespace(gram=10 * G, present=present), [1.0, 1.0])
    saved = json.loads((tmp_path / "affinity.json").read_text())
    assert [r["step"] for r in saved["per_step"]] == [1, 2, 3, 4]
    assert saved["first_order"]["steps"] == 4
    assert saved["first_order"]["mean"][0][1] == pytest.approx((0.5 + 1.0 + 5.0 + 5.0) / 4)
    other = TaskAffinity(gcfg, ["b", "a"], lr=1.0, run_dir=tmp_path, rank=0)  # another task set: not continued
    assert other.records == []
