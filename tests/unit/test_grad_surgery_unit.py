"""GradientSurgery's bookkeeping on one process with fake ZeRO-3 and ZeRO-2 engines (no launcher).

The fake ZeRO-3 engine holds each parameter's "partition" as a view of one flat fp32
buffer, like ZeRO-3's grad_partitions_flat_buffer, and adds each task's gradient into it
the way DeepSpeed's reduce-scatter does. The fake ZeRO-2 engine exposes fragments through
``_hp_mapping`` like DeepSpeed's stage 1/2 optimizer, adds into them only at an accumulation
boundary, and records the boundary flags. The real 2-rank runs are
tests/integration/test_grad_surgery.py.
"""

import types

import pytest
import torch

deepspeed_utils = pytest.importorskip("deepspeed.utils")

from megamt.config import GradientConfig  # noqa: E402
from megamt.gradients.methods import PCGrad, projection_orders, reference_pcgrad  # noqa: E402
from megamt.gradients.surgery import GradientSurgery, countsketch  # noqa: E402

SIZES = [5, 3, 7]


class FakeEngine:
    def __init__(self, gas, stage=3, fp16=False, contiguous=True):
        self.params = [torch.nn.Parameter(torch.zeros(s)) for s in SIZES]
        for i, p in enumerate(self.params):
            p.ds_id = i
        self.module = torch.nn.ParameterList(self.params)
        self.flat = torch.zeros(sum(SIZES) + (4 if not contiguous else 0))
        self.parts, a = {}, 0
        for p, s in zip(self.params, SIZES):
            self.parts[p.ds_id] = self.flat[a:a + s]
            a += s + (2 if not contiguous else 0)  # gaps: the per-parameter path
        self.gas, self.stage, self.fp16 = gas, stage, fp16
        self.optimizer = types.SimpleNamespace(dp_process_group=None)

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return self.fp16

    def zero_offload_optimizer(self):
        return None

    def gradient_accumulation_steps(self):
        return self.gas

    def backward_task(self, grad):  # DeepSpeed: add loss/GAS's gradient into the partitions
        a = 0
        for p, s in zip(self.params, SIZES):
            self.parts[p.ds_id] += grad[a:a + s] / self.gas
            a += s


@pytest.fixture
def fake_ds(monkeypatch):
    engines = []

    def get(p):
        return engines[-1].parts[p.ds_id]

    def set_(p, v):
        engines[-1].parts[p.ds_id].copy_(v)

    monkeypatch.setattr(deepspeed_utils, "safe_get_local_grad", get)
    monkeypatch.setattr(deepspeed_utils, "safe_set_local_grad", set_)
    return engines


@pytest.mark.parametrize("contiguous", [True, False])
def test_snapshots_gram_combine_writeback(fake_ds, contiguous):
    T = 3
    engine = FakeEngine(gas=T, contiguous=contiguous)
    fake_ds.append(engine)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(T, sum(SIZES), generator=gen)
    grads[1] = -grads[0] + 0.1 * grads[1]  # a conflict
    surgery = GradientSurgery(engine, GradientConfig(method="pcgrad", seed=4), ["a", "b", "c"], backend="torch")
    assert (surgery.flat is None) and surgery.buffer is None
    for step in range(2):
        engine.flat.zero_()
        surgery.begin_step()
        order = [2, 0, 1]  # backward order need not be task order
        for t in order:
            engine.backward_task(grads[t])
            surgery.after_backward(t)
        stats = surgery.finish()
        assert (surgery.flat is not None) == contiguous
        G = grads.double() @ grads.double().T
        assert torch.allclose(stats.gram, G, rtol=1e-5, atol=1e-5)
        assert stats.conflicts >= 1 and stats.applied and stats.present.all()
        # the rows were filled in backward order: the method saw tasks [2, 0, 1]
        sub = grads[order].double()
        want = reference_pcgrad(sub, projection_orders(T, 4, step)) / T
        got = torch.cat([engine.parts[p.ds_id] for p in engine.params]).double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert set(stats.timings) == {"snapshot", "gram", "allreduce", "method", "combine"}
    # one backward per task per window
    surgery.begin_step()
    engine.backward_task(grads[0])
    surgery.after_backward(0)
    with pytest.raises(RuntimeError, match="already had a backward"):
        surgery.after_backward(0)


@pytest.mark.parametrize("method", ["sum", "none"])  # none: monitor steps of plain training
def test_sum_is_measure_only_and_absent_tasks(fake_ds, method):
    engine = FakeEngine(gas=2)
    fake_ds.append(engine)
    grads = torch.randn(2, sum(SIZES))
    surgery = GradientSurgery(engine, GradientConfig(method=method), ["a", "b", "c"], backend="torch")
    surgery.begin_step()
    for t, task in enumerate([0, 2]):  # task b is absent this step
        engine.backward_task(grads[t])
        surgery.after_backward(task)
    before = engine.flat.clone()
    stats = surgery.finish()
    assert not stats.applied and torch.equal(engine.flat, before) and stats.method == method
    assert stats.present.tolist() == [True, False, True]
    assert stats.gram[1].abs().sum() == 0 and stats.norms[1] == 0
    assert torch.allclose(stats.norms[[0, 2]], grads.double().norm(dim=1), rtol=1e-5)


def test_refuses_what_it_cannot_do(fake_ds):
    with pytest.raises(NotImplementedError, match="ZeRO stage 1, 2 or 3"):
        GradientSurgery(FakeEngine(gas=2, stage=0), GradientConfig(method="pcgrad"), ["a", "b"])
    with pytest.raises(RuntimeError, match="no optimizer fragment mapping"):
        GradientSurgery(FakeEngine(gas=2, stage=2), GradientConfig(method="pcgrad"), ["a", "b"])
    with pytest.raises(NotImplementedError, match="fp16"):
        GradientSurgery(FakeEngine(gas=2, fp16=True), GradientConfig(method="pcgrad"), ["a", "b"])
    s = GradientSurgery(FakeEngine(gas=2), GradientConfig(method="mgda"), ["a", "b"])
    s.begin_step()
    with pytest.raises(RuntimeError, match="no after_backward"):
        s.finish()
    with pytest.raises(IndexError, match="out of range"):
        s.after_backward(5)


class FakeMapping:
    """DeepSpeed's tensor_fragment for one parameter: this rank's slice [start, start + numel)."""

    def __init__(self, store, start, numel):
        self.store, self.lp_fragment_address = store, types.SimpleNamespace(start=start, numel=numel)

    def get_lp_grad_fragment(self, index):
        return self.store[index]


class FakeEngine12(FakeEngine):
    """Rank 0 of 2 under ZeRO-2: owns the first half of each parameter (a separate fp32
    buffer per fragment, like a non-contiguous partition); the last parameter is not here."""

    def __init__(self, gas):
        super().__init__(gas, stage=2)
        self.frags = {}
        for i, (p, s) in enumerate(zip(self.params, SIZES)):
            del p.ds_id
            if i == len(SIZES) - 1:
                p._hp_mapping = None
                continue
            p._index_in_param_group = i
            self.frags[i] = torch.zeros(s // 2 + 1)
            p._hp_mapping = FakeMapping(self.frags, 0, s // 2 + 1)
        self.boundary, self.flags = None, []

    def set_gradient_accumulation_boundary(self, b):
        self.boundary = b
        self.flags.append(b)

    def local(self, grad):  # this rank's part of a full flat gradient, in parameter order
        out, a = [], 0
        for i, s in enumerate(SIZES):
            if i in self.frags:
                out.append(grad[a:a + s // 2 + 1])
            a += s
        return torch.cat(out)

    def backward_task(self, grad):
        assert self.boundary, "ZeRO-1/2 surgery must make every task's backward a boundary"
        a = 0
        for i, s in enumerate(SIZES):
            if i in self.frags:
                self.frags[i] += grad[a:a + s // 2 + 1] / self.gas
            a += s


@pytest.mark.parametrize("method", ["pcgrad", "sum"])
def test_zero12_fragments_boundaries_and_writeback(method):
    T = 3
    engine = FakeEngine12(gas=T)
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(T, sum(SIZES), generator=gen)
    grads[1] = -grads[0] + 0.1 * grads[1]
    surgery = GradientSurgery(engine, GradientConfig(method=method, seed=4), ["a", "b", "c"], backend="torch")
    assert surgery.reduce_each_backward
    for step in range(2):
        surgery.begin_step()
        engine.flags.clear()
        for t in range(T):
            engine.set_gradient_accumulation_boundary(t == T - 1)  # the trainer's own flag
            surgery.before_backward()
            engine.backward_task(grads[t])
            surgery.after_backward(t)
            # after each snapshot the fragments are empty and the boundary is off again
            assert all(f.abs().sum() == 0 for f in engine.frags.values()) and engine.boundary is False
        stats = surgery.finish()
        assert engine.boundary is True  # the real engine.step() is the boundary
        # per task: the trainer's flag, before_backward's True, after_backward's False; finish's True
        assert engine.flags == [False, True, False] + [False, True, False] + [True, True, False] + [True]
        local = torch.stack([engine.local(g) for g in grads]).double()
        # single process: the Gram matrix is this rank's part only (the all-reduce sums the ranks')
        assert torch.allclose(stats.gram, local @ local.T, rtol=1e-5, atol=1e-5)
        want = (reference_pcgrad(local, projection_orders(T, 4, step)) if method == "pcgrad" else local.sum(0)) / T
        got = torch.cat([engine.frags[i] for i in sorted(engine.frags)]).double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)  # written back, also for sum
        assert stats.applied == (method == "pcgrad")
        for f in engine.frags.values():
            f.zero_()  # the optimizer step consumes the gradient


# --------------------------------------------------------------------------------------
# The snapshot buffer: sized by training tasks, freed after monitoring steps; the sketch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pcgrad", "none"])
def test_buffer_sized_by_training_tasks_kept_only_with_a_method(fake_ds, method):
    # tasks a, b train; "zs" is a zero-shot task: it never has a backward, so it gets no row
    engine = FakeEngine(gas=2)
    fake_ds.append(engine)
    grads = torch.randn(2, sum(SIZES), generator=torch.Generator().manual_seed(5))
    surgery = GradientSurgery(engine, GradientConfig(method=method), ["a", "zs", "b"], train_tasks=["a", "b"],
                              backend="torch")
    for _ in range(2):
        engine.flat.zero_()
        surgery.begin_step()
        for t, task in enumerate([0, 2]):
            engine.backward_task(grads[t])
            surgery.after_backward(task)
            assert surgery.buffer.shape == (2, sum(SIZES))
        with pytest.raises(RuntimeError, match="more backwards in this window than the 2 training tasks"):
            surgery.after_backward(1)
        stats = surgery.finish()
        assert stats.buffer_bytes == 2 * sum(SIZES) * 4
        assert torch.allclose(stats.norms[[0, 2]], grads.double().norm(dim=1), rtol=1e-5)
        # a gradient method measures every step: kept; monitoring only: freed until the next one
        assert (surgery.buffer is not None) == (method != "none")
    with pytest.raises(ValueError, match="subset of the tasks"):
        GradientSurgery(engine, GradientConfig(method=method), ["a", "b"], train_tasks=["a", "c"])


def test_countsketch_gram_is_unbiased_with_the_stated_variance():
    """The JL bound the config documents, measured: over R = 200 independent hashes the error
    of every Gram entry has mean ~0 (|mean| <= 5 sigma / sqrt(R)) and root mean square at most
    1.25 x sigma, sigma = sqrt((G_ii G_jj + G_ij^2) / k) (the variance bound; 1.25 covers the
    sampling error of an RMS over 200 draws, ~5-7 %). Tasks of very different norms, correlated."""
    gen = torch.Generator().manual_seed(6)
    n, k, R = 10_000, 128, 200
    base = torch.randn(4, n, generator=gen, dtype=torch.float64)
    x = torch.stack([base[0], -0.7 * base[0] + 0.3 * base[1], 1e-3 * base[2], 50.0 * (base[3] + 0.5 * base[0])])
    # split into "parameters" as a partition would be
    cuts = [0, 3, 5000, 5001, 7_345, n]
    x = x.float().double()  # the sketch reads fp32 partitions
    G = x @ x.T
    sigma = ((G.diagonal()[:, None] * G.diagonal()[None, :] + G**2) / k).sqrt()
    errs = []
    for seed in range(R):
        sk = torch.stack([countsketch([row[a:b].float() for a, b in zip(cuts, cuts[1:])], k, seed) for row in x])
        errs.append(sk @ sk.T - G)
    errs = torch.stack(errs)
    assert (errs.mean(0).abs() <= 5 * sigma / R**0.5).all(), errs.mean(0) / (sigma / R**0.5)
    rms = errs.pow(2).mean(0).sqrt()
    assert (rms <= 1.25 * sigma).all(), (rms / sigma)
    # and the hash is a function of (seed, layout): the same call gives the same sketch
    parts = [x[0, a:b].float() for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(countsketch(parts, k, 3), countsketch(parts, k, 3))
    assert not torch.equal(countsketch(parts, k, 3), countsketch(parts, k, 4))


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_monitor_sketch_needs_no_buffer_zero3(fake_ds):
    # ZeRO-3 (running sums): the sketch of each task is a difference of sketches of running
    # sums; nothing n_local-sized is kept, nothing is written back
    engine = FakeEngine(gas=3)
    fake_ds.append(engine)
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(3, sum(SIZES), generator=gen, dtype=torch.float64)
    grads[1] *= 0.01  # very different norms
    k = 4096  # > n_local here: nearly every coordinate in its own bucket, so tight bounds
    surgery = GradientSurgery(engine, GradientConfig(method="none", monitor_sketch_dim=k), ["a", "b", "c"],
                              backend="torch")
    engine.flat.zero_()
    surgery.begin_step()
    for t in range(3):
        engine.backward_task(grads[t].float())
        surgery.after_backward(t)
    before = engine.flat.clone()
    stats = surgery.finish()
    assert surgery.buffer is None and surgery.sketch is None and torch.equal(engine.flat, before)
    assert stats.buffer_bytes == 3 * k * 8
    # the hash changes from window to window and resumes with the checkpoint (weights_only-safe)
    state = surgery.state_dict()
    assert state["windows"] == 1 and torch.load(_saved(state), weights_only=True) == state
    resumed = GradientSurgery(engine, GradientConfig(method="none", monitor_sketch_dim=k), ["a", "b", "c"])
    resumed.load_state_dict(state)
    assert resumed.windows == surgery.windows
    G = grads @ grads.T
    sigma = ((G.diagonal()[:, None] * G.diagonal()[None, :] + G**2) / k).sqrt()
    assert ((stats.gram - G).abs() <= 6 * sigma + 1e-5 * G.abs().max()).all()


def test_monitor_sketch_zero12_writes_the_sum_back():
    T = 3
    engine = FakeEngine12(gas=T)
    grads = torch.randn(T, sum(SIZES), generator=torch.Generator().manual_seed(8))
    surgery = GradientSurgery(engine, GradientConfig(method="none", monitor_sketch_dim=64), ["a", "b", "c"],
                              backend="torch")
    surgery.begin_step()
    for t in range(T):
        engine.set_gradient_accumulation_boundary(t == T - 1)
        surgery.before_backward()
        engine.backward_task(grads[t])
        surgery.after_backward(t)
        assert all(f.abs().sum() == 0 for f in engine.frags.values()) and engine.boundary is False
    stats = surgery.finish()
    assert engine.boundary is True and surgery.buffer is None
    got = torch.cat([engine.frags[i] for i in sorted(engine.frags)]).double()
    want = torch.stack([engine.local(g) for g in grads]).double().sum(0) / T
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)  # the step's gradient, as without surgery
    assert stats.buffer_bytes == T * 64 * 8 + want.numel() * 4  # the sketches + one fp32 row
