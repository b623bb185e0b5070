"""fused_linear_task_cross_entropy (torch backend, the CPU path) against the unfused reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_ce_cases import (IGNORE, check_against_reference, check_realistic_hint_precision, make_case,
                             realistic_hint_errors)

import megamt.kernels.fused_linear_cross_entropy as flce
from megamt.kernels import fused_linear_task_cross_entropy, reference_linear_task_cross_entropy


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 2**20 logits: with chunk_tokens=128 → 8192-wide vocabulary blocks, so the
    odd shapes below cross several token and vocabulary blocks, the last ones partial."""
    monkeypatch.setitem(flce._BLOCK_ELEMENTS, "cpu", 1 << 20)


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_odd_realistic_shape_fp32(small_blocks, label_smoothing, z_loss):
    # N=423 tokens, V=32003 (odd), H=67 (not a multiple of 16), 7 tasks, bias on.
    case = make_case(423, 67, 32003, 7, bias=True, seed=1)
    check_against_reference(case, "torch", label_smoothing=label_smoothing, z_loss=z_loss, chunk_tokens=128)


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3)])
def test_smoothing_or_z_loss_alone(small_blocks, label_smoothing, z_loss):
    case = make_case(423, 45, 9001, 5, bias=True, seed=2)
    check_against_reference(case, "torch", label_smoothing=label_smoothing, z_loss=z_loss, chunk_tokens=128)


@pytest.mark.parametrize("num_tasks", [1, 2, 64])
def test_number_of_tasks(small_blocks, num_tasks):
    case = make_case(423, 40, 5003, num_tasks, seed=num_tasks)
    loss, count, _ = check_against_reference(case, "torch", z_loss=1e-4, chunk_tokens=100)
    assert count.sum() == (case["labels"] != IGNORE).sum()


def test_bf16_odd_shape(small_blocks):
    case = make_case(423, 67, 32003, 5, dtype=torch.bfloat16, bias=True, seed=3)
    check_against_reference(case, "torch", label_smoothing=0.1, z_loss=1e-3, chunk_tokens=128)


def test_task_without_tokens_and_task_owning_all():
    # tasks 1 and 3 of 5 have no tokens: zero loss and count, and their (nonzero) upstream
    # gradients must not leak into the parameter gradients
    case = make_case(200, 24, 999, 5, tasks=[0, 2, 4], seed=4)
    loss, count, _ = check_against_reference(case, "torch", label_smoothing=0.05)
    assert count[1] == count[3] == 0 and loss[1] == loss[3] == 0
    # one task owns every token
    case = make_case(200, 24, 999, 4, tasks=[2], seed=5)
    loss, count, _ = check_against_reference(case, "torch", z_loss=1e-3)
    assert count[2] == (case["labels"] != IGNORE).sum() and count.sum() == count[2]


def test_all_tokens_ignored():
    case = make_case(64, 16, 300, 3, bias=True, ignore_frac=1.1, seed=6)
    assert (case["labels"] == IGNORE).all() and (case["task_ids"] == -1).all()
    loss, count, grads = check_against_reference(case, "torch", label_smoothing=0.1, z_loss=1e-3)
    assert loss.abs().sum() == 0 and count.sum() == 0
    assert all(g.abs().sum() == 0 for g in grads)


def test_no_ignored_tokens_and_zero_upstream_for_some_tasks(small_blocks):
    # every token active (the no-index path) and g_t = 0 for two tasks (their rows are skipped)
    case = make_case(300, 33, 4001, 4, ignore_frac=0.0, seed=7)
    case["upstream"] = torch.tensor([0.0, 1.5, 0.0, -0.7])
    check_against_reference(case, "torch", label_smoothing=0.1, chunk_tokens=64)


def test_default_chunks_and_auto_backend_on_cpu():
    case = make_case(423, 35, 12007, 3, seed=8)
    check_against_reference(case, "auto")


def test_non_contiguous_inputs_and_tied_embedding():
    torch.manual_seed(9)
    n, h, v, t = 150, 24, 777, 3
    emb = torch.nn.Embedding(v, h)
    proj = torch.nn.Linear(h, h)
    ids = torch.randint(0, v, (3, n // 3))
    labels = torch.randint(0, v, (n,))
    labels[::4] = IGNORE
    task_ids = torch.randint(0, t, (n,))
    upstream = torch.randn(t)

    def grads_of(fn, **kw):
        emb.zero_grad(), proj.zero_grad()
        hidden = proj(emb(ids)).transpose(0, 1).reshape(-1, h)  # a non-contiguous [N, H]
        weight = emb.weight  # tied input / output embedding
        loss, _ = fn(hidden, weight, labels, task_ids, t, **kw)
        (loss * upstream).sum().backward()
        return loss.detach(), emb.weight.grad.clone(), proj.weight.grad.clone()

    ref = grads_of(reference_linear_task_cross_entropy)
    got = grads_of(fused_linear_task_cross_entropy, backend="torch", chunk_tokens=32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())

    # a weight that is a transposed view (e.g. kept as [H, V])
    w_hv = torch.randn(h, v) * 0.3
    hid = torch.randn(n, h)
    a, _ = fused_linear_task_cross_entropy(hid, w_hv.t(), labels, task_ids, t, backend="torch")
    b, _ = reference_linear_task_cross_entropy(hid, w_hv.t(), labels, task_ids, t)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_some_inputs_need_grad_and_no_grad_mode():
    case = make_case(100, 16, 500, 2, bias=True, seed=10)
    hidden = case["hidden"].clone().requires_grad_()
    loss, _ = fused_linear_task_cross_entropy(hidden, case["weight"], case["labels"], case["task_ids"], 2,
                                              bias=case["bias"], backend="torch")
    (g_hidden,) = torch.autograd.grad(loss.sum(), [hidden])
    ref, _ = reference_linear_task_cross_entropy(hidden, case["weight"], case["labels"], case["task_ids"], 2,
                                                 bias=case["bias"])
    (g_ref,) = torch.autograd.grad(ref.sum(), [hidden])
    torch.testing.assert_close(g_hidden, g_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss2, count2 = fused_linear_task_cross_entropy(hidden, case["weight"], case["labels"], case["task_ids"], 2,
                                                        bias=case["bias"], backend="torch")
    torch.testing.assert_close(loss2, loss.detach())
    assert not loss2.requires_grad and not count2.requires_grad


def test_errors_name_the_problem():
    case = make_case(20, 8, 50, 2, ignore_frac=0.0, seed=11)
    args = (case["hidden"], case["weight"], case["labels"])
    bad_tasks = case["task_ids"].clone()
    bad_tasks[7] = 2
    with pytest.raises(ValueError, match=r"token 7 .* task id 2"):
        fused_linear_task_cross_entropy(*args, bad_tasks, 2, backend="torch")
    bad_labels = case["labels"].clone()
    bad_labels[3] = 50
    with pytest.raises(ValueError, match=r"token 3 has label 50"):
        fused_linear_task_cross_entropy(case["hidden"], case["weight"], bad_labels, case["task_ids"], 2, backend="torch")
    with pytest.raises(ValueError, match="ZeRO-3"):
        fused_linear_task_cross_entropy(case["hidden"], torch.empty(0), case["labels"].view(-1), case["task_ids"], 2)
    with pytest.raises(ValueError, match="ZeRO-3"):
        fused_linear_task_cross_entropy(case["hidden"], torch.empty(0, 8), case["labels"], case["task_ids"], 2)
    with pytest.raises(TypeError, match="share one dtype"):
        fused_linear_task_cross_entropy(case["hidden"].bfloat16(), case["weight"], *args[2:], case["task_ids"], 2)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_task_cross_entropy(*args, case["task_ids"], 2, backend="cuda")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_task_cross_entropy(*args, case["task_ids"], 2, label_smoothing=1.0)


def test_task_id_of_ignored_tokens_is_never_used():
    # ignored tokens carry out-of-range task ids (-1 and T): results equal those with task 0
    case = make_case(80, 12, 200, 3, seed=12)
    ignored = case["labels"] == IGNORE
    wild = case["task_ids"].clone()
    wild[ignored] = torch.where(torch.arange(80)[ignored] % 2 == 0, -1, 3)
    a, c = fused_linear_task_cross_entropy(case["hidden"], case["weight"], case["labels"], wild, 3, backend="torch")
    b, d = reference_linear_task_cross_entropy(case["hidden"], case["weight"], case["labels"], wild, 3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, d)


def test_label_smoothing_matches_torch_definition():
    # a direct check of the smoothing formula on one token, independent of the reference
    h, w = torch.randn(1, 5), torch.randn(7, 5)
    y = torch.tensor([3])
    loss, _ = fused_linear_task_cross_entropy(h, w, y, torch.tensor([0]), 1, label_smoothing=0.2, z_loss=0.01,
                                              backend="torch")
    logits = h @ w.t()
    lse = torch.logsumexp(logits, -1)
    logp = logits - lse
    want = -(0.8 * logp[0, 3] + 0.2 * logp[0].mean()) + 0.01 * lse[0] ** 2
    torch.testing.assert_close(loss[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.cross_entropy(logits, y, label_smoothing=0.2) + 0.01 * lse[0] ** 2, want)


# --------------------------------------------------------------------------------------
# grad_scale_hint: gradients computed in the forward, used when g = c · hint
# --------------------------------------------------------------------------------------


@pytest.fixture
def path_counts():
    flce.backward_path_counts.clear()
    return flce.backward_path_counts


@pytest.fixture
def check_hint(monkeypatch):
    """Debug mode: the backward checks g = c · hint on the host and recomputes when it fails."""
    monkeypatch.setenv(flce.HINT_CHECK_ENV, "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", ["hint", "scaled"])
def test_hint_fast_path(small_blocks, path_counts, dtype, upstream):
    # odd shapes, bias, 30% ignored tokens, label smoothing and z-loss; 64-token blocks of whole
    # vocabulary rows in the hinted forward (7 blocks, the last one partial)
    case = make_case(423, 37, 5003, 5, dtype=dtype, bias=True, seed=13)
    hint = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.1
    case["upstream"] = {"hint": hint, "scaled": 3.7 * hint}[upstream]
    check_against_reference(case, "torch", label_smoothing=0.1, z_loss=1e-3, chunk_tokens=64, hint=hint)
    assert dict(path_counts) == {"hinted": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hint_check_in_debug_mode_recomputes_exactly(small_blocks, path_counts, check_hint, dtype):
    # MEGAMT_CHECK_HINT=1 and g unrelated to the hint: the exact recompute path
    case = make_case(423, 37, 5003, 5, dtype=dtype, bias=True, seed=13)
    hint = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.1
    check_against_reference(case, "torch", label_smoothing=0.1, z_loss=1e-3, chunk_tokens=64, hint=hint)
    assert dict(path_counts) == {"hint_mismatch": 1, "recompute": 1}
    case["upstream"] = 0.25 * hint  # and a proportional g still takes the kept gradients
    check_against_reference(case, "torch", label_smoothing=0.1, z_loss=1e-3, chunk_tokens=64, hint=hint)
    assert path_counts["hinted"] == 1


def test_wrong_hint_without_the_check_gives_nan_never_a_wrong_gradient(path_counts):
    # default mode (no host sync): g not proportional to the hint on the tasks with tokens makes
    # every gradient NaN (DeepSpeed / the trainer see a non-finite gradient), and a proportional
    # g in the same mode is exact
    case = make_case(150, 24, 777, 3, bias=True, seed=21)
    hint = torch.tensor([1.0, 2.0, 0.5])
    for g, finite in ((torch.tensor([1.0, 2.0, 0.6]), False), (torch.tensor([-3.0, -6.0, -1.5]), True)):
        leaves = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        loss, _ = fused_linear_task_cross_entropy(leaves[0], leaves[1], case["labels"], case["task_ids"], 3,
                                                  bias=leaves[2], backend="torch", grad_scale_hint=hint)
        grads = torch.autograd.grad((loss * g).sum(), leaves)
        assert all(bool(torch.isfinite(x).all()) == finite for x in grads), (g, finite)
        if not finite:  # NaN on every active token's row and in the whole weight/bias gradient
            active = case["labels"] != IGNORE
            assert torch.isnan(grads[0][active]).all() and (grads[0][~active] == 0).all()
            assert torch.isnan(grads[1]).all() and torch.isnan(grads[2]).all()
    assert dict(path_counts) == {"hinted": 2}


def test_hinted_backward_makes_no_host_sync(path_counts):
    """Proof on the CPU by design (a stand-in for CUDA's sync): every op the backward runs is
    recorded through a TorchDispatchMode; none may read a device value on the host
    (``_local_scalar_dense`` is what ``.item()`` / ``bool()`` / ``float()`` dispatch to,
    ``nonzero`` / ``equal`` sync by their nature). With MEGAMT_CHECK_HINT=1 the check does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func._schema.name)  # "aten::mul", without the overload
            return func(*args, **(kwargs or {}))

    syncing = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::item"}
    case = make_case(90, 16, 300, 3, bias=True, seed=22)
    hint = torch.tensor([0.5, 0.0, 2.0])
    for debug, expect_sync in ((False, False), (True, True)):
        with pytest.MonkeyPatch.context() as m:
            m.setenv(flce.HINT_CHECK_ENV, "1" if debug else "0")
            hidden = case["hidden"].clone().requires_grad_()
            loss, _ = fused_linear_task_cross_entropy(hidden, case["weight"], case["labels"], case["task_ids"], 3,
                                                      backend="torch", grad_scale_hint=hint)
            upstream = (loss * (7.0 * hint)).sum()
            with Recorder() as rec:
                upstream.backward()
        synced = syncing.intersection(rec.ops)
        assert bool(synced) == expect_sync, (debug, synced)
        assert "aten::argmax" in rec.ops  # the recorder saw the hint factor being computed
    assert path_counts["hinted"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hint_at_realistic_magnitudes_in_low_precision(dtype):
    # hint w_t / N_t ≈ 1e-5 and a loss scale in g (kernel_ce_cases.REALISTIC_HINT): the kept
    # gradients of the hinted forward are as accurate as the exact recompute against float64
    # (before they were kept as hint · D in fp16 and lost percents to underflow)
    case = make_case(200, 48, 4099, 3, dtype=dtype, seed=5)
    check_realistic_hint_precision(case, "torch", chunk_tokens=64)


def test_hint_tasks_without_tokens_are_dont_care(path_counts):
    # tasks 1 and 3 have no tokens: g may differ from c·hint there (and hint may be 0 there),
    # the fast path still applies; a zero hint on a task *with* tokens forces g_t = 0 there
    case = make_case(200, 24, 999, 5, tasks=[0, 2, 4], seed=14)
    hint = torch.tensor([0.5, 0.0, 2.0, 9.0, 0.25])
    case["upstream"] = torch.tensor([1.0, -7.0, 4.0, 3.0, 0.5])  # 2·hint on tasks 0, 2, 4
    check_against_reference(case, "torch", label_smoothing=0.05, hint=hint)
    hint = torch.tensor([0.5, 1.0, 0.0, 1.0, 0.25])  # task 2 has tokens and hint 0, but g_2 = 4
    with pytest.MonkeyPatch.context() as m:  # debug mode: checked, recomputed exactly
        m.setenv(flce.HINT_CHECK_ENV, "1")
        check_against_reference(case, "torch", z_loss=1e-3, hint=hint)
    assert dict(path_counts) == {"hinted": 1, "hint_mismatch": 1, "recompute": 1}
    # every token ignored: all gradients are 0 whatever g
    case = make_case(64, 16, 300, 3, bias=True, ignore_frac=1.1, seed=6)
    _, _, grads = check_against_reference(case, "torch", hint=torch.ones(3))
    assert all(g.abs().sum() == 0 for g in grads)


def test_hint_no_ignored_tokens_and_zero_upstream(small_blocks, path_counts):
    # every token active (grad_hidden kept as the full [N, H]) and g = 0 on two tasks
    case = make_case(300, 33, 4001, 4, ignore_frac=0.0, seed=7)
    hint = torch.tensor([0.0, 1.5, 0.0, -0.7])
    case["upstream"] = -2.0 * hint
    check_against_reference(case, "torch", label_smoothing=0.1, chunk_tokens=64, hint=hint)
    assert dict(path_counts) == {"hinted": 1}


def test_hint_only_when_a_gradient_follows(path_counts, monkeypatch):
    case = make_case(100, 16, 500, 2, bias=True, seed=10)
    args = (case["labels"], case["task_ids"], 2)
    hint = torch.tensor([1.0, 2.0])

    def no_hinted_forward(*a, **k):
        raise AssertionError("the hinted forward ran without a gradient to compute")

    with monkeypatch.context() as m:
        m.setattr(flce, "_forward_hinted", no_hinted_forward)
        with torch.no_grad():
            loss, _ = fused_linear_task_cross_entropy(case["hidden"].clone().requires_grad_(), case["weight"],
                                                      *args, bias=case["bias"], backend="torch",
                                                      grad_scale_hint=hint)
        # nothing requires grad
        fused_linear_task_cross_entropy(case["hidden"], case["weight"], *args, bias=case["bias"], backend="torch",
                                        grad_scale_hint=hint)
    # only hidden requires grad: only its gradient is kept, and it matches the reference
    hidden = case["hidden"].detach().clone().requires_grad_()
    got, _ = fused_linear_task_cross_entropy(hidden, case["weight"], *args, bias=case["bias"], backend="torch",
                                             grad_scale_hint=hint)
    torch.testing.assert_close(got.detach(), loss)
    (g_got,) = torch.autograd.grad((got * hint * 0.3).sum(), [hidden])
    ref, _ = reference_linear_task_cross_entropy(hidden, case["weight"], *args, bias=case["bias"])
    (g_ref,) = torch.autograd.grad((ref * hint * 0.3).sum(), [hidden])
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)
    assert dict(path_counts) == {"hinted": 1}
    with pytest.raises(ValueError, match="grad_scale_hint must be"):
        fused_linear_task_cross_entropy(hidden, case["weight"], *args, grad_scale_hint=torch.ones(3))


def test_hint_second_backward_recomputes(path_counts):
    # the kept gradients are handed out once; retain_graph + a second backward recomputes
    case = make_case(120, 20, 700, 3, seed=15)
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    hint = torch.tensor([1.0, 0.5, 2.0])
    loss, _ = fused_linear_task_cross_entropy(hidden, weight, case["labels"], case["task_ids"], 3,
                                              backend="torch", grad_scale_hint=hint)
    first = torch.autograd.grad((loss * hint).sum(), [hidden, weight], retain_graph=True)
    second = torch.autograd.grad((loss * hint).sum(), [hidden, weight])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    assert dict(path_counts) == {"hinted": 1, "recompute": 1}


# --------------------------------------------------------------------------------------
# Memory of the hinted path: token blocks of model.loss_chunk_tokens, in-place accumulation
# --------------------------------------------------------------------------------------


def _record_blocks(monkeypatch):
    rows = []
    real = flce._linear_block

    def spy(h, w, b, buf):
        rows.append((h.shape[0], w.shape[0]))
        return real(h, w, b, buf)

    monkeypatch.setattr(flce, "_linear_block", spy)
    return rows


def test_hinted_token_block_honours_chunk_tokens(monkeypatch):
    case = make_case(100, 16, 300, 3, ignore_frac=0.0, seed=23)
    hint = torch.tensor([1.0, 0.5, 2.0])
    for chunk_tokens, want in ((37, [37, 37, 26]), (None, [6] * 16 + [4]), (500, [100])):
        monkeypatch.setitem(flce._BLOCK_ELEMENTS, "cpu", 2048)  # default block: 2048 // 300 = 6 tokens
        rows = _record_blocks(monkeypatch)
        hidden = case["hidden"].clone().requires_grad_()
        fused_linear_task_cross_entropy(hidden, case["weight"], case["labels"], case["task_ids"], 3,
                                        backend="torch", chunk_tokens=chunk_tokens, grad_scale_hint=hint)
        assert rows == [(n, 300) for n in want], (chunk_tokens, rows)


class _AllocationRecorder:
    """Every allocation made while active, as (op, bytes): torch's profiler with
    ``profile_memory`` records each op's own allocations, also the temporaries an op makes
    inside (e.g. ``torch.mul(fp32, out=<bf16>)`` computing into a hidden fp32 tensor)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.allocations = [(e.name, e.self_cpu_memory_usage) for e in self._prof.events()
                            if e.self_cpu_memory_usage > 0 and e.name != "[memory]"]


def test_hinted_forward_in_bf16_accumulates_in_place(monkeypatch):
    """Measured proxy for the GPU memory peak: every allocation of the bf16 hinted forward and
    backward is recorded (torch's profiler, temporaries inside ops included). Exactly one fp32 tensor of V·H elements may exist —
    the grad_weight accumulator of the forward; every other temporary stays at most
    _SLAB_ELEMENTS (patched small so that the slab loops run), whatever the number of token
    blocks, and the backward creates no fp32 tensor of that size."""
    v, h = 1000, 32
    monkeypatch.setitem(flce._SLAB_ELEMENTS, "cpu", 8192)
    case = make_case(120, h, v, 3, dtype=torch.bfloat16, ignore_frac=0.2, seed=24)
    hint = torch.tensor([1e-5, 3e-6, 2e-5])
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    fp32_vh = 4 * v * h
    with _AllocationRecorder() as rec:
        loss, _ = fused_linear_task_cross_entropy(hidden, weight, case["labels"], case["task_ids"], 3,
                                                  backend="torch", chunk_tokens=16, grad_scale_hint=hint)
    big = [a for a in rec.allocations if a[1] >= fp32_vh]
    assert len(big) == 1 and big[0][1] == fp32_vh, big  # the grad_weight accumulator
    block_fp32 = 4 * 16 * v  # the torch path's fp32 working copy of one [16, V] logits block
    others = [n for _, n in rec.allocations if n < fp32_vh]
    assert max(others) <= max(4 * 8192, block_fp32, 4 * 120 * h), sorted(others)[-5:]
    # the backward returns the kept gradients scaled, in bf16: no fp32 [V, H] temporary either
    # (torch.mul(fp32, out=<bf16>) would make one)
    g = 4.0 * hint
    with _AllocationRecorder() as rec:
        got = torch.autograd.grad((loss * g).sum(), [hidden, weight])
    assert max(n for _, n in rec.allocations) == 2 * v * h, sorted(rec.allocations, key=lambda a: a[1])[-3:]
    # and the gradients are right (against float64)
    ref_h, ref_w = (x.double().detach().requires_grad_() for x in (case["hidden"], case["weight"]))
    ref, _ = reference_linear_task_cross_entropy(ref_h, ref_w, case["labels"], case["task_ids"], 3)
    want = torch.autograd.grad((ref * g.double()).sum(), [ref_h, ref_w])
    for a, b in zip(got, want):
        assert float((a.double() - b).norm() / b.norm()) < 1e-2


def test_add_mm_slabs_for_the_fp32_output_gemm(monkeypatch):
    """The CUDA branch of _add_mm_ (fp32-output GEMM on slabs of rows), proven on the CPU with
    a stand-in GEMM that records its operands' shapes: slabs tile the rows, each product has at
    most _SLAB_ELEMENTS elements, and the sum equals float64."""
    calls = []

    def gemm(a, b):
        calls.append((a.shape[0], b.shape[1]))
        return a.float() @ b.float()

    monkeypatch.setitem(flce._SLAB_ELEMENTS, "cpu", 1000)  # the stand-in runs on CPU tensors
    monkeypatch.setattr(flce, "_has_fp32_output_gemm", lambda a: True)
    monkeypatch.setattr(flce, "_gemm_fp32_out", gemm)
    gen = torch.Generator().manual_seed(25)
    a = torch.randn(301, 17, generator=gen).bfloat16()
    b = torch.randn(17, 45, generator=gen).bfloat16()
    out = torch.randn(301, 45, generator=gen)
    want = out.double() + a.double() @ b.double()
    flce._add_mm_(out, a, b)
    assert sum(m for m, _ in calls) == 301 and all(m * n <= 1000 for m, n in calls) and len(calls) == 14
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)
    # and the upcast branch (CPU, or torch without out_dtype): slabs along the contraction
    monkeypatch.setattr(flce, "_has_fp32_output_gemm", lambda a: False)
    out2 = want.float() * 0 + out  # a copy
    flce._add_mm_(out2, a, b)
    torch.testing.assert_close(out2.double(), want + a.double() @ b.double(), rtol=1e-6, atol=1e-5)
