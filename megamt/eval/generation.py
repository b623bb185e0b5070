"""Inference for evaluation: batched greedy generation and rank classification (causal LMs;
encoder-decoders through their own ``generate``, greedy or beam, and decoder scores).

- :func:`greedy_generate`: left-padded batches, a KV cache, argmax decoding until EOS or
  ``max_new_tokens``. A row that never writes EOS is cut at ``max_new_tokens`` and
  reported (``Generation.stopped`` is False), so the caller can count it: generation is
  always bounded.
- :func:`rank_classify`: T0-style rank classification. Every label's verbalisation is
  scored by its log-likelihood given the prompt, ``sum_t log p(choice_t | prompt, choice_<t)``
  over the choice tokens (EOS included, as in training targets); the best one wins.

Both take token ids (``prompt_ids`` = [BOS] + prompt, as the shards hold them) and a Hugging
Face causal LM -- plain, or partitioned by ZeRO-3 -- and return results in input order; the
encoder-decoder functions likewise (a partitioned one routed through its root module).
Prompts are sorted by length inside so that batches waste little padding.

A ZeRO-3 partitioned model gathers each module's parameters from every rank when it runs (a
collective), so the ranks of an evaluation must run the same number of forwards even when
they hold different numbers of examples (:class:`Lockstep`): a rank out of batches runs
stand-in forwards on one padding token, and generation keeps every rank decoding until all
ranks are done -- transformers' ``synced_gpus=True``, one all-reduce of a flag per step.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from megamt import comm


class Generation(NamedTuple):
    ids: list[int]
    """Generated token ids, without the EOS."""
    stopped: bool
    """True when the model wrote EOS within ``max_new_tokens``; False when it was cut."""


def zero3_partitioned(model) -> bool:
    """True when ``model``'s parameters are ZeRO-3 partitions (``deepspeed.zero.Init`` / engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def model_device(model) -> torch.device:
    """Where the inputs of ``model`` go: its parameters' device, or for ZeRO-3 partitions
    (whose placeholders may sit on the CPU under parameter offload) the rank's accelerator."""
    p = next(model.parameters())
    if hasattr(p, "ds_id"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return p.device


class Lockstep:
    """Keeps the ranks evaluating one ZeRO-3 partitioned model in step (module docstring).
    Inactive (no collectives) for a plain model or a single rank."""

    def __init__(self, model):
        self.active = comm.world_size() > 1 and zero3_partitioned(model)

    def rounds(self, n: int) -> int:
        """The number of forward rounds every rank runs: the largest ``n`` of all ranks."""
        return int(comm.reduce_values([n], "max")[0]) if self.active else n

    def all_done(self, done: bool) -> bool:
        """True when every rank is done (each rank must call it the same number of times)."""
        return comm.reduce_values([0.0 if done else 1.0], "max")[0] == 0.0 if self.active else done


def until_eos(tokens: list[int], eos_id: int) -> Generation:
    """The tokens before the first EOS; ``stopped`` False when there is none (cut)."""
    stopped = eos_id in tokens
    return Generation(tokens[:tokens.index(eos_id)] if stopped else tokens, stopped)


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
    device = model_device(model)
    cache_kw = _cache_argument(model)
    lockstep = Lockstep(model)
    out: list[Generation | None] = [None] * len(prompts)
    batches = _by_length(prompts, batch_size)
    for b in range(lockstep.rounds(len(batches))):
        rows = batches[b] if b < len(batches) else []  # [] = a stand-in round (lockstep)
        seqs = [list(prompts[i]) for i in rows] or [[pad_id]]
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
        done = torch.full((len(seqs),), not rows, dtype=torch.bool, device=device)
        res = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        cache, logits = _cache_of(res), res.logits[:, -1]
        next_pos = position[:, -1] + 1
        for _ in range(max_new_tokens):
            token = logits.float().argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            generated = torch.cat([generated, token[:, None]], dim=1)
            done |= token == eos_id
            if lockstep.all_done(bool(done.all())):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            res = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        use_cache=True, **{cache_kw: cache})
            cache, logits = _cache_of(res), res.logits[:, -1]
            next_pos = next_pos + 1
        for r, i in enumerate(rows):
            out[i] = until_eos(generated[r].tolist(), eos_id)
        if progress is not None:
            progress.update(len(rows))
    return out  # type: ignore[return-value]


@torch.no_grad()
def choice_log_likelihoods(model, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]],
                           *, pad_id: int, batch_size: int = 8, max_length: int | None = None,
                           progress=None) -> list[list[float]]:
    """``[example][choice]`` summed log-probability of the choice's tokens after the prompt."""
    device = model_device(model)
    lockstep = Lockstep(model)
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
    left = [len(cs) for cs in choices]  # choices still to score per example: the bar counts examples
    batches = _by_length(seqs, batch_size)
    for b in range(lockstep.rounds(len(batches))):
        if b >= len(batches):  # a stand-in round (lockstep): one padding token
            one = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
            model(input_ids=one, attention_mask=torch.ones_like(one), use_cache=False)
            continue
        rows = batches[b]
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
        finished = 0
        for k in rows:
            left[pairs[k][0]] -= 1
            finished += left[pairs[k][0]] == 0
        if progress is not None and finished:
            progress.update(finished)  # examples whose every choice is scored (total = examples)
    return scores


def rank_classify(model, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]],
                  **kwargs) -> list[int]:
    """Index of the most likely choice for each example (first one on ties)."""
    return best_choices(choice_log_likelihoods(model, prompts, choices, **kwargs))


def best_choices(scores: list[list[float]]) -> list[int]:
    """Index of the highest score of each example (first one on ties)."""
    return [max(range(len(s)), key=lambda j: (s[j], -j)) for s in scores]


# --------------------------------------------------------------------------- encoder-decoders


def _require_encoder_decoder(model) -> None:
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} ({getattr(cfg, 'model_type', '?')}): encoder-decoder generation "
                         "needs a model whose config.json says is_encoder_decoder: true; an encoder-only model "
                         "cannot generate (evaluate it through its task heads), a causal LM uses greedy_generate")


def _padded(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, width]`` ids and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(list(s), device=device)
        mask[r, :len(s)] = 1
    return ids, mask


def _hf(model):
    """The Hugging Face model behind ``model``: a model routed through its root module
    (megamt.eval.api.RoutedModel) or the model itself."""
    return model.module if getattr(model, "through_root", False) else model


def _in_root(model, fn):
    """``fn()`` inside one forward of the root module when ``model`` is routed (under ZeRO-3 a
    whole ``generate`` is one step of the partitioned root), else as it is."""
    return model.run(fn) if getattr(model, "through_root", False) else fn()


@torch.no_grad()
def seq2seq_generate(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
                     num_beams: int = 1, batch_size: int = 8, progress=None) -> list[Generation]:
    """Generation of an encoder-decoder (its own ``generate``: greedy, or beam search with
    ``num_beams`` > 1) for encoder inputs given as token ids, batched over right-padded
    batches (with their attention mask), at most ``max_new_tokens`` tokens; a row without
    EOS within the bound is reported cut (``Generation.stopped`` False).

    ``model``: the HF encoder-decoder, or one routed through a partitioned root (ZeRO-3, several
    ranks): every rank then runs the same number of ``generate`` calls (:class:`Lockstep`; a rank
    out of batches generates from a stand-in prompt) and each call keeps decoding until every
    rank is done (transformers' ``synced_gpus``)."""
    hf = _hf(model)
    _require_encoder_decoder(hf)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model_device(hf)
    lockstep = Lockstep(hf)
    out: list[Generation | None] = [None] * len(prompts)
    batches = _by_length(prompts, batch_size)
    for b in range(lockstep.rounds(len(batches))):
        rows = batches[b] if b < len(batches) else []  # [] = a stand-in round (lockstep)
        ids, mask = _padded([prompts[i] for i in rows] or [[eos_id]], pad_id, device)
        gen = _in_root(model, lambda: hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
            eos_token_id=eos_id, pad_token_id=pad_id, early_stopping=True, use_cache=True,
            decoder_start_token_id=hf.config.decoder_start_token_id, synced_gpus=lockstep.active))
        for r, i in enumerate(rows):
            out[i] = until_eos(gen[r, 1:].tolist(), eos_id)  # after the decoder start token
        if progress is not None and rows:
            progress.update(len(rows))
    return out  # type: ignore[return-value]


@torch.no_grad()
def seq2seq_choice_log_likelihoods(model, prompts: Sequence[Sequence[int]],
                                   choices: Sequence[Sequence[Sequence[int]]], *, pad_id: int, batch_size: int = 8,
                                   progress=None) -> list[list[float]]:
    """``[example][choice]`` summed log-probability of the choice's tokens as the decoder's
    target given the prompt as the encoder's input (rank classification by decoder scores).
    ``model`` as for :func:`seq2seq_generate` (a partitioned one: stand-in forwards keep the
    ranks in lockstep)."""
    hf = _hf(model)
    _require_encoder_decoder(hf)
    device = model_device(hf)
    lockstep = Lockstep(hf)
    pairs = [(i, c) for i, cs in enumerate(choices) for c in range(len(cs))]
    for i, c in pairs:
        if not choices[i][c]:
            raise ValueError(f"rank classification: choice {c} of example {i} has no tokens")
    scores = [[0.0] * len(cs) for cs in choices]
    left = [len(cs) for cs in choices]  # choices still to score per example: the bar counts examples
    batches = _by_length([prompts[i] for i, _ in pairs], batch_size)
    for b in range(lockstep.rounds(len(batches))):
        if b >= len(batches):  # a stand-in round (lockstep): one padding token on each side
            one = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
            model(input_ids=one, attention_mask=torch.ones_like(one), labels=one, use_cache=False)
            continue
        rows = batches[b]
        ids, mask = _padded([prompts[pairs[k][0]] for k in rows], pad_id, device)
        labels, _ = _padded([choices[i][c] for i, c in (pairs[k] for k in rows)], -100, device)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).logits.float()
        logp = F.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        total = (logp * (labels != -100)).sum(-1)
        finished = 0
        for r, k in enumerate(rows):
            i, c = pairs[k]
            scores[i][c] = float(total[r])
            left[i] -= 1
            finished += left[i] == 0
        if progress is not None and finished:
            progress.update(finished)
    return scores


def seq2seq_rank_classify(model, prompts, choices, **kwargs) -> list[int]:
    """Index of the most likely choice (decoder scores) for each example (first one on ties)."""
    return best_choices(seq2seq_choice_log_likelihoods(model, prompts, choices, **kwargs))
