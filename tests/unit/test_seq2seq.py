"""Encoder-decoders (T5, mT5, BART, mBART) on packed seq2seq batches (megamt/seq2seq.py).

The reference of every equality is each example alone through the Hugging Face model's own
forward (``model(input_ids=prompt, labels=target)``: its own shift, masks, positions and LM
head), independent of megamt's packing code. Batches come from the real packer
(``Seq2SeqPacker`` + ``collate_seq2seq_rows``) with odd lengths and a seed drawn fresh on
each run (printed on failure).

GPU-only paths are proven on the CPU by design: a stand-in ``flash_attn`` module records
every ``flash_attn_varlen_func`` call (and computes attention pair by pair with plain torch,
flash-attn's documented contract for ``cu_seqlens_q`` / ``cu_seqlens_k``), and a stand-in for
PyTorch's ``varlen_attn`` with megamt's "CUDA, half precision" gate opened.
"""

from __future__ import annotations

import importlib.machinery
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamt import attention
from megamt.config import ConfigError, LoraConfig, ModelConfig, MultitaskConfig, TaskConfig
from megamt.data.packing import PackItem, Seq2SeqPacker, collate_seq2seq_rows, non_pad_tokens, seq2seq_item
from megamt.model import MultitaskModel, resolve_family
from megamt.seq2seq import decoder_inputs, packed_masks

SEED = random.SystemRandom().randrange(1 << 30)
VOCAB, T = 61, 3
T5 = dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
BART = dict(model_type="bart", vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            decoder_start_token_id=2, pad_token_id=1, eos_token_id=2, bos_token_id=0, forced_eos_token_id=None)
MODELS = {
    "t5": T5,
    # T5 v1.1 style: untied LM head, gated activation, no output rescaling
    "t5_untied": {**T5, "tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"},
    "mt5": {**T5, "model_type": "mt5"},
    "bart": BART,
    "mbart": {**BART, "model_type": "mbart"},
}
ENC_LEN, DEC_LEN = 29, 13


@pytest.fixture
def mask_path(monkeypatch):
    """T5-like models take the 4-D mask path (what they do on CUDA) instead of the per-example one."""
    from megamt import seq2seq

    monkeypatch.setattr(seq2seq, "resolve_packing", lambda model_type: "mask")


def build(kind: str, impl: str = "sdpa", fused: bool = True, tasks: int = T) -> MultitaskModel:
    torch.manual_seed(SEED)
    cfg = MultitaskConfig(tasks={f"t{i}": TaskConfig() for i in range(tasks)},
                          model=ModelConfig(from_config=dict(MODELS[kind]), attn_implementation=impl,
                                            fused_loss=fused))
    model = MultitaskModel(cfg).eval()  # no dropout: the equalities are exact
    with torch.no_grad():  # BART initialises final_logits_bias to zeros: make it count
        bias = getattr(model.backbone, "final_logits_bias", None)
        if bias is not None:
            bias.normal_()
    return model


def random_items(rng: np.random.Generator, n: int, eos: int, pad: int) -> list[PackItem]:
    items = []
    for i in range(n):
        prompt = rng.integers(3, VOCAB, rng.integers(1, 11))
        target = rng.integers(3, VOCAB, rng.integers(0, 6))
        items.append(seq2seq_item({"prompt_ids": prompt, "target_ids": np.concatenate([target, [eos]]),
                                   "__key__": f"ex{i}"}, int(rng.integers(T)), eos))
    return items


def packed_batch(items: list[PackItem], pad: int, buffer: int = 5) -> tuple[dict, list[list[PackItem]]]:
    packer = Seq2SeqPacker(ENC_LEN, DEC_LEN, buffer_size=buffer)
    rows = []
    for it in items:
        assert packer.add(it)
        if packer.full:
            rows.append(packer.pop_row())
    while len(packer):
        rows.append(packer.pop_row())
    return collate_seq2seq_rows(rows, ENC_LEN, DEC_LEN, pad, num_rows=len(rows) + 1), rows


def reference(model: MultitaskModel, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task summed CE and counts, each example alone through the HF model's own forward."""
    loss, count = torch.zeros(model.num_tasks), torch.zeros(model.num_tasks)
    for row in rows:
        for it in row:
            out = model.backbone(input_ids=torch.tensor(it.tokens)[None], labels=torch.tensor(it.dec)[None])
            loss[it.task_id] += F.cross_entropy(out.logits[0].float(), torch.tensor(it.dec), reduction="sum")
            count[it.task_id] += len(it.dec)
    return loss, count


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_equal(model, items, pad):
    batch, rows = packed_batch(items, pad)
    assert len(rows) >= 3 and max(len(r) for r in rows) >= 2, "the batch must pack several examples per row"
    model.zero_grad()
    tl = model(batch)
    tl.loss_sum.sum().backward()
    packed = _grads(model)
    model.zero_grad()
    ref_loss, ref_count = reference(model, rows)
    ref_loss.sum().backward()
    ref = _grads(model)
    assert torch.equal(tl.count, ref_count)
    torch.testing.assert_close(tl.loss_sum, ref_loss, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {SEED}: {m}")
    assert packed.keys() == ref.keys()
    for name in ref:
        scale = max(1.0, float(ref[name].abs().max()))
        diff = float((packed[name] - ref[name]).abs().max())
        assert diff <= 1e-5 * scale, f"seed {SEED}: {name} grad differs by {diff}"


# --------------------------------------------------------------------------- packed == unpacked


@pytest.mark.parametrize("kind,impl,path", [
    ("t5", "sdpa", "varlen"), ("t5", "eager", "varlen"), ("t5", "sdpa", "mask"), ("t5", "eager", "mask"),
    ("bart", "sdpa", "varlen"), ("bart", "eager", "varlen"), ("t5_untied", "sdpa", "varlen"),
    ("mt5", "eager", "mask"), ("mbart", "sdpa", "varlen")])
def test_packed_loss_and_gradients_equal_unpacked(kind, impl, path, request):
    """fp32, fused per-task loss: the packed batch's per-task loss sums and every parameter's
    gradient equal those of the examples run one by one (<= 1e-5), on both packing paths
    (T5: per-example attention with its bias block on CPUs, 4-D masks on CUDA)."""
    if path == "mask":
        request.getfixturevalue("mask_path")
    model = build(kind, impl)
    from megamt.seq2seq import packing_mode

    assert packing_mode(model.backbone) == path
    cfg = model.backbone.config
    assert model.fused_loss
    _check_equal(model, random_items(np.random.default_rng(SEED), 14, cfg.eos_token_id, cfg.pad_token_id),
                 cfg.pad_token_id)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_unfused_loss_equals_fused(kind):
    fused, unfused = build(kind, fused=True), build(kind, fused=False)
    assert not unfused.fused_loss
    cfg = fused.backbone.config
    batch, _ = packed_batch(random_items(np.random.default_rng(SEED), 12, cfg.eos_token_id, cfg.pad_token_id),
                            cfg.pad_token_id)
    torch.testing.assert_close(fused(batch).loss_sum, unfused(batch).loss_sum, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GPU paths, by stand-ins


def _pairs_attention(q, k, v, cu_q, cu_k, scale, causal):
    out = []
    for s, e, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        if e == s:
            continue
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[ks:ke]) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(e - s, ke - ks, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks:ke]))
    return torch.cat(out)


class FlashStandIn(types.ModuleType):
    """``flash_attn.flash_attn_varlen_func`` by its contract (pairs of q/k segments), recording calls."""

    def __init__(self):
        super().__init__("flash_attn")
        self.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
        self.calls: list[dict] = []

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, **unused):
        self.calls.append({"cu_q": cu_seqlens_q.tolist(), "cu_k": cu_seqlens_k.tolist(), "max_q": max_seqlen_q,
                           "max_k": max_seqlen_k, "causal": causal, "nq": q.shape[0], "nk": k.shape[0]})
        return _pairs_attention(q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), softmax_scale, causal)


def test_bart_flash_attention_varlen_pairs_decoder_and_encoder_segments(monkeypatch):
    """flash_attention_2 on BART: every attention call is flash-attn's varlen kernel; the
    cross-attention calls get cu_seqlens_q from the decoder side and cu_seqlens_k from the
    encoder side (the packer's pairs), self-attention the side's own boundaries; the loss and
    gradients still equal the unpacked computation."""
    flash = FlashStandIn()
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    model = build("bart", "flash_attention_2")
    items = random_items(np.random.default_rng(SEED), 14, 2, 1)
    _check_equal(model, items, 1)
    batch, _ = packed_batch(items, 1)
    flash.calls.clear()
    with torch.no_grad():
        model(batch)
    layers = 2
    enc_cu, dec_cu = batch["cu_seqlens"].tolist(), batch["decoder_cu_seqlens"].tolist()
    cross_q, cross_k = batch["cross_cu_seqlens_q"].tolist(), batch["cross_cu_seqlens_k"].tolist()
    kinds = [("enc" if c["cu_q"] == enc_cu and c["cu_k"] == enc_cu and not c["causal"] else
              "dec" if c["cu_q"] == dec_cu and c["cu_k"] == dec_cu and c["causal"] else
              "cross" if c["cu_q"] == cross_q and c["cu_k"] == cross_k and not c["causal"] else "?")
             for c in flash.calls]
    assert kinds == ["enc"] * layers + ["dec", "cross"] * layers, kinds
    cross = flash.calls[layers + 1]
    assert cross["nq"] == batch["labels"].numel() and cross["nk"] == batch["input_ids"].numel()
    assert cross["max_q"] == batch["cross_max_seqlen_q"] and cross["max_k"] == batch["cross_max_seqlen_k"]


def test_bart_torch_varlen_path(monkeypatch):
    """sdpa on CUDA in half precision takes PyTorch's varlen kernel, cross-attention included
    (stand-in; the gate opened on the CPU)."""
    calls = []

    def varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append((cu_q.tolist(), cu_k.tolist(), window_size))
        return _pairs_attention(query, key, value, cu_q.tolist(), cu_k.tolist(), scale, window_size[1] == 0)

    monkeypatch.setattr(attention, "_use_torch_varlen", lambda *a: True)
    monkeypatch.setattr(attention, "_torch_varlen_function", lambda: varlen)
    model = build("bart", "sdpa")
    items = random_items(np.random.default_rng(SEED), 14, 2, 1)
    _check_equal(model, items, 1)
    batch, _ = packed_batch(items, 1)
    assert any(q == batch["cross_cu_seqlens_q"].tolist() and k == batch["cross_cu_seqlens_k"].tolist()
               and w == (-1, -1) for q, k, w in calls)


def test_t5_refuses_flash_attention():
    with pytest.raises(ConfigError, match="relative-position bias"):
        build("t5", "flash_attention_2")


# --------------------------------------------------------------------------- decoder inputs, buckets


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_decoder_inputs_are_targets_shifted_right_within_each_example(kind):
    model = build(kind)
    cfg = model.backbone.config
    batch, rows = packed_batch(random_items(np.random.default_rng(SEED), 12, cfg.eos_token_id, cfg.pad_token_id),
                               cfg.pad_token_id)
    dec_in = decoder_inputs(model.backbone, batch)
    for b, row in enumerate(rows):
        o = 0
        for it in row:
            want = [cfg.decoder_start_token_id] + it.dec[:-1].tolist()
            assert dec_in[b, o:o + len(it.dec)].tolist() == want
            assert batch["labels"][b, o:o + len(it.dec)].tolist() == it.dec.tolist()
            o += len(it.dec)
        assert (dec_in[b, o:] == cfg.pad_token_id).all() and (batch["labels"][b, o:] == -100).all()
    assert (dec_in[len(rows):] == cfg.pad_token_id).all()  # the all-padding row


def test_t5_relative_position_buckets_only_within_examples(mask_path):
    """Mask path: what T5's attention adds to its scores in a packed forward (the relative-
    position bias it computed + the mask it got), captured in the first self-attention of both
    stacks: for two tokens of one example, the bias of the example alone at their in-example
    distance; for tokens of two examples, the mask's minimum (no bucket of a cross-example
    distance reaches the softmax)."""
    model = build("t5", "eager")
    cfg = model.backbone.config
    batch, rows = packed_batch(random_items(np.random.default_rng(SEED), 12, 1, 0), 0)
    seen = {}

    def hook(side):
        def fn(module, args, kwargs, out):
            seen[side] = (out[1].detach(), kwargs["mask"].detach())
        return fn

    handles = [model.backbone.encoder.block[0].layer[0].SelfAttention.register_forward_hook(hook("enc"),
                                                                                           with_kwargs=True),
               model.backbone.decoder.block[0].layer[0].SelfAttention.register_forward_hook(hook("dec"),
                                                                                           with_kwargs=True)]
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    low = torch.finfo(torch.float32).min / 2
    for side, attn, lens in (("enc", model.backbone.encoder.block[0].layer[0].SelfAttention, "tokens"),
                             ("dec", model.backbone.decoder.block[0].layer[0].SelfAttention, "dec")):
        bias, mask = seen[side]
        for b, row in enumerate(rows):
            o = 0
            for it in row:
                n = len(getattr(it, lens))
                alone = attn.compute_bias(n, n)[0]  # [H, n, n], the example by itself
                got = (bias[0] + mask[b])[:, o:o + n, o:o + n]
                if side == "dec":  # causal: only keys not after the query carry the bias
                    keep = torch.ones(n, n, dtype=torch.bool).tril()
                    assert torch.equal(got[:, keep], alone[:, keep]) and (got[:, ~keep] < low).all()
                else:
                    assert torch.equal(got, alone)
                others = torch.ones(mask.shape[-1], dtype=torch.bool)
                others[o:o + n] = False
                assert (mask[b, 0, o:o + n][:, others] < low).all()
                o += n
    assert cfg.relative_attention_num_buckets == 8


def test_t5_per_example_path_gets_each_examples_own_bias(monkeypatch):
    """Per-example path (CPUs): every attention call of the first encoder / decoder layer gets
    one example's queries and the bias of that example alone (``compute_bias(n, n)``), never a
    block spanning two examples."""
    import transformers.integrations.sdpa_attention as sdpa

    model = build("t5", "sdpa")
    batch, rows = packed_batch(random_items(np.random.default_rng(SEED), 12, 1, 0), 0)
    first = {model.backbone.encoder.block[0].layer[0].SelfAttention: "cu_seqlens",
             model.backbone.decoder.block[0].layer[0].SelfAttention: "decoder_cu_seqlens"}
    seen = {m: [] for m in first}
    original = sdpa.sdpa_attention_forward

    def recording(module, query, key, value, mask, **kw):
        if module in seen:
            seen[module].append((query.shape[2], key.shape[2], kw["position_bias"].detach().clone()))
        return original(module, query, key, value, mask, **kw)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", recording)
    with torch.no_grad():
        model(batch)
    for module, cu in first.items():
        segments = batch[cu].diff().tolist()  # every example and padding run, in order
        assert [(nq, nk) for nq, nk, _ in seen[module]] == [(n, n) for n in segments]
        assert sorted(len(it.tokens if cu == "cu_seqlens" else it.dec) for row in rows for it in row) == sorted(
            n for n, seg in zip(segments, _segment_owners(batch, cu)) if seg >= 0)
        for n, _, bias in seen[module]:
            assert torch.equal(bias, module.compute_bias(n, n))


def _segment_owners(batch, cu: str) -> list[int]:
    """The segment id (example index, -1 = padding) of each segment of ``batch[cu]``."""
    seg = (batch["segment_ids"] if cu == "cu_seqlens" else batch["decoder_segment_ids"]).reshape(-1)
    return [int(seg[s]) for s in batch[cu][:-1].tolist()]


def test_packed_masks_pair_decoder_and_encoder_examples():
    batch, rows = packed_batch(random_items(np.random.default_rng(SEED), 12, 1, 0), 0)
    masks = packed_masks(batch, torch.float32)
    enc, dec = batch["segment_ids"], batch["decoder_segment_ids"]
    attend = masks.cross[:, 0] == 0
    for b in range(enc.shape[0]):
        for i in range(dec.shape[1]):
            want = (enc[b] == dec[b, i]) if dec[b, i] >= 0 else torch.ones_like(enc[b], dtype=torch.bool)
            assert torch.equal(attend[b, i], want)
    assert ((masks.decoder[:, 0] == 0).sum(-1) >= 1).all()  # no all-masked query row


# --------------------------------------------------------------------------- the packer


def test_seq2seq_packer_fills_both_sides_and_pairs_segments():
    rng = np.random.default_rng(SEED)
    items = random_items(rng, 60, 1, 0)
    batch, rows = packed_batch(items, 0, buffer=8)
    keys = sorted(it.key for row in rows for it in row)
    assert keys == sorted(it.key for it in items)  # every example once, never split
    for row in rows:
        assert sum(len(it.tokens) for it in row) <= ENC_LEN and sum(len(it.dec) for it in row) <= DEC_LEN
    # cross pairs: one per example (+ padding), in the same order on both sides
    cq, ck = batch["cross_cu_seqlens_q"], batch["cross_cu_seqlens_k"]
    assert cq.numel() == ck.numel() and int(cq[-1]) == batch["labels"].numel() and int(ck[-1]) == batch[
        "input_ids"].numel()
    assert (cq[1:] >= cq[:-1]).all() and (ck[1:] >= ck[:-1]).all()
    dec_seg, enc_seg = batch["decoder_segment_ids"].reshape(-1), batch["segment_ids"].reshape(-1)
    q, k = cq.tolist(), ck.tolist()
    for s, e, ks, ke in zip(q[:-1], q[1:], k[:-1], k[1:]):
        if e > s and ke > ks:
            ex = dec_seg[s]
            assert (enc_seg[ks:ke] == ex).all()  # the pair's keys are one example (or padding) alone
            real = dec_seg[s:e]
            assert ((real == ex) | (real < 0)).all()  # its queries: that example (+ trailing padding)
    assert non_pad_tokens(batch) == sum(len(it.tokens) + len(it.dec) for it in items)
    # a row is closed only when no buffered example fits both of its remaining rooms
    packer = Seq2SeqPacker(ENC_LEN, DEC_LEN, buffer_size=8)
    for it in items:
        packer.add(it)
        if packer.full:
            row = packer.pop_row()
            room, room_dec = ENC_LEN - sum(len(x) for x in row), DEC_LEN - sum(len(x.dec) for x in row)
            assert not any(len(x) <= room and len(x.dec) <= room_dec for x in packer._items.values())


def test_seq2seq_packer_overlong_targets_and_state():
    p = Seq2SeqPacker(10, 4, buffer_size=8, overlong="truncate")
    long_t = PackItem(np.arange(3, 8), 0, key="t", dec=np.array([5, 6, 7, 8, 9, 1]))
    long_p = PackItem(np.array([9] + list(range(3, 16)) + [1]), 1, key="p", dec=np.array([4, 1]))
    assert p.add(long_t) and p.add(long_p)
    assert p.stats["truncated_target"] == 1 and p.stats["truncated"] == 1
    state = p.state_dict()
    q = Seq2SeqPacker(10, 4, buffer_size=8)
    q.load_state_dict(state)
    rows = [q.pop_row(), q.pop_row()]
    cut_t, cut_p = rows[0][0], rows[1][0]
    assert cut_t.dec.tolist() == [5, 6, 7, 8]                      # targets cut from the right
    assert cut_p.tokens.tolist() == [9] + list(range(8, 16)) + [1]  # prompts: first token + the end
    r = Seq2SeqPacker(10, 4, overlong="reject")
    assert not r.add(long_t) and not r.add(long_p)
    assert r.stats["overlong_target"] == 1 and r.stats["overlong"] == 1 and len(r) == 0


# --------------------------------------------------------------------------- configuration and bad input


def test_family_and_objective_detected_from_is_encoder_decoder(tmp_path):
    from megamt.data.pipeline import resolve_objective

    for kind in ("t5", "bart"):
        mc = ModelConfig(from_config=dict(MODELS[kind]))
        assert resolve_family(mc) == "seq2seq"
        assert resolve_objective(MultitaskConfig(model=mc)) == "seq2seq"
    folder = tmp_path / "t5"
    build("t5").backbone.save_pretrained(folder)
    mc = ModelConfig(name_or_path=str(folder))
    assert resolve_family(mc) == "seq2seq" and resolve_objective(MultitaskConfig(model=mc)) == "seq2seq"
    assert resolve_objective(MultitaskConfig(model=ModelConfig(from_config={"model_type": "llama"}))) == "causal_lm"


def test_missing_decoder_start_token_names_the_key(tmp_path):
    folder = tmp_path / "no_start"
    model = build("t5").backbone
    model.config.decoder_start_token_id = None
    model.save_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"no_start/config.json\): decoder_start_token_id is not set"):
        MultitaskModel(MultitaskConfig(tasks={"a": TaskConfig()}, model=ModelConfig(name_or_path=str(folder))))


def test_encoder_only_config_as_seq2seq_is_refused():
    mc = ModelConfig(family="seq2seq", from_config={"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32,
                                                      "num_hidden_layers": 1, "num_attention_heads": 4})
    with pytest.raises(ConfigError, match="model.family: seq2seq needs an encoder-decoder.*'bert'"):
        MultitaskModel(MultitaskConfig(tasks={"a": TaskConfig()}, model=mc))


def test_unsupported_encoder_decoder_type_is_refused():
    mc = ModelConfig(from_config={"model_type": "pegasus", "vocab_size": VOCAB, "d_model": 32,
                                  "decoder_start_token_id": 0, "pad_token_id": 0})
    with pytest.raises(ConfigError, match="model_type 'pegasus' is not an encoder-decoder megamt packs"):
        MultitaskModel(MultitaskConfig(tasks={"a": TaskConfig()}, model=mc))


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from megamt.data.synthetic import build_tokenizer

    from megamt.data.tokenize import load_tokenizer

    build_tokenizer([" ".join(f"word{i}" for i in range(300))], tmp_path / "tok", vocab_size=200)
    cfg = MultitaskConfig(tasks={"a": TaskConfig()}, model=ModelConfig(from_config=dict(T5)))
    cfg.data.tokenizer = str(tmp_path / "tok")
    assert len(load_tokenizer(tmp_path / "tok")) > VOCAB
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*tok has \d+ tokens but the model's vocabulary "
                                          r"\(model.from_config: vocab_size\) holds 61"):
        MultitaskModel(cfg)


def test_lora_on_seq2seq_trains_adapters_and_merges():
    from megamt.adapters import merge_for_export

    torch.manual_seed(SEED)
    cfg = MultitaskConfig(tasks={f"t{i}": TaskConfig() for i in range(T)},
                          model=ModelConfig(from_config=dict(T5),
                                            lora=LoraConfig(enabled=True, r=4, target_modules=["q", "v"])))
    model = MultitaskModel(cfg).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch, _ = packed_batch(random_items(np.random.default_rng(SEED), 10, 1, 0), 0)
    model(batch).loss_sum.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    merged = merge_for_export(model.backbone)
    assert type(merged).__name__ == "T5ForConditionalGeneration"


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_gradnorm_representation_norms_on_the_decoder(kind):
    """GradNorm's per-task norms without G read the decoder's output (the shared trunk of an
    encoder-decoder): they equal per-task autograd references."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_grad_representation import _check

    model = build(kind).train()
    assert model.shared_trunk() is model.backbone.get_decoder()
    cfg = model.backbone.config
    batch, _ = packed_batch(random_items(np.random.default_rng(SEED), 14, cfg.eos_token_id, cfg.pad_token_id),
                            cfg.pad_token_id)
    _check(model, batch, weights=[0.7, 1.9, 1.3])
