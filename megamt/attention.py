"""Packed attention: the examples of a packed micro-batch never attend to each other.

Every packed batch carries the packer's ``cu_seqlens`` (int32 ``[S+1]``, the boundaries of
every segment -- examples and padding runs -- in the flattened ``B*L`` tokens) and
``max_seqlen`` (ARCHITECTURE.md, "Packed batch"). megamt gives them to attention itself:
the backbone is switched to one of megamt's functions registered with transformers'
``AttentionInterface``; the packed forward passes ``cu_seq_lens_q/k`` + ``max_length_q/k``
(transformers' names) as keyword arguments, which transformers hands down to every
attention call. Nothing is derived from ``position_ids``.

Why not transformers' own packing: ``flash_attention_2`` treats restarting position ids as
packed sequences only when the batch size is 1 (``_is_packed_sequence``), so rows of several
examples in a micro-batch of several rows attend across examples -- and with batch size 1 it
derives ``cu_seqlens`` with a host sync in every layer; SDPA builds a dense ``[B, 1, L, L]``
mask from the position ids (FIELD_NOTES).

What each ``model.attn_implementation`` does with a packed row (registered name in brackets):

- ``flash_attention_2`` [megamt_varlen_fa2]: ``flash_attn.flash_attn_varlen_func`` once per
  layer over the ``B*L`` tokens with the packer's ``cu_seqlens`` / ``max_seqlen``;
- ``sdpa`` [megamt_varlen_torch]: on CUDA in fp16/bf16 without attention dropout,
  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own flash kernel, same arguments);
  otherwise transformers' SDPA function once per segment (``is_causal``, no mask);
- ``eager`` [megamt_varlen_eager]: the model's own eager attention once per segment (a
  causal mask of the segment's size: eager attention materialises its scores anyway);
- ``flex_attention``: transformers' own path (a block-sparse document mask from the
  restarting position ids, ``O((L/128)^2)``), not intercepted.

No path builds an ``[L, L]`` mask of a packed row, and none reads the device per layer:
the varlen kernels take ``cu_seqlens`` on the device; the per-segment path reads the
boundaries on the host once per forward (free while ``cu_seqlens`` is still on the CPU;
one small copy on a GPU, only when that path runs). transformers' own detection of packed
position ids in ``create_causal_mask`` still runs once per causal-LM forward (one small
host read); the mask it would feed is dropped (:func:`packed_forward`).

Without packing keyword arguments (evaluation's generation with a KV cache, scoring of
padded rows) the same function calls transformers' implementation with transformers'
masks: ``sdpa`` / ``eager`` as usual, ``flash_attention_2`` through ``sdpa``.

Encoder-decoders (megamt/seq2seq.py) add cross-attention: the modules marked with
``CROSS_ATTENTION_FLAG`` attend from decoder segment ``i`` to encoder segment ``i`` only, with
the pairs the packer built (keyword ``megamt_cross``, a :class:`CrossSegments`: ``cu_seqlens_q``
over the decoder tokens, ``cu_seqlens_k`` over the encoder tokens, empty segments allowed):
flash-attn's and PyTorch's varlen kernels take the two boundary arrays as they are; the
per-segment path runs each pair alone, an empty key segment giving zeros. A ``position_bias``
(T5's relative bias over the whole row, a function of ``key - query``) goes to the per-segment
path only, each segment getting its top-left block: the bias of the example alone.

A model class that does not route attention through the interface (DeBERTa-v2, MPNet:
their attention adds relative-position terms in hand-written code) keeps its own
attention; :func:`use_packed_attention` returns False and the caller isolates examples
another way (encoders: each segment as its own row, ``megamt.heads.unpacked_encode``;
causal LMs: transformers' position-id packing under sdpa/eager, flash_attention_2 refused).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import inspect
import sys
from typing import Any, Callable

import torch

IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
PACKED_NAMES = {"sdpa": "megamt_varlen_torch", "eager": "megamt_varlen_eager",
                "flash_attention_2": "megamt_varlen_fa2"}
"""transformers implementation -> megamt's registered packed implementation. The names
avoid the substrings transformers dispatches on ("flash", "flex", "sdpa")."""
_UNPACKED = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "sdpa"}
"""What the same model runs on calls without packing keywords (generation, padded rows)."""
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "megamt_segments", "megamt_cross")
CROSS_ATTENTION_FLAG = "megamt_cross_attention"
"""Attribute set (True) on the cross-attention modules of an encoder-decoder (megamt.seq2seq):
in a packed forward they pair decoder and encoder segments (``megamt_cross``)."""

_PACKED_FORWARD = contextvars.ContextVar("megamt_packed_forward", default=False)


class PackingError(ValueError):
    """A packed forward that cannot be run as asked (no segment boundaries, a KV cache ...)."""


# --------------------------------------------------------------------------- selection


def check_implementation(name: str, where: str = "model.attn_implementation") -> None:
    from megamt.config import ConfigError

    if name not in IMPLEMENTATIONS:
        raise ConfigError([f"{where}: {name!r} is not one of {list(IMPLEMENTATIONS)}"])


def flash_attn_available() -> bool:
    """flash-attn importable (an already imported module counts: tests inject a stand-in)."""
    if "flash_attn" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def construction_kwargs(setting: str) -> dict[str, str]:
    """What a backbone is constructed with for ``model.attn_implementation=setting``: auto and
    flash_attention_2 -> transformers' default (sdpa; eager for classes without it), so that
    transformers does not require the flash-attn package at construction (the packed path
    imports it at its first call)."""
    check_implementation(setting)
    if setting in ("auto", "flash_attention_2"):
        return {}
    return {"attn_implementation": setting}


def build_implementation(base: str) -> str:
    """The implementation to *construct* a model with when ``base`` is already resolved (the
    seq2seq family): flash_attention_2 is built as sdpa, so that transformers does not require
    the flash-attn package at construction (the packed path imports it at its first call)."""
    return "sdpa" if base == "flash_attention_2" else base


def resolve_implementation(setting: str, model=None) -> str:
    """The implementation for ``setting``: auto -> flash_attention_2 when flash-attn and CUDA
    are present, else what transformers chose when it built ``model`` (sdpa by default)."""
    check_implementation(setting)
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and flash_attn_available():
        return "flash_attention_2"
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"


def use_packed_attention(model, base: str) -> bool:
    """Switch ``model`` (a transformers ``PreTrainedModel``) to megamt's packed attention over
    ``base``; True when it now isolates packed examples through ``cu_seqlens``.

    False for ``flex_attention`` (transformers' own packing) and for model classes that do
    not route attention through ``AttentionInterface`` (their own attention stays).
    """
    from megamt.config import ConfigError

    check_implementation(base)
    if base not in PACKED_NAMES:
        return False
    if base == "flash_attention_2" and not flash_attn_available():
        raise ConfigError(["model.attn_implementation: flash_attention_2 needs the flash-attn package "
                           "(pip install flash-attn on a CUDA machine); use sdpa or auto"])
    register()
    if not getattr(type(model), "_supports_attention_backend", False):
        return False
    model.set_attn_implementation(PACKED_NAMES[base])
    return model.config._attn_implementation == PACKED_NAMES[base]


def switch_to_packed_attention(model, setting: str, *, encoder: bool = False) -> bool:
    """Switch a backbone built with :func:`construction_kwargs` to megamt's packed attention;
    False when it keeps another way of isolating packed examples: transformers' packing by
    restarting position ids (causal LMs under flex_attention, or sdpa/eager on a class without
    ``AttentionInterface`` support: correct, with a per-row mask), or one row per segment
    (encoders without the interface: ``megamt.heads.unpacked_encode``). Refused when that cannot isolate them and the setting
    was explicit: flash_attention_2 without the interface (transformers' flash path lets the
    examples of several rows attend to each other), flex_attention on an encoder (no mask
    from position ids for bidirectional attention). ``auto`` falls back to what was built."""
    from megamt.config import ConfigError

    base = resolve_implementation(setting, model)
    if use_packed_attention(model, base):
        return True
    refused = base == "flash_attention_2" or (encoder and base == "flex_attention")
    if refused and setting != "auto":
        raise ConfigError([f"model.attn_implementation: {base} cannot keep the packed examples of a "
                           f"{type(model).__name__} apart (no transformers AttentionInterface support"
                           f"{'' if base == 'flash_attention_2' else ', and no packing from position ids in bidirectional attention'}); "
                           "use sdpa or eager"])
    return False


@contextlib.contextmanager
def packed_forward():
    """Around a packed forward: transformers' mask builders return no mask for megamt's
    implementations (the segments come from ``cu_seqlens``), so no ``[L, L]`` mask is built
    even where transformers detects packed position ids. The attention calls themselves
    read the keyword arguments, so a gradient-checkpointing recompute outside this context
    is still packed."""
    token = _PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _PACKED_FORWARD.reset(token)


class HostBoundaries:
    """The packer's ``cu_seqlens`` as Python ints, read once per forward and only when asked
    (the varlen kernels never ask; the per-segment path does)."""

    def __init__(self, cu_seqlens: torch.Tensor | tuple[int, ...], total: int, allow_empty: bool = False):
        self._cu, self._total, self._list = cu_seqlens, total, None
        self._allow_empty = allow_empty  # cross-attention pairs may hold an empty side

    def get(self) -> list[int]:
        if self._list is None:
            # a host copy made with the batch (the trainer's prefetch thread) costs no device read
            bounds = [int(x) for x in (self._cu if isinstance(self._cu, (tuple, list)) else self._cu.tolist())]
            rises = (b < a if self._allow_empty else b <= a for a, b in zip(bounds, bounds[1:]))
            if bounds[0] != 0 or bounds[-1] != self._total or any(rises):
                raise PackingError(f"cu_seqlens {bounds[:8]}... must rise from 0 to B*L={self._total} "
                                   "(the packer's segment boundaries over the flattened batch)")
            self._list = bounds
        return self._list


def packed_attention_kwargs(batch: dict) -> dict[str, Any]:
    """The keyword arguments a packed forward passes to the backbone, from the batch's
    ``cu_seqlens`` / ``max_seqlen`` (see the module docstring)."""
    if "cu_seqlens" not in batch or "max_seqlen" not in batch:
        raise PackingError("a packed batch needs cu_seqlens and max_seqlen (megamt.data.packing.collate_rows "
                           "builds them; megamt.attention.cu_seqlens_from_segment_ids for hand-made batches)")
    ids = batch["input_ids"]
    cu = batch["cu_seqlens"]
    cu_device = (cu if cu.device == ids.device and cu.dtype == torch.int32
                 else cu.to(device=ids.device, dtype=torch.int32, non_blocking=True))
    max_len = int(batch["max_seqlen"])
    host = batch.get("cu_seqlens_host")  # the trainer's host copy: no device read in the forward
    host = HostBoundaries(host if host is not None else (cu if cu.device.type == "cpu" else cu_device), ids.numel())
    return {"cu_seq_lens_q": cu_device, "cu_seq_lens_k": cu_device, "max_length_q": max_len,
            "max_length_k": max_len, "megamt_segments": host}


class CrossSegments:
    """The segment pairs of a packed encoder-decoder batch for cross-attention: pair ``i``
    attends from decoder tokens ``cu_q[i]:cu_q[i+1]`` to encoder tokens ``cu_k[i]:cu_k[i+1]``
    (both over the flattened rows; either side may be empty). Built by
    :func:`packed_cross_attention_kwargs`."""

    def __init__(self, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                 host_q: HostBoundaries, host_k: HostBoundaries):
        if cu_q.numel() != cu_k.numel():
            raise PackingError(f"cross-attention pairs: {cu_q.numel() - 1} decoder segments but {cu_k.numel() - 1} "
                               "encoder segments (the packer pairs them one to one)")
        self.cu_q, self.cu_k, self.max_q, self.max_k = cu_q, cu_k, max_q, max_k
        self.host_q, self.host_k = host_q, host_k


def packed_cross_attention_kwargs(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                                  total_q: int, total_k: int, device) -> dict[str, Any]:
    """The keyword a packed encoder-decoder forward adds for its cross-attention modules:
    ``megamt_cross`` = :class:`CrossSegments` (device copies for the varlen kernels, host
    boundaries read lazily for the per-segment path)."""
    on_device = [c.to(device=device, dtype=torch.int32) for c in (cu_q, cu_k)]
    host = [HostBoundaries(c if c.device.type == "cpu" else d, n, allow_empty=True)
            for c, d, n in ((cu_q, on_device[0], total_q), (cu_k, on_device[1], total_k))]
    return {"megamt_cross": CrossSegments(*on_device, int(max_q), int(max_k), *host)}


def cu_seqlens_from_segment_ids(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 [S+1], max_seqlen)`` of a ``[B, L]`` segment-id tensor (a new
    segment where the id changes or a row starts; padding runs count as segments), on the
    CPU. For batches built outside the packer (evaluation rows, tests)."""
    seg = segment_ids.cpu()
    B, L = seg.shape
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    pos = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat([pos, torch.tensor([B * L])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# --------------------------------------------------------------------------- registration


def register() -> None:
    """Register megamt's packed implementations (attention + mask) with transformers. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for base, name in PACKED_NAMES.items():
        AttentionInterface.register(name, _packed_attention(base))
        AttentionMaskInterface.register(name, _packed_mask(base))


def _packed_mask(base: str) -> Callable:
    unpacked = _UNPACKED[base]

    def mask(**kwargs):
        if _PACKED_FORWARD.get():
            return None
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS[unpacked](**kwargs)

    return mask


def _packed_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        packing = {k: kwargs.pop(k, None) for k in PACKING_KEYS}
        if packing["cu_seq_lens_q"] is None:  # generation, padded rows: transformers' own implementation
            fn = _unpacked_function(module, base)
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if getattr(module, CROSS_ATTENTION_FLAG, False):
            return _cross_attention(base, module, query, key, value, packing["megamt_cross"], dropout, scaling,
                                    kwargs), None
        if key.shape[2] != query.shape[2]:
            raise PackingError("a packed forward runs without a KV cache (use_cache=False)")
        causal = kwargs.pop("is_causal", None)
        causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
        window = kwargs.get("sliding_window")
        cu, max_len = packing["cu_seq_lens_q"], int(packing["max_length_q"])
        if base == "flash_attention_2":
            _refuse_position_bias(module, kwargs)
            out = _flash_varlen(query, key, value, cu, max_len, causal, dropout, scaling, window,
                                kwargs.get("softcap"))
        elif base == "sdpa" and _use_torch_varlen(query, key, value, dropout, kwargs):
            out = _torch_varlen(query, key, value, cu, max_len, causal, scaling, window)
        else:
            out = per_segment_attention(_unpacked_function(module, base), module, query, key, value,
                                        packing["megamt_segments"].get(), causal=causal, eager=base == "eager",
                                        dropout=dropout, scaling=scaling, **kwargs)
        return out, None

    attention.__name__ = f"megamt_packed_{base}"
    return attention


def _cross_attention(base: str, module, query, key, value, cross: CrossSegments | None, dropout, scaling,
                     kwargs) -> torch.Tensor:
    """Cross-attention of a packed encoder-decoder forward: decoder segment i -> encoder segment i."""
    if cross is None:
        raise PackingError(f"{type(module).__name__}: a packed cross-attention needs the segment pairs (megamt_cross; "
                           "megamt.seq2seq builds them from the batch)")
    kwargs.pop("is_causal", None)
    if base == "flash_attention_2":
        _refuse_position_bias(module, kwargs)
        return _flash_varlen(query, key, value, cross.cu_q, cross.max_q, False, dropout, scaling, None,
                             kwargs.get("softcap"), cu_k=cross.cu_k, max_k=cross.max_k)
    if base == "sdpa" and _use_torch_varlen(query, key, value, dropout, kwargs):
        return _torch_varlen(query, key, value, cross.cu_q, cross.max_q, False, scaling, None,
                             cu_k=cross.cu_k, max_k=cross.max_k)
    return per_segment_attention(_unpacked_function(module, base), module, query, key, value, cross.host_q.get(),
                                 causal=False, eager=base == "eager", dropout=dropout, scaling=scaling,
                                 key_bounds=cross.host_k.get(), **kwargs)


def _refuse_position_bias(module, kwargs) -> None:
    if kwargs.get("position_bias") is not None:
        raise PackingError(f"{type(module).__name__} adds a position bias to its attention scores, which flash-attn's "
                           "varlen kernel cannot; use model.attn_implementation=sdpa or eager")


def _unpacked_function(module, base: str) -> Callable:
    if _UNPACKED[base] == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise PackingError(f"{type(module).__name__}: its modeling module has no eager_attention_forward; "
                           "use model.attn_implementation=sdpa")
    return fn


# --------------------------------------------------------------------------- the three packed paths


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B*L, H, D]`` (the varlen layout: tokens of every row in a line)."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B * L, H, D)


def _flash_varlen(query, key, value, cu, max_len, causal, dropout, scaling, window, softcap,
                  cu_k=None, max_k=None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    B, H, L, _ = query.shape
    extra = {}
    if window is not None:  # transformers' convention: `window` keys including the token itself
        extra["window_size"] = (window - 1, window - 1)
    if softcap is not None:
        extra["softcap"] = softcap
    cu_k, max_k = (cu, max_len) if cu_k is None else (cu_k, max_k)  # cross-attention: the encoder's
    out = flash_attn_varlen_func(_flat(query), _flat(key), _flat(value), cu, cu_k, max_len, max_k,
                                 dropout_p=dropout, softmax_scale=scaling, causal=causal, **extra)
    out = out[0] if isinstance(out, tuple) else out
    return out.view(B, L, H, -1)


def _torch_varlen_function():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"window_size", "enable_gqa", "scale"} <= set(params) else None


def _use_torch_varlen(query, key, value, dropout, kwargs) -> bool:
    """PyTorch's varlen flash kernel: CUDA, half precision, no attention dropout, softcap or
    additive position bias."""
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and query.shape[-1] == value.shape[-1] <= 256
            and _torch_varlen_function() is not None)


def _torch_varlen(query, key, value, cu, max_len, causal, scaling, window, cu_k=None, max_k=None) -> torch.Tensor:
    B, H, L, _ = query.shape
    left = window - 1 if window is not None else -1
    cu_k, max_k = (cu, max_len) if cu_k is None else (cu_k, max_k)
    out = _torch_varlen_function()(_flat(query), _flat(key), _flat(value), cu, cu_k, max_len, max_k,
                                   scale=scaling, window_size=(left, 0) if causal else (left, left),
                                   enable_gqa=key.shape[1] != H)
    return out.view(B, L, H, -1)


def per_segment_attention(fn: Callable, module, query, key, value, bounds: list[int], *, causal: bool,
                          eager: bool, dropout: float = 0.0, scaling=None, key_bounds: list[int] | None = None,
                          **kwargs) -> torch.Tensor:
    """Attention of each segment alone: ``fn`` (transformers' sdpa or the model's eager function)
    on the segment's queries/keys/values -- by construction the unpacked computation of each
    example. ``bounds``: the segment boundaries in the flattened ``B*L`` tokens. Returns
    ``[B, L, H, Dv]``. ``key_bounds`` (cross-attention): the keys' own boundaries, pair by
    pair with ``bounds`` (an empty query segment is skipped, an empty key segment gives zeros).
    ``position_bias`` (T5's relative-position bias, ``[1, H, L, Lk]`` over a whole row): a
    function of ``key - query`` only, so every segment gets its top-left ``[n, nk]`` block --
    the bias of the example alone."""
    B, H, L, _ = query.shape
    q, k, v = _flat(query), _flat(key), _flat(value)
    window = kwargs.get("sliding_window")
    bias = kwargs.pop("position_bias", None)
    key_bounds = bounds if key_bounds is None else key_bounds
    n_q = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    n_k = [e - s for s, e in zip(key_bounds[:-1], key_bounds[1:])]
    # split, not per-segment indexing: its backward is one concatenation, where each index's
    # backward would write into a zero tensor of the whole batch's size
    qs, ks, vs = q.split(n_q), k.split(n_k), v.split(n_k)
    blocks = TopLeftBlocks.apply(bias, tuple(zip(n_q, n_k))) if bias is not None else [None] * len(n_q)
    outs = []
    for qi, ki, vi, block in zip(qs, ks, vs, blocks):
        n = qi.shape[0]
        if n == 0:
            continue
        if ki.shape[0] == 0:
            outs.append(q.new_zeros(n, H, v.shape[-1]))
            continue
        part = [x.transpose(0, 1).unsqueeze(0) for x in (qi, ki, vi)]  # [1, H, n, D]
        mask = _segment_mask(n, causal, window, eager, query)
        if block is not None:
            kwargs["position_bias"] = block
        o, _ = fn(module, *part, mask, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs)
        outs.append(o[0])
    return torch.cat(outs).view(B, L, H, -1)


class TopLeftBlocks(torch.autograd.Function):
    """``x[..., :n, :m]`` for every ``(n, m)`` in ``sizes``, with one gradient buffer in the
    backward (per-block slicing would allocate a zero tensor of ``x``'s full size per block)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[tuple[int, int], ...]):
        ctx.shape, ctx.sizes = x.shape, sizes
        return tuple(x[..., :n, :m] for n, m in sizes)

    @staticmethod
    def backward(ctx, *grads):
        out = grads[0].new_zeros(ctx.shape) if any(g is not None for g in grads) else None
        for (n, m), g in zip(ctx.sizes, grads):
            if g is not None:
                out[..., :n, :m] += g
        return out, None


def _segment_mask(n: int, causal: bool, window: int | None, eager: bool, like: torch.Tensor):
    """The mask of one segment of ``n`` tokens: None where ``is_causal`` / no mask says it all
    (sdpa), else bool (sdpa) or additive (eager) ``[1, 1, n, n]``. ``window``: keys at a
    distance below it (transformers' sliding-window convention)."""
    windowed = window is not None and n > window
    if not eager and not windowed:
        return None
    if not causal and not windowed:
        return None
    i = torch.arange(n, device=like.device)
    dist = i[:, None] - i[None, :]
    keep = torch.ones(n, n, dtype=torch.bool, device=like.device)
    if causal:
        keep &= dist >= 0
    if windowed:
        keep &= dist.abs() < window
    if not eager:
        return keep[None, None]
    return torch.zeros(n, n, dtype=like.dtype, device=like.device).masked_fill_(
        ~keep, torch.finfo(like.dtype).min)[None, None]


__all__ = ["CROSS_ATTENTION_FLAG", "CrossSegments", "IMPLEMENTATIONS", "PACKED_NAMES", "PackingError",
           "build_implementation", "check_implementation", "construction_kwargs", "cu_seqlens_from_segment_ids",
           "flash_attn_available", "packed_attention_kwargs", "packed_cross_attention_kwargs", "packed_forward",
           "per_segment_attention", "register", "resolve_implementation", "switch_to_packed_attention",
           "use_packed_attention"]
