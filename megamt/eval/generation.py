"""Causal-LM inference for evaluation: batched greedy generation and rank classification.

- :func:`greedy_generate`: left-padded batches, a KV cache, argmax decoding until EOS or
  ``max_new_tokens``. A row that never writes EOS is cut at ``max_new_tokens`` and
  reported (``Generation.stopped`` is False), so the caller can count it: generation is
  always bounded.
- :func:`rank_classify`: T0-style rank classification. Every label's verbalisation is
  scored by its log-likelihood given the prompt, ``sum_t log p(choice_t | prompt, choice_<t)``
  over the choice tokens (EOS included, as in training targets); the best one wins.

Both take token ids (``prompt_ids`` = [BOS] + prompt, as the shards hold them) and a plain
(non-partitioned) Hugging Face causal LM, and return results in input order. Prompts are
sorted by length inside so that batches waste little padding.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


class Generation(NamedTuple):
    ids: list[int]
    """Generated token ids, without the EOS."""
    stopped: bool
    """True when the model wrote EOS within ``max_new_tokens``; False when it was cut."""


def _cache_argument(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use what the model takes."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(res):
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values


def _by_length(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int,
                    max_new_tokens: int, batch_size: int = 8, max_length: int | None = None,
                    progress=None) -> list[Generation]:
    """Greedy continuation of each prompt (token ids) until EOS or ``max_new_tokens``.

    ``max_length`` (prompt + generation) clips prompts from the left when set, as the
    packer truncates overlong examples in training.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    cache_kw = _cache_argument(model)
    out: list[Generation | None] = [None] * len(prompts)
    for rows in _by_length(prompts, batch_size):
        seqs = [list(prompts[i]) for i in rows]
        if max_length is not None:
            keep = max(1, max_length - max_new_tokens)
            seqs = [s[-keep:] for s in seqs]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("greedy_generate: an empty prompt (give at least a BOS token)")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
        for r, s in enumerate(seqs):  # left padding: every prompt ends at the last column
            ids[r, width - len(s):] = torch.tensor(s, device=device)
            mask[r, width - len(s):] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        generated = torch.empty((len(seqs), 0), dtype=torch.long, device=device)
        done = torch.zeros(len(seqs), dtype=torch.bool, device=device)
        res = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        cache, logits = _cache_of(res), res.logits[:, -1]
        next_pos = position[:, -1] + 1
        for _ in range(max_new_tokens):
            token = logits.float().argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            generated = torch.cat([generated, token[:, None]], dim=1)
            done |= token == eos_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            res = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        use_cache=True, **{cache_kw: cache})
            cache, logits = _cache_of(res), res.logits[:, -1]
            next_pos = next_pos + 1
        for r, i in enumerate(rows):
            toks = generated[r].tolist()
            stopped = eos_id in toks
            out[i] = Generation(toks[:toks.index(eos_id)] if stopped else toks, stopped)
        if progress is not None:
            progress.update(len(rows))
    return out  # type: ignore[return-value]


@torch.no_grad()
def choice_log_likelihoods(model, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]],
                           *, pad_id: int, batch_size: int = 8, max_length: int | None = None,
                           progress=None) -> list[list[float]]:
    """``[example][choice]`` summed log-probability of the choice's tokens after the prompt."""
    device = next(model.parameters()).device
    pairs = [(i, c) for i, cs in enumerate(choices) for c in range(len(cs))]
    seqs, starts = [], []
    for i, c in pairs:
        p, ch = list(prompts[i]), list(choices[i][c])
        if not ch:
            raise ValueError(f"rank classification: choice {c} of example {i} has no tokens")
        if max_length is not None and len(p) + len(ch) > max_length:
            p = p[-max(1, max_length - len(ch)):]  # keep the end of the prompt, as training truncates
        seqs.append(p + ch)
        starts.append(len(p))
    scores = [[0.0] * len(cs) for cs in choices]
    for rows in _by_length(seqs, batch_size):
        width = max(len(seqs[k]) for k in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for r, k in enumerate(rows):  # right padding: positions are 0..n-1 as in training
            ids[r, :len(seqs[k])] = torch.tensor(seqs[k], device=device)
            mask[r, :len(seqs[k])] = 1
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for r, k in enumerate(rows):
            s, n = starts[k], len(seqs[k])
            target = ids[r, s:n]
            i, c = pairs[k]
            scores[i][c] = float(logp[r, s - 1:n - 1].gather(-1, target[:, None]).sum())
        if progress is not None:
            progress.update(len(rows))
    return scores


def rank_classify(model, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]],
                  **kwargs) -> list[int]:
    """Index of the most likely choice for each example (first one on ties)."""
    scores = choice_log_likelihoods(model, prompts, choices, **kwargs)
    return [max(range(len(s)), key=lambda j: (s[j], -j)) for s in scores]
