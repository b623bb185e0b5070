"""Batched greedy generation and rank classification against unbatched plain-torch references."""

import pytest
import torch
import torch.nn.functional as F

from megamt.eval.generation import choice_log_likelihoods, greedy_generate, rank_classify

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def reference_greedy(model, prompt, max_new):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            tok = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if tok == EOS:
                return out, True
            out.append(tok)
            ids.append(tok)
    return out, False


def test_greedy_batched_equals_unbatched(tiny_lm):
    gen = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 40, (n,), generator=gen).tolist() for n in (3, 9, 5, 1, 12)]
    got = greedy_generate(tiny_lm, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=7, batch_size=3)
    for p, g in zip(prompts, got):
        ids, stopped = reference_greedy(tiny_lm, p, 7)
        assert g.ids == ids and g.stopped == stopped


def test_generation_that_never_stops_is_cut_and_reported(tiny_lm):
    # a model that can never write EOS: its EOS logit is pushed to -inf after the forward
    hook = tiny_lm.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([EOS]), -1e9))
    try:
        got = greedy_generate(tiny_lm, [[1, 5, 6], [1, 7]], eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    finally:
        hook.remove()
    assert [len(g.ids) for g in got] == [4, 4]
    assert not any(g.stopped for g in got)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(tiny_lm, [[1]], eos_id=EOS, pad_id=PAD, max_new_tokens=0)


def test_rank_classification_equals_reference(tiny_lm):
    gen = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 40, (n,), generator=gen).tolist() for n in (4, 10, 6)]
    choices = [[[7, EOS], [8, 9, EOS]], [[7, EOS], [8, 9, EOS]], [[11, EOS], [12, EOS], [13, 14, 15, EOS]]]
    scores = choice_log_likelihoods(tiny_lm, prompts, choices, pad_id=PAD, batch_size=2)
    with torch.no_grad():
        for i, (p, cs) in enumerate(zip(prompts, choices)):
            for c, ch in enumerate(cs):
                logits = tiny_lm(input_ids=torch.tensor([p + ch]), use_cache=False).logits[0]
                logp = F.log_softmax(logits, -1)
                ref = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(ch))
                assert scores[i][c] == pytest.approx(ref, abs=1e-4)
    pred = rank_classify(tiny_lm, prompts, choices, pad_id=PAD)
    assert pred == [max(range(len(s)), key=lambda j: s[j]) for s in scores]


def test_rank_classification_progress_counts_examples_not_choices(tiny_lm):
    """The bar's total is the number of examples: 7 examples with 2-3 choices each advanced it
    to 15-ish before (408 examples of a 2-label task showed 800/408)."""

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    prompts = [[1, 5 + i] for i in range(7)]
    choices = [[[7, EOS], [8, 9, EOS]] if i % 2 else [[7, EOS], [8, EOS], [9, EOS]] for i in range(7)]
    bar = Bar()
    rank_classify(tiny_lm, prompts, choices, pad_id=PAD, batch_size=4, progress=bar)
    assert bar.n == 7
    bar = Bar()
    greedy_generate(tiny_lm, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=2, batch_size=3, progress=bar)
    assert bar.n == 7
