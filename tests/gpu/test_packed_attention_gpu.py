"""Packed attention on a real GPU (skipped without CUDA): the varlen kernels keep the
examples of a micro-batch of several rows apart.

- ``flash_attention_2`` (when flash-attn is installed): ``flash_attn_varlen_func``;
- ``sdpa`` in bf16: ``torch.nn.attention.varlen.varlen_attn`` when this torch has it, else
  the per-segment SDPA path.

Each checks, on a Llama with grouped-query attention in bf16, B=4 rows of 512 tokens packed
by megamt's packer from examples of odd lengths: the varlen kernel ran (once per layer),
packed per-task losses and gradients equal each example alone through transformers' eager
attention (bf16 tolerances), and rewriting one example moves no other example's logits.
Self-contained: run with ``pytest tests/gpu`` (tools/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB, T, B, L = 1031, 3, 4, 512


def _model(impl: str):
    from megamt.config import ModelConfig, MultitaskConfig, TaskConfig
    from megamt.model import MultitaskModel

    torch.manual_seed(0)
    fc = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": L}
    cfg = MultitaskConfig(tasks={n: TaskConfig() for n in "abc"},
                          model=ModelConfig(from_config=fc, fused_loss=False, attn_implementation=impl, dtype="bf16"))
    return MultitaskModel(cfg).cuda().eval()


def _rows(seed: int):
    from megamt.data.packing import PackItem, Packer

    rng = random.Random(seed)
    packer = Packer(L, buffer_size=256)
    for _ in range(40 * B):
        n_prompt, n_target = rng.randint(5, 120), rng.randint(1, 41)
        toks = np.array([rng.randrange(3, VOCAB) for _ in range(n_prompt + n_target)], dtype=np.int64)
        packer.add(PackItem(toks, rng.randrange(T), n_prompt=n_prompt))
    rows = [packer.pop_row() for _ in range(B)]
    assert all(len(r) >= 3 for r in rows)
    return rows


def _cuda(batch):
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@contextlib.contextmanager
def _counting(monkeypatch, name):
    from megamt import attention

    calls = []
    original = getattr(attention, name)
    monkeypatch.setattr(attention, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    yield calls


def _loss_and_grads(model, batches, weights):
    model.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(T, device="cuda")
    for batch in batches:
        out = model(batch)
        (out.loss_sum * weights).sum().backward()
        loss_sum += out.loss_sum.detach()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss_sum, grads


@pytest.mark.parametrize("impl", ["flash_attention_2", "sdpa"])
def test_packed_varlen_equals_per_example_on_gpu(impl, monkeypatch):
    from megamt import attention
    from megamt.data.packing import collate_rows

    if impl == "flash_attention_2" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed")
    kernel = "_flash_varlen" if impl == "flash_attention_2" else "_torch_varlen"
    if impl == "sdpa" and attention._torch_varlen_function() is None:
        kernel = "per_segment_attention"  # this torch has no varlen_attn: the per-segment path
    model = _model(impl)
    rows = _rows(seed=1)
    batch = _cuda(collate_rows(rows, L, 0))
    weights = torch.tensor([0.7, 1.3, 0.4], device="cuda")
    with _counting(monkeypatch, kernel) as calls:
        packed, packed_grads = _loss_and_grads(model, [batch], weights)
    assert len(calls) == 3, f"{kernel} ran {len(calls)} times for 3 layers"

    before = model.backbone.config._attn_implementation
    model.backbone.set_attn_implementation("eager")
    singles = [_cuda(collate_rows([[item]], len(item), 0)) for row in rows for item in row]
    reference, ref_grads = _loss_and_grads(model, singles, weights)
    model.backbone.set_attn_implementation(before)

    # bf16 activations: the per-task sums of a few hundred CE terms agree to ~1%
    torch.testing.assert_close(packed, reference, rtol=2e-2, atol=1e-1)
    for n, g in packed_grads.items():
        err = (g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-6)
        assert err < 5e-2, f"{impl}: gradient of {n} off by {err:.3g} (relative norm)"

    # rewrite one example in the middle of row 0: nothing else moves
    start = len(rows[0][0])
    span = slice(start, start + len(rows[0][1]))
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    changed["input_ids"][0, span] = (changed["input_ids"][0, span] + 7) % (VOCAB - 3) + 3
    with torch.no_grad():
        a, b = model.logits(batch).float(), model.logits(changed).float()
    inside = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    inside[0, span] = True
    diff = (a - b).abs().amax(-1)
    assert float(diff[~inside].max()) <= 1e-3 * float(a.abs().max()), "another example moved"
    assert float(diff[inside].max()) > 1e-2
