"""Packed attention never crosses examples, for micro-batches of several rows, on every
implementation megamt can select (megamt/attention.py).

GPU-only behaviour is proven here by design:

- flash_attention_2: a stand-in ``flash_attn`` module injected into ``sys.modules`` records
  every ``flash_attn_varlen_func`` call and computes attention segment by segment with plain
  torch (flash-attn's documented contract), so the packed path runs on the CPU;
- sdpa on CUDA: a stand-in for ``torch.nn.attention.varlen.varlen_attn`` (the same kind),
  with megamt's "CUDA, half precision" gate opened;
- the reference for every equality is each example alone (one row, no padding) through
  transformers' own eager attention: independent of megamt's attention code.

Batches come from the real packer (``Packer`` + ``collate_rows``), with odd lengths and
seeds drawn fresh on each run (printed on failure).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamt import attention
from megamt.config import ModelConfig, MultitaskConfig, TaskConfig
from megamt.data.packing import PackItem, Packer, collate_rows
from megamt.model import MultitaskModel

VOCAB, T = 53, 3
SEED = random.SystemRandom().randrange(1 << 30)  # fresh inputs on every run


# --------------------------------------------------------------------------- stand-ins


def _segment_attention(q, k, v, scale, causal, left, right, softcap=0.0):
    """Plain attention of one segment, [n, H, D] -> [n, H, D], flash-attn's window semantics."""
    n, hq, d = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale if scale is not None else d ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0 and not causal:
        keep &= j <= i + right
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class FlashStandIn(types.ModuleType):
    """``flash_attn`` as megamt calls it; records (cu_seqlens_q, cu_seqlens_k, max_q, max_k,
    causal, window, q shape) of every call."""

    def __init__(self):
        super().__init__("flash_attn")
        self.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # no version: transformers ignores it
        self.calls: list[dict] = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                               softcap=0.0, **unused):
        assert dropout_p == 0.0 and not unused
        self.calls.append({"cu_q": cu_seqlens_q.clone(), "cu_k": cu_seqlens_k.clone(), "max_q": max_seqlen_q,
                           "max_k": max_seqlen_k, "causal": causal, "window": window_size, "shape": tuple(q.shape)})
        bounds = cu_seqlens_q.tolist()
        return torch.cat([_segment_attention(q[s:e], k[s:e], v[s:e], softmax_scale, causal, *window_size, softcap)
                          for s, e in zip(bounds[:-1], bounds[1:])])


class TorchVarlenStandIn:
    """``torch.nn.attention.varlen.varlen_attn`` (torch 2.13 signature), recording its calls."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False, **unused):
        self.calls.append({"cu_q": cu_seq_q.clone(), "cu_k": cu_seq_k.clone(), "max_q": max_q, "window": window_size,
                           "gqa": enable_gqa})
        causal = window_size[1] == 0  # torch: (-1, 0) is causal, (w, 0) causal within w
        bounds = cu_seq_q.tolist()
        return torch.cat([_segment_attention(query[s:e], key[s:e], value[s:e], scale, causal, window_size[0],
                                             window_size[1]) for s, e in zip(bounds[:-1], bounds[1:])])


@pytest.fixture
def flash(monkeypatch):
    stand_in = FlashStandIn()
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    return stand_in


@pytest.fixture
def torch_varlen(monkeypatch):
    stand_in = TorchVarlenStandIn()
    monkeypatch.setattr(attention, "_use_torch_varlen", lambda *a: True)
    monkeypatch.setattr(attention, "_torch_varlen_function", lambda: stand_in)
    return stand_in


# --------------------------------------------------------------------------- models and batches

CAUSAL = {
    "llama": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64},
    "gpt2": {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "bos_token_id": 1, "eos_token_id": 2},
    # a sliding window shorter than the longer examples: the window is part of each segment's mask
    "qwen2": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "use_sliding_window": True, "sliding_window": 5,
              "max_window_layers": 0},
}
ENCODER = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 64}
# every implementation megamt can select (flex_attention: its own test below, forward only)
IMPLS = ["sdpa", "eager", "flash_attention_2", "sdpa_cuda_varlen"]


def causal_model(model_type: str, impl: str) -> MultitaskModel:
    torch.manual_seed(SEED)
    cfg = MultitaskConfig(tasks={n: TaskConfig() for n in "abc"},
                          model=ModelConfig(from_config=dict(CAUSAL[model_type]), fused_loss=False,
                                            attn_implementation=impl.removesuffix("_cuda_varlen")))
    return MultitaskModel(cfg).eval()  # no dropout: the equalities are exact


def encoder_model(impl: str):
    from megamt.heads import EncoderWithHeads

    torch.manual_seed(SEED)
    tasks = {"sent": TaskConfig(task_type="classification", labels=["neg", "pos", "mid"]),
             "ner": TaskConfig(task_type="ner", labels=["PER", "LOC"]),
             "qa": TaskConfig(task_type="extractive_qa")}
    cfg = MultitaskConfig(tasks=tasks, model=ModelConfig(from_config=dict(ENCODER),
                                                         attn_implementation=impl.removesuffix("_cuda_varlen")))
    return EncoderWithHeads(cfg, head_dropout=0.0).eval()


def causal_rows(rng: random.Random, B: int, L: int) -> list[list[PackItem]]:
    packer = Packer(L, buffer_size=64)
    for _ in range(6 * B):
        n_prompt, n_target = rng.randint(2, 7), rng.randint(1, 6)  # odd and even lengths, 3..13 tokens
        toks = np.array([rng.randrange(3, VOCAB) for _ in range(n_prompt + n_target)], dtype=np.int64)
        packer.add(PackItem(toks, rng.randrange(T), n_prompt=n_prompt))
    rows = [packer.pop_row() for _ in range(B)]
    assert all(len(r) >= 2 for r in rows)
    return rows


def encoder_rows(rng: random.Random, B: int, L: int) -> list[list[PackItem]]:
    packer = Packer(L, buffer_size=64)
    for _ in range(5 * B):
        n, task = rng.randint(4, 11), rng.randrange(3)
        toks = np.array([rng.randrange(3, VOCAB) for _ in range(n)], dtype=np.int64)
        item = PackItem(toks, task)
        if task == 0:
            item.cls = rng.randrange(3)
        elif task == 1:
            item.tags = np.array([rng.randrange(5) if 0 < t < n - 1 else -100 for t in range(n)], dtype=np.int64)
        else:
            item.ctx, item.span = (2, n - 2), (3, n - 2)
        packer.add(item)
    rows = [packer.pop_row() for _ in range(B)]
    assert all(len(r) >= 2 for r in rows)
    return rows


@contextlib.contextmanager
def hf_eager(backbone):
    """transformers' own eager attention on the backbone (the reference), then back."""
    before = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")
    try:
        yield
    finally:
        backbone.set_attn_implementation(before)


def per_example_reference(model, rows, objective):
    """Loss sum/count per task and the parameter gradients of ``sum_t w_t loss_t``, each
    example alone in its own row (no padding) through transformers' eager attention."""
    model.zero_grad(set_to_none=True)
    loss_sum, count = torch.zeros(T), torch.zeros(T)
    backbone = model.backbone
    with hf_eager(backbone):
        for row in rows:
            for item in row:
                one = collate_rows([[item]], len(item), 0, objective=objective)
                assert len(one["cu_seqlens"]) == 2  # exactly one segment: no padding, no packing
                out = model(one)
                (out.loss_sum * WEIGHTS).sum().backward()
                loss_sum += out.loss_sum.detach()
                count += out.count
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss_sum, count, grads


WEIGHTS = torch.tensor([0.7, 1.3, 0.4])  # a per-task upstream gradient that is not uniform


def packed_loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out.loss_sum * WEIGHTS).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss_sum.detach(), out.count, grads


def assert_same(packed, reference, what):
    (ls, c, g), (rls, rc, rg) = packed, reference
    torch.testing.assert_close(c, rc, msg=f"{what}: counts (seed {SEED})")
    torch.testing.assert_close(ls, rls, rtol=1e-5, atol=1e-5, msg=f"{what}: loss (seed {SEED})")
    assert g.keys() == rg.keys(), what
    for n in g:
        torch.testing.assert_close(g[n], rg[n], rtol=1e-4, atol=1e-5, msg=f"{what}: grad {n} (seed {SEED})")


def _impl_fixture(request, impl):
    if impl == "flash_attention_2":
        return request.getfixturevalue("flash")
    if impl == "sdpa_cuda_varlen":
        return request.getfixturevalue("torch_varlen")
    return None


# --------------------------------------------------------------------------- (a) the kernels get the packer's boundaries


@pytest.mark.parametrize("impl", ["flash_attention_2", "sdpa_cuda_varlen"])
@pytest.mark.parametrize("family", ["causal", "encoder"])
def test_varlen_kernel_receives_the_packers_segment_boundaries(request, impl, family):
    """Stand-ins (see module doc): for a micro-batch of 3 rows, every layer's varlen call gets
    exactly the packer's cu_seqlens (q and k) and max_seqlen, on the batch's device, as int32,
    over the flattened B*L tokens -- causal for the LM, bidirectional for the encoder -- and
    the per-segment host path is never read."""
    stand_in = _impl_fixture(request, impl)
    rng = random.Random(SEED)
    if family == "causal":
        model, rows = causal_model("llama", impl), causal_rows(rng, 3, 32)
        batch = collate_rows(rows, 32, 0)
    else:
        model, rows = encoder_model(impl), encoder_rows(rng, 3, 32)
        batch = collate_rows(rows, 32, 0, objective="encoder")
    reads = []
    original = attention.HostBoundaries.get
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention.HostBoundaries, "get", lambda self: reads.append(1) or original(self))
        model(batch)
    assert len(stand_in.calls) == 2  # one per layer
    for call in stand_in.calls:
        assert call["cu_q"].dtype == torch.int32 and torch.equal(call["cu_q"], batch["cu_seqlens"])
        assert torch.equal(call["cu_k"], batch["cu_seqlens"]) and call["max_q"] == batch["max_seqlen"]
    if impl == "flash_attention_2":
        assert {c["causal"] for c in stand_in.calls} == {family == "causal"}
        assert stand_in.calls[0]["shape"] == (3 * 32, 4, 8)
    else:
        assert {tuple(c["window"]) for c in stand_in.calls} == {(-1, 0) if family == "causal" else (-1, -1)}
        assert {c["gqa"] for c in stand_in.calls} == {family == "causal"}  # llama: 2 KV heads for 4
    assert reads == []  # no host read of the boundaries on the varlen paths
    # the rows really hold several examples each (and the last row padding)
    assert len(batch["cu_seqlens"]) - 1 > 3


# --------------------------------------------------------------------------- (b) packed == per example, loss and gradients


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_packed_loss_and_gradients_equal_per_example_causal(request, model_type, impl):
    """fp32, B=3 rows of several odd-length examples from the real packer (fresh seed):
    the per-task loss sums and every parameter gradient of a non-uniform task weighting
    equal each example alone through transformers' eager attention. Qwen2 runs a sliding
    window of 5 tokens, shorter than most examples."""
    _impl_fixture(request, impl)
    model = causal_model(model_type, impl)
    assert model.backbone.config._attn_implementation == attention.PACKED_NAMES[impl.removesuffix("_cuda_varlen")]
    rows = causal_rows(random.Random(SEED), 3, 40)
    packed = packed_loss_and_grads(model, collate_rows(rows, 40, 0))
    assert_same(packed, per_example_reference(model, rows, "causal_lm"), f"{model_type}/{impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_loss_and_gradients_equal_per_example_encoder(request, impl):
    """As above for the BERT encoder with its three heads (classification, NER, span)."""
    _impl_fixture(request, impl)
    model = encoder_model(impl)
    assert model.packed_attention
    rows = encoder_rows(random.Random(SEED), 3, 40)
    packed = packed_loss_and_grads(model, collate_rows(rows, 40, 0, objective="encoder"))
    assert_same(packed, per_example_reference(model, rows, "encoder"), f"bert/{impl}")


# --------------------------------------------------------------------------- (c) no token attends across a boundary


def _outputs(model, batch):
    with torch.no_grad():
        return model.logits(batch) if isinstance(model, MultitaskModel) else model.encode(batch)


def moved_outside(model, rows, objective, L, victim=(0, 1)):
    """Perturb every token of one example (row, index) and return (max change of every
    other position, max change inside the perturbed example)."""
    batch = collate_rows(rows, L, 0, objective=objective)
    before = _outputs(model, batch)
    r, j = victim
    start = sum(len(x) for x in rows[r][:j])
    span = slice(start, start + len(rows[r][j]))
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    changed["input_ids"][r, span] = (changed["input_ids"][r, span] + 7) % (VOCAB - 3) + 3
    after = _outputs(model, changed)
    inside = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    inside[r, span] = True
    diff = (after - before).abs().amax(-1)
    return float(diff[~inside].max()), float(diff[inside].max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "encoder"])
def test_perturbing_one_example_moves_no_other(request, model_type, impl):
    """An example in the middle of row 0 is rewritten: no position of any other example (its
    row's earlier and later examples, other rows, padding) changes on any implementation,
    while its own outputs do (the check can see a change)."""
    _impl_fixture(request, impl)
    rng = random.Random(SEED)
    if model_type == "encoder":
        model, rows, objective = encoder_model(impl), encoder_rows(rng, 2, 40), "encoder"
    else:
        model, rows, objective = causal_model(model_type, impl), causal_rows(rng, 2, 40), "causal_lm"
    assert len(rows[0]) >= 3 or model_type == "encoder"
    outside, inside = moved_outside(model, rows, objective, 40)
    assert outside <= 1e-6, f"{model_type}/{impl}: another example moved by {outside} (seed {SEED})"
    assert inside > 1e-3


def test_the_perturbation_check_catches_attention_across_examples():
    """Negative control: transformers' sdpa without position ids (one causal sequence per
    row, which is what flash_attention_2 does with several rows) is caught."""
    model = causal_model("llama", "sdpa")
    model.backbone.set_attn_implementation("sdpa")
    model.packed_inputs = lambda batch: {"input_ids": batch["input_ids"], "use_cache": False}
    outside, _ = moved_outside(model, causal_rows(random.Random(SEED), 2, 40), "causal_lm", 40)
    assert outside > 1e-3


# --------------------------------------------------------------------------- no [L, L] mask, no per-layer host read


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_per_segment_path_builds_no_row_mask_and_reads_the_host_once(monkeypatch, impl):
    """The per-segment path (CPU): transformers' mask builders are never called during a
    packed forward, SDPA gets no mask at all (is_causal per segment), eager gets masks of one
    segment's size only, and the boundaries are read on the host once per forward."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model = causal_model("llama", impl)
    rows = causal_rows(random.Random(SEED), 3, 40)
    batch = collate_rows(rows, 40, 0)
    for name in ("sdpa", "eager"):
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name,
                            lambda **kw: pytest.fail("a mask builder ran during a packed forward"))
    masks, reads = [], []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **kw: masks.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **kw))
    original_get = attention.HostBoundaries.get
    monkeypatch.setattr(attention.HostBoundaries, "get",
                        lambda self: reads.append(self._list is None) or original_get(self))
    original_mask = attention._segment_mask
    monkeypatch.setattr(attention, "_segment_mask",
                        lambda n, *a: masks.append(original_mask(n, *a)) or masks[-1])
    model(batch)
    assert sum(reads) == 1 and len(reads) == 2  # one read per forward, two layers
    if impl == "sdpa":
        assert all(m is None for m in masks) and len(masks) > 0
    else:  # one [n, n] mask per segment of n tokens, n < L
        lengths = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).tolist()
        assert sorted(m.shape[-1] for m in masks) == sorted(lengths * 2) and max(lengths) < 40


# --------------------------------------------------------------------------- flex_attention (transformers' own)


def test_flex_attention_packed_forward_isolates_examples(monkeypatch):
    """flex_attention is transformers' own packed path (a block mask from the restarting
    position ids, per row). Forward only: torch refuses flex attention's backward on the CPU,
    so its gradients cannot be checked here (they run on a GPU). B=2 rows: loss equals the
    per-example reference, and a perturbed example moves no other. Block masks and flex
    attention run uncompiled (the mask function evaluated on every query/key pair, which is
    what this test is about; compiling costs ~15 s per forward here)."""
    import transformers.integrations.flex_attention as hf_flex
    import transformers.masking_utils as masking
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(masking, "create_block_mask", lambda *a, _compile=False, **kw: create_block_mask(*a, **kw))
    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    model = causal_model("llama", "flex_attention")
    assert model.backbone.config._attn_implementation == "flex_attention"
    rows = causal_rows(random.Random(SEED), 2, 40)
    with torch.no_grad():
        out = model(collate_rows(rows, 40, 0))
        ref, count = torch.zeros(T), torch.zeros(T)
        with hf_eager(model.backbone):
            for row in rows:
                for item in row:
                    one = model(collate_rows([[item]], len(item), 0))
                    ref += one.loss_sum
                    count += one.count
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.count, count)
    outside, inside = moved_outside(model, rows, "causal_lm", 40)
    assert outside <= 1e-6 and inside > 1e-3


# --------------------------------------------------------------------------- inference and configuration


def test_unpacked_calls_use_transformers_masks(flash):
    """Without packing keywords (generation with a cache, padded scoring) the packed
    implementations equal transformers' own sdpa: left-padded rows, two greedy steps."""
    from megamt.eval.generation import greedy_generate

    for impl in ("sdpa", "eager", "flash_attention_2"):
        model = causal_model("llama", impl)
        prompts = [[1, 5, 9, 11, 4], [1, 7], [1, 3, 3, 8, 20, 6, 12]]
        got = greedy_generate(model.backbone, prompts, eos_id=2, pad_id=0, max_new_tokens=3)
        model.backbone.set_attn_implementation("sdpa")
        want = greedy_generate(model.backbone, prompts, eos_id=2, pad_id=0, max_new_tokens=3)
        assert got == want, impl
    assert flash.calls == []


def test_bad_implementation_and_missing_flash_attn_are_named(monkeypatch):
    from megamt.config import ConfigError

    with pytest.raises(ConfigError, match="model.attn_implementation.*flash_attn_3"):
        causal_model("llama", "flash_attn_3")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        causal_model("llama", "flash_attention_2")


def test_implementations_that_cannot_isolate_are_refused(flash):
    """Explicit settings that would let packed examples see each other are refused, naming
    the key: flash_attention_2 on a class without AttentionInterface support (DeBERTa-v2),
    flex_attention on an encoder (no packing from position ids in bidirectional attention)."""
    from megamt.config import ConfigError

    deberta = {"model_type": "deberta-v2", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 64}
    for from_config, impl in ((deberta, "flash_attention_2"), (ENCODER, "flex_attention")):
        cfg = MultitaskConfig(tasks={"sent": TaskConfig(task_type="classification", labels=["a", "b"])},
                              model=ModelConfig(from_config=dict(from_config), attn_implementation=impl))
        from megamt.heads import EncoderWithHeads

        with pytest.raises(ConfigError, match=f"model.attn_implementation: {impl} cannot keep"):
            EncoderWithHeads(cfg)


def test_saved_model_does_not_name_megamts_implementation(tmp_path):
    """The exported config.json loads without megamt (no custom implementation name in it)."""
    model = causal_model("llama", "sdpa")
    model.save_pretrained(tmp_path)
    assert "megamt_varlen" not in (tmp_path / "config.json").read_text()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_cu_seqlens_from_segment_ids_matches_the_packer():
    rows = causal_rows(random.Random(SEED), 3, 40)
    batch = collate_rows(rows, 40, 0)
    cu, max_len = attention.cu_seqlens_from_segment_ids(batch["segment_ids"])
    assert torch.equal(cu, batch["cu_seqlens"]) and max_len == batch["max_seqlen"]
