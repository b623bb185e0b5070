"""Encoder-decoder evaluation: batched generation (greedy and beam) and rank classification
by decoder scores against one-example-at-a-time references; evaluate() end to end on the demo
corpus with a tiny T5; the errors of a model that cannot generate."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megamt.config import load_config
from megamt.eval import api
from megamt.eval.generation import seq2seq_choice_log_likelihoods, seq2seq_generate, seq2seq_rank_classify

EOS, PAD = 1, 0


def _t5(vocab: int = 40, eos: int = EOS, pad: int = PAD) -> dict:
    return {"model_type": "t5", "vocab_size": vocab, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
            "num_heads": 4, "relative_attention_num_buckets": 8, "dropout_rate": 0.0,
            "decoder_start_token_id": pad, "pad_token_id": pad, "eos_token_id": eos}


BART = {"model_type": "bart", "vocab_size": 40, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48,
        "max_position_embeddings": 64, "dropout": 0.0, "decoder_start_token_id": EOS, "pad_token_id": PAD,
        "eos_token_id": EOS, "bos_token_id": 2, "forced_eos_token_id": None}


@pytest.fixture(scope="module", params=["t5", "bart"])
def model(request):
    """The backbone of a MultitaskModel: BART carries megamt's packed attention, which must
    fall back to transformers' own on unpacked (padded) batches."""
    from megamt.config import ModelConfig, MultitaskConfig, TaskConfig
    from megamt.model import MultitaskModel

    torch.manual_seed(0)
    fc = _t5() if request.param == "t5" else BART
    return MultitaskModel(MultitaskConfig(tasks={"a": TaskConfig()}, model=ModelConfig(from_config=fc))).backbone.eval()


def _prompts(seed: int, lengths) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40, (n,), generator=gen).tolist() + [EOS] for n in lengths]


def reference_greedy(model, prompt, max_new):
    """Argmax decoding with a full forward per step, no cache, one example, no padding."""
    dec = [model.config.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec]),
                           use_cache=False).logits
            tok = int(logits[0, -1].argmax())
            if tok == EOS:
                return dec[1:], True
            dec.append(tok)
    return dec[1:], False


def test_greedy_batched_equals_one_by_one_reference(model):
    prompts = _prompts(0, (3, 9, 5, 1, 12))
    got = seq2seq_generate(model, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=6, batch_size=3)
    for p, g in zip(prompts, got):
        ids, stopped = reference_greedy(model, p, 6)
        assert g.ids == ids and g.stopped == stopped


def test_beam_search_batched_equals_unbatched(model):
    prompts = _prompts(1, (4, 11, 2, 7))
    got = seq2seq_generate(model, prompts, eos_id=EOS, pad_id=PAD, max_new_tokens=5, num_beams=3, batch_size=4)
    for p, g in zip(prompts, got):
        alone = seq2seq_generate(model, [p], eos_id=EOS, pad_id=PAD, max_new_tokens=5, num_beams=3)[0]
        assert g == alone
        assert len(g.ids) <= 5


def test_generation_that_never_stops_is_cut_and_reported(model):
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([EOS]), -1e9))
    try:
        got = seq2seq_generate(model, _prompts(2, (3, 6)), eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    finally:
        hook.remove()
    assert [len(g.ids) for g in got] == [4, 4] and not any(g.stopped for g in got)


def test_rank_classification_by_decoder_scores_equals_reference(model):
    prompts = _prompts(3, (4, 10, 6))
    choices = [[[5, EOS], [6, 7, EOS]], [[8, EOS], [9, EOS], [10, 11, 12, EOS]], [[13, EOS], [5, EOS]]]
    got = seq2seq_choice_log_likelihoods(model, prompts, choices, pad_id=PAD, batch_size=2)
    for p, cs, scores in zip(prompts, choices, got):
        for c, s in zip(cs, scores):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p]), labels=torch.tensor([c])).logits[0]
            ref = float(F.log_softmax(logits.float(), -1)[torch.arange(len(c)), torch.tensor(c)].sum())
            assert s == pytest.approx(ref, abs=1e-4)
    picks = seq2seq_rank_classify(model, prompts, choices, pad_id=PAD)
    assert picks == [max(range(len(s)), key=lambda j: s[j]) for s in got]


def test_encoder_only_model_asked_to_generate_is_refused():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=32))
    with pytest.raises(ValueError, match="is_encoder_decoder: true; an encoder-only model cannot generate"):
        seq2seq_generate(bert, [[3, 4, EOS]], eos_id=EOS, pad_id=PAD, max_new_tokens=2)


# --------------------------------------------------------------------------- evaluate() end to end


@pytest.fixture(scope="module")
def demo_t5(tmp_path_factory):
    from megamt.data.synthetic import make_demo_assets
    from megamt.data.tokenize import load_tokenizer, special_ids
    from megamt.model import MultitaskModel

    demo = make_demo_assets(tmp_path_factory.mktemp("demo"), n_train=24, n_val=6, seq_len=128)
    tok = load_tokenizer(demo.tokenizer)
    ids = special_ids(tok)
    fc = _t5(len(tok), ids["eos"], ids["pad"])
    cfg = load_config(demo.spec, ["model.family=auto", "model.from_config=" + json.dumps(fc), "data.seq_len=96"])
    torch.manual_seed(0)
    return demo, MultitaskModel(cfg)


def test_evaluate_t5_every_task_type(demo_t5, tmp_path):
    """Generation tasks by beam search here (eval.num_beams=2; greedy: the tests above)."""
    demo, model = demo_t5
    assert model.family == "seq2seq"
    model.config.eval.num_beams = 2
    res = api.evaluate(model, max_examples=3, max_new_tokens=3, out_dir=tmp_path, progress=False)
    assert res["family"] == "seq2seq"
    assert set(res["tasks"]) == {"sentiment", "nli", "qa", "ner", "summ", "instruct"}
    for e in res["tasks"].values():
        assert e["n_examples"] == 3 and e["metrics"]
        assert all(0.0 <= v <= 100.0 for v in e["metrics"].values())
    assert res["tasks"]["sentiment"]["cut_generations"] == 0  # rank classification never generates
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["tasks"]["summ"]["metrics"] == res["tasks"]["summ"]["metrics"]
    preds = [json.loads(l) for l in (tmp_path / "predictions" / "qa.jsonl").read_text().splitlines()]
    cut = sum(not p["stopped"] for p in preds)
    assert cut == res["tasks"]["qa"]["cut_generations"]
    assert "| summ |" in (tmp_path / "eval.md").read_text()
