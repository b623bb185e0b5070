"""fused_linear_task_cross_entropy (torch backend, the CPU path) against the unfused reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_ce_cases import IGNORE, check_against_reference, make_case

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream,path", [("hint", "hinted"), ("scaled", "hinted"), ("unrelated", "recompute")])
def test_hint_fast_path_and_fallback(small_blocks, path_counts, dtype, upstream, path):
    # odd shapes, bias, 30% ignored tokens, label smoothing and z-loss; 64-token blocks of whole
    # vocabulary rows in the hinted forward (7 blocks, the last one partial)
    case = make_case(423, 37, 5003, 5, dtype=dtype, bias=True, seed=13)
    hint = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.1
    case["upstream"] = {"hint": hint, "scaled": 3.7 * hint, "unrelated": case["upstream"]}[upstream]
    check_against_reference(case, "torch", label_smoothing=0.1, z_loss=1e-3, chunk_tokens=64, hint=hint)
    assert dict(path_counts) == {path: 1}


def test_hint_tasks_without_tokens_are_dont_care(path_counts):
    # tasks 1 and 3 have no tokens: g may differ from c·hint there (and hint may be 0 there),
    # the fast path still applies; a zero hint on a task *with* tokens forces g_t = 0 there
    case = make_case(200, 24, 999, 5, tasks=[0, 2, 4], seed=14)
    hint = torch.tensor([0.5, 0.0, 2.0, 9.0, 0.25])
    case["upstream"] = torch.tensor([1.0, -7.0, 4.0, 3.0, 0.5])  # 2·hint on tasks 0, 2, 4
    check_against_reference(case, "torch", label_smoothing=0.05, hint=hint)
    hint = torch.tensor([0.5, 1.0, 0.0, 1.0, 0.25])  # task 2 has tokens and hint 0, but g_2 = 4
    check_against_reference(case, "torch", z_loss=1e-3, hint=hint)
    assert dict(path_counts) == {"hinted": 1, "recompute": 1}
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
