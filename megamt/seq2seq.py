"""Encoder-decoder backbones (T5, FLAN-T5, mT5, BART, mBART) over packed seq2seq batches.

A packed seq2seq batch (megamt/data/packing.py, ``collate_seq2seq_rows``) holds the same
examples on two aligned rows: prompts (+ EOS) in the encoder row, targets (+ EOS) in the
decoder row. This module runs the backbone on it so that every example sees only itself:

- encoder self-attention within each example's encoder segment;
- decoder self-attention causal within each example's decoder segment;
- cross-attention from an example's decoder tokens to its own encoder tokens only;
- decoder inputs = the targets shifted right *within each example* (the model's
  ``decoder_start_token_id`` at each example's first position: :func:`shift_right_packed`);
- positions restart per example on both sides.

Two ways (:func:`resolve_packing`, by architecture and device):

- ``varlen``: megamt's packed attention (megamt/attention.py) on the packer's ``cu_seqlens``
  of each side, and for the cross-attention modules (marked with ``CROSS_ATTENTION_FLAG``) the
  packer's segment pairs -- flash-attn / PyTorch varlen with ``cu_seqlens_q`` from the decoder
  and ``cu_seqlens_k`` from the encoder on GPUs, one example at a time elsewhere. BART and
  mBART everywhere; T5 and mT5 on CPUs, where the per-example path also carries T5's
  relative-position bias: the bias depends only on ``key - query``, so each example gets the
  top-left block of the row's bias, exactly its own (no attention work across examples).
  BART's learned absolute positions ignore ``position_ids`` (its modules count ``0..L-1`` along
  the row): the ``embed_positions`` modules read the restarting positions during a packed
  forward (:func:`install_packed_positions`), so example ``k`` of a row gets positions ``0..n-1``.
- ``mask`` (T5 and mT5 on GPUs: their attention adds the relative-position bias in the model's
  own code, an ``[L, L]`` tensor per forward, which flash kernels cannot add; one SDPA call
  per layer over the row beats a loop over examples): 4-D additive masks -- block-diagonal for
  encoder self-attention, block-causal for decoder self-attention, decoder segment ``i`` ->
  encoder segment ``i`` for cross-attention (:func:`packed_masks`). The masks remove every
  cross-example pair, so the buckets that count are only in-example distances. sdpa or eager.

The per-task loss reads the decoder's final hidden states (times T5's ``d_model**-0.5`` when
its config says ``scale_decoder_outputs``, the tied-embedding T5) against the LM head and its
bias (BART's ``final_logits_bias``): :func:`lm_head`.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megamt.attention import (CROSS_ATTENTION_FLAG, PACKED_NAMES, build_implementation, packed_attention_kwargs,
                              packed_cross_attention_kwargs, packed_forward, register)
from megamt.config import ConfigError

PACKING = {"t5": "relative_bias", "mt5": "relative_bias", "bart": "varlen", "mbart": "varlen"}
"""Encoder-decoder model types megamt packs (tested packed == unpacked), and their kind of
attention (``relative_bias``: T5's bias added in the model's own code; see :func:`resolve_packing`)."""
CROSS_ATTENTION_NAMES = ("encoder_attn", "EncDecAttention")
"""Names of the cross-attention modules in the decoder layers (BART family, T5 family)."""

_POSITIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("megamt_seq2seq_positions", default=None)


# --------------------------------------------------------------------------- building


def check_seq2seq_config(hf_cfg, where: str) -> None:
    """Refuse a config megamt cannot train as an encoder-decoder; ``where`` names its source
    (``model.name_or_path=DIR (DIR/config.json)`` or ``model.from_config``)."""
    mt = getattr(hf_cfg, "model_type", "?")
    if not getattr(hf_cfg, "is_encoder_decoder", False):
        raise ConfigError([f"model.family: seq2seq needs an encoder-decoder, but {where} describes a {mt!r} model "
                           "that is not one (is_encoder_decoder is false); use model.family=causal_lm or encoder"])
    problems = []
    if mt not in PACKING:
        problems.append(f"{where}: model_type {mt!r} is not an encoder-decoder megamt packs (supported: "
                        f"{sorted(PACKING)}; packing must keep attention and positions inside each example)")
    for key in ("decoder_start_token_id", "pad_token_id"):
        if getattr(hf_cfg, key, None) is None:
            problems.append(f"{where}: {key} is not set; the decoder needs it (T5: the pad id, 0; BART: the EOS id, "
                            f"2) -- add it to the config")
    if problems:
        raise ConfigError(problems)


def check_tokenizer_fits(tokenizer_dir: str, hf_cfg, where: str) -> None:
    """The tokenizer's ids must be rows of the model's embedding (``data.tokenizer`` vs the model)."""
    from pathlib import Path

    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab = int(getattr(hf_cfg, "vocab_size", 0) or 0)
    if vocab and len(tok) > vocab:
        raise ConfigError([f"data.tokenizer: {tokenizer_dir} has {len(tok)} tokens but the model's vocabulary "
                           f"({where}: vocab_size) holds {vocab}: it is not this model's tokenizer; use the "
                           "tokenizer saved with the model, or build the model with vocab_size >= the tokenizer's"])


def build_seq2seq_lm(model_cfg, hf_cfg, base: str, dtype: torch.dtype, where: str):
    """``AutoModelForSeq2SeqLM`` from a local folder or a config, set up for packed forwards
    (:func:`switch_to_packed_attention`). Under an alive ``HfDeepSpeedConfig`` with ZeRO-3,
    transformers builds it inside ``deepspeed.zero.Init``."""
    from transformers import AutoModelForSeq2SeqLM

    check_seq2seq_config(hf_cfg, where)
    base = _checked_base(hf_cfg, base, explicit=model_cfg.attn_implementation != "auto")
    kwargs = dict(attn_implementation=build_implementation(base), dtype=dtype)
    if model_cfg.name_or_path:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_cfg.name_or_path, **kwargs)
    else:
        model = AutoModelForSeq2SeqLM.from_config(hf_cfg, **kwargs)
    switch_to_packed_attention(model, base)
    return model


def resolve_packing(model_type: str) -> str:
    """``varlen`` or ``mask`` (module docstring): T5-like models take the masks on CUDA and the
    per-example path elsewhere; the others always ``varlen``."""
    if PACKING[model_type] == "relative_bias":
        return "mask" if torch.cuda.is_available() else "varlen"
    return PACKING[model_type]


def _checked_base(hf_cfg, base: str, explicit: bool) -> str:
    if base == "flex_attention":
        raise ConfigError(["model.attn_implementation: flex_attention is not supported for encoder-decoders "
                           "(use sdpa or eager; BART-like models also flash_attention_2)"])
    if base == "flash_attention_2" and PACKING[hf_cfg.model_type] == "relative_bias":
        if explicit:
            raise ConfigError([f"model.attn_implementation: {hf_cfg.model_type} adds a relative-position bias to its "
                               "attention scores, which flash-attn cannot; use sdpa or eager"])
        return "sdpa"
    return base


def packing_mode(backbone) -> str:
    """``varlen`` or ``mask`` (module docstring): what :func:`switch_to_packed_attention` chose."""
    return getattr(backbone, "megamt_packing", None) or resolve_packing(backbone.config.model_type)


def switch_to_packed_attention(model, base: str) -> None:
    """Prepare a built encoder-decoder for packed forwards (module docstring): on the ``mask``
    path the model keeps its attention; on ``varlen`` it gets megamt's implementation over
    ``base``, marked cross-attention modules and packed positions."""
    base = _checked_base(model.config, base, explicit=True)
    model.megamt_packing = resolve_packing(model.config.model_type)
    if model.megamt_packing == "mask":
        return
    register()
    model.set_attn_implementation(PACKED_NAMES[base])
    if model.config._attn_implementation != PACKED_NAMES[base]:
        raise ConfigError([f"model.attn_implementation: {type(model).__name__} did not accept megamt's packed "
                           f"attention ({PACKED_NAMES[base]})"])
    mark_cross_attention(model)
    install_packed_positions(model)


def mark_cross_attention(model) -> int:
    """Set ``CROSS_ATTENTION_FLAG`` on the decoder's cross-attention modules; returns how many."""
    n = 0
    for name, module in model.get_decoder().named_modules():
        if name.rsplit(".", 1)[-1] in CROSS_ATTENTION_NAMES:
            setattr(module, CROSS_ATTENTION_FLAG, True)
            n += 1
    if n == 0:
        raise ConfigError([f"{type(model).__name__}: no cross-attention module found (looked for "
                           f"{CROSS_ATTENTION_NAMES}); megamt cannot pack this encoder-decoder"])
    return n


def install_packed_positions(model) -> int:
    """Learned absolute position tables (BART: ``embed_positions`` with an ``offset``) read the
    restarting ``position_ids`` of a packed forward instead of ``0..L-1`` along the row; outside
    a packed forward they behave as before. Returns how many were set up."""
    n = 0
    for side, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
        module = getattr(stack, "embed_positions", None)
        if isinstance(module, nn.Embedding) and hasattr(module, "offset"):
            module.megamt_side = side
            module.forward = types.MethodType(_packed_position_forward(type(module).forward), module)
            n += 1
    return n


def _packed_position_forward(original):
    def forward(self, *args, **kwargs):
        positions = _POSITIONS.get()
        if positions is None:
            return original(self, *args, **kwargs)
        # the restarting positions of this side, [B, L] -> [B, L, D], with the table's offset
        return nn.Embedding.forward(self, positions[self.megamt_side] + self.offset)

    return forward


@contextlib.contextmanager
def packed_positions(batch: dict[str, Any]):
    """During a packed forward: the per-example positions of each side (see above)."""
    token = _POSITIONS.set({"encoder": batch["position_ids"], "decoder": batch["decoder_position_ids"]})
    try:
        yield
    finally:
        _POSITIONS.reset(token)


# --------------------------------------------------------------------------- packed forward


def shift_right_packed(labels: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                       start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs of a packed decoder row: each example's targets shifted right by one
    *within the example* (``start_id`` at its first position), ``pad_id`` on padding. The
    per-row analogue of Hugging Face's ``_shift_right``."""
    prev = torch.full_like(labels, pad_id)
    prev[:, 1:] = labels[:, :-1]
    out = torch.where(position_ids == 0, torch.full_like(labels, start_id), prev)
    out = torch.where(segment_ids < 0, torch.full_like(labels, pad_id), out)
    return out.masked_fill(out == -100, pad_id)


class PackedMasks(NamedTuple):
    encoder: torch.Tensor
    """[B, 1, Le, Le]: same example (padding: padding only)."""
    decoder: torch.Tensor
    """[B, 1, Ld, Ld]: same example and key not after query."""
    cross: torch.Tensor
    """[B, 1, Ld, Le]: decoder example i -> encoder example i (decoder padding: anything, never read)."""


def packed_masks(batch: dict[str, Any], dtype: torch.dtype) -> PackedMasks:
    """Additive 4-D masks (0 = attend, the dtype's minimum = not) of a packed seq2seq batch,
    for architectures on the ``mask`` path. No row is all-masked, so no NaN."""
    enc, dec = batch["segment_ids"], batch["decoder_segment_ids"]
    pos = batch["decoder_position_ids"]
    keep_dec = (dec[:, :, None] == dec[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
    keep_cross = (dec[:, :, None] == enc[:, None, :]) | (dec < 0)[:, :, None]

    def additive(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
            ~keep, torch.finfo(dtype).min)[:, None]

    return PackedMasks(additive(enc[:, :, None] == enc[:, None, :]), additive(keep_dec), additive(keep_cross))


def decoder_inputs(backbone, batch: dict[str, Any]) -> torch.Tensor:
    cfg = backbone.config
    return shift_right_packed(batch["labels"], batch["decoder_segment_ids"], batch["decoder_position_ids"],
                              int(cfg.decoder_start_token_id), int(cfg.pad_token_id))


def packed_decoder_states(backbone, batch: dict[str, Any]) -> torch.Tensor:
    """The decoder's final hidden states ``[B, Ld, H]`` of a packed seq2seq batch, every
    example isolated on both sides (module docstring). The encoder runs once; its output is an
    activation every decoder layer's cross-attention reads (no parameter gather tied to it)."""
    encoder, decoder = backbone.get_encoder(), backbone.get_decoder()
    dec_in = decoder_inputs(backbone, batch)
    ids = batch["input_ids"]
    if packing_mode(backbone) == "varlen":
        enc_kw = packed_attention_kwargs(batch)
        dec_kw = packed_attention_kwargs({"input_ids": dec_in, "cu_seqlens": batch["decoder_cu_seqlens"],
                                          "max_seqlen": batch["decoder_max_seqlen"]})
        dec_kw.update(packed_cross_attention_kwargs(
            batch["cross_cu_seqlens_q"], batch["cross_cu_seqlens_k"], batch["cross_max_seqlen_q"],
            batch["cross_max_seqlen_k"], dec_in.numel(), ids.numel(), ids.device))
        with packed_forward(), packed_positions(batch):
            states = encoder(input_ids=ids, **enc_kw)[0]
            return decoder(input_ids=dec_in, encoder_hidden_states=states, use_cache=False, **dec_kw)[0]
    masks = packed_masks(batch, backbone.get_input_embeddings().weight.dtype)
    states = encoder(input_ids=ids, attention_mask=masks.encoder)[0]
    return decoder(input_ids=dec_in, attention_mask=masks.decoder, encoder_hidden_states=states,
                   encoder_attention_mask=masks.cross, use_cache=False)[0]


def lm_head(backbone) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(weight [V, H], bias [V] or None, scale)``: logits = ``scale * hidden @ weight.T + bias``,
    as the model's own forward computes them (T5 with tied embeddings scales by
    ``d_model**-0.5``; BART adds ``final_logits_bias``)."""
    head = backbone.get_output_embeddings()
    bias = getattr(head, "bias", None)
    final = getattr(backbone, "final_logits_bias", None)
    if isinstance(final, torch.Tensor):
        bias = final.reshape(-1) if bias is None else bias + final.reshape(-1)
    cfg = backbone.config
    scaled = getattr(cfg, "scale_decoder_outputs", None)
    if scaled is None:  # transformers before the flag: T5 scaled whenever its embeddings were tied (mT5: never)
        scaled = cfg.model_type == "t5" and getattr(cfg, "tie_word_embeddings", False)
    return head.weight, bias, (cfg.d_model ** -0.5 if scaled else 1.0)


def packed_logits(backbone, batch: dict[str, Any]) -> torch.Tensor:
    """Full-vocabulary logits ``[B, Ld, V]`` of a packed seq2seq batch (tests, the unfused path)."""
    weight, bias, scale = lm_head(backbone)
    return F.linear(packed_decoder_states(backbone, batch) * scale, weight, bias)


__all__ = ["PACKING", "PackedMasks", "build_seq2seq_lm", "check_seq2seq_config", "check_tokenizer_fits",
           "lm_head", "mark_cross_attention", "packed_decoder_states", "packed_logits", "packed_masks",
           "packing_mode", "resolve_packing", "shift_right_packed", "switch_to_packed_attention"]
