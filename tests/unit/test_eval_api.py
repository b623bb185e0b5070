"""evaluate / evaluate_zero_shot / the eval CLI on the demo corpus with tiny models."""

import json
from pathlib import Path

import pytest
import torch

from megamt.config import load_config
from megamt.eval import api
from megamt.eval.api import EvalError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megamt.data.synthetic import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("demo"), n_train=24, n_val=6, seq_len=128)


@pytest.fixture(scope="module")
def causal(demo):
    from megamt.model import MultitaskModel

    torch.manual_seed(0)
    return MultitaskModel(load_config(demo.spec, ["model.fused_loss=false"]))


@pytest.fixture(scope="module")
def encoder(demo):
    from megamt.data.tokenize import load_tokenizer
    from megamt.model import MultitaskModel

    vocab = len(load_tokenizer(demo.tokenizer))
    cfg = load_config(demo.spec, [
        "model.family=encoder", "model.from_config={model_type: bert, vocab_size: %d, hidden_size: 32, "
        "num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 128}" % vocab])
    for t in ("summ", "instruct"):
        del cfg.tasks[t]
    torch.manual_seed(0)
    return MultitaskModel(cfg)


def _gold(demo, task, split="validation"):
    from megamt.data.formats import read_examples

    cfg = load_config(demo.spec)
    return list(read_examples(task, cfg.tasks[task], split))


def test_causal_lm_every_task_type(demo, causal, tmp_path):
    res = api.evaluate(causal, max_examples=4, max_new_tokens=3, out_dir=tmp_path, progress=False)
    assert set(res["tasks"]) == {"sentiment", "nli", "qa", "ner", "summ", "instruct"}
    for name, e in res["tasks"].items():
        assert e["n_examples"] == 4 and e["template"] and e["metrics"]
        assert all(0.0 <= v <= 100.0 for v in e["metrics"].values())
    # rank classification never generates; generation is cut at 3 tokens unless EOS came first
    assert res["tasks"]["sentiment"]["cut_generations"] == 0
    assert res["tasks"]["qa"]["template"] == "qa_read"
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["tasks"]["ner"]["metrics"] == res["tasks"]["ner"]["metrics"]
    assert "| sentiment | classification |" in (tmp_path / "eval.md").read_text()
    # the reported accuracy is the accuracy of the written predictions against the gold labels
    preds = [json.loads(l) for l in (tmp_path / "predictions" / "sentiment.jsonl").read_text().splitlines()]
    gold = _gold(demo, "sentiment")[:4]
    assert [p["key"] for p in preds] == [g.key for g in gold]
    acc = 100 * sum(p["prediction"] == g.fields["label"] for p, g in zip(preds, gold)) / 4
    assert res["tasks"]["sentiment"]["metrics"]["accuracy"] == pytest.approx(acc)


def test_encoder_heads_eval(demo, encoder, tmp_path):
    res = api.evaluate(encoder, max_examples=5, out_dir=tmp_path, progress=False)
    assert set(res["tasks"]) == {"sentiment", "nli", "qa", "ner"}
    assert res["family"] == "encoder"
    assert set(res["tasks"]["ner"]["metrics"]) == {"entity_f1", "entity_precision", "entity_recall"}
    qa_gold = _gold(demo, "qa")[:5]
    preds = [json.loads(l)["prediction"] for l in (tmp_path / "predictions" / "qa.jsonl").read_text().splitlines()]
    assert all(p in g.fields["context"] for p, g in zip(preds, qa_gold))  # spans are cut from the context
    ner = [json.loads(l)["prediction"] for l in (tmp_path / "predictions" / "ner.jsonl").read_text().splitlines()]
    assert [len(p) for p in ner] == [len(g.fields["tokens"]) for g in _gold(demo, "ner")[:5]]


def test_zero_shot_records_and_ratio(causal, tmp_path):
    records = [{"sentence": "a great fun film", "y": "positive"}, {"sentence": "dull and bad", "y": "negative"}]
    res = causal.evaluate_zero_shot(task_name="movie_reviews", test_dataset=records, task_type="classification",
                                    fields={"text": "sentence", "label": "y"}, labels=["negative", "positive"],
                                    instruction="Is this review positive or negative?",
                                    templates=["Review: {text}\nSentiment ({options}): ||| {answer}"],
                                    supervised={"movie_reviews": {"accuracy": 80.0, "macro_f1": 80.0}},
                                    out_dir=tmp_path, progress=False)
    e = res["tasks"]["movie_reviews"]
    assert e["zero_shot"] and e["n_examples"] == 2 and e["template"] == "inline0"
    assert e["ratio"]["accuracy"] == pytest.approx(e["metrics"]["accuracy"] / 80.0)
    assert "| movie_reviews |" in (tmp_path / "eval.md").read_text()


def test_bad_requests_are_named(demo, causal, encoder, tmp_path):
    with pytest.raises(EvalError) as err:
        api.evaluate(causal, {"nosuchtask": {}, "sentiment": {"metrics": ["bleu"]}}, progress=False)
    assert "tasks.nosuchtask: unknown task" in str(err.value) and "unknown metric 'bleu'" in str(err.value)
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(EvalError, match="empty"):
        api.evaluate(causal, {"sentiment": {"inputs": {"validation": {"path": str(empty), "format": "tsv"}}}},
                     progress=False)
    with pytest.raises(EvalError, match="causal_lm"):
        encoder.evaluate_zero_shot(task_name="x", test_dataset=[{"text": "a", "label": "b"}],
                                   task_type="classification")


def test_checkpoint_from_another_tokenizer(demo, causal, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megamt.data.synthetic import build_tokenizer
    from megamt.data.tokenize import load_tokenizer

    small = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(EvalError, match="another tokenizer"):
        api.check_tokenizer_matches(load_tokenizer(demo.tokenizer), small)
    # same size, different vocabulary: caught by the vocabulary hash of the shards manifest
    other = build_tokenizer(["completely different words here"] * 3, tmp_path / "tok", vocab_size=60)
    (tmp_path / "shards").mkdir()
    from megamt.data.tokenize import vocab_hash

    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(
        {"tasks": {}, "tokenizer": {"path": str(demo.tokenizer), "vocab_hash": vocab_hash(load_tokenizer(demo.tokenizer))}}))
    with pytest.raises(EvalError, match="vocab hash"):
        api.check_tokenizer_matches(load_tokenizer(other), causal, manifest_dir=str(tmp_path / "shards"))


def test_log_eval_writes_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from megamt.eval.report import log_eval

    results = {"tasks": {"sst2": {"metrics": {"accuracy": 90.0, "macro_f1": 89.5}},
                         "zs": {"metrics": {"f1": 40.0}, "ratio": {"f1": 0.5}}}}
    w = SummaryWriter(str(tmp_path))
    assert log_eval(w, 7, results) == 4
    w.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"eval/sst2/accuracy", "eval/sst2/macro_f1", "eval/zs/f1",
                                          "eval/zs/f1_zero_shot_ratio"}
    ev = acc.Scalars("eval/sst2/accuracy")[0]
    assert ev.step == 7 and ev.value == pytest.approx(90.0)
    assert log_eval(None, 1, results) == 0


def test_encoder_qa_windows_find_the_same_span_as_one_long_window(demo, encoder, monkeypatch):
    """Doc-stride evaluation: with span logits that depend on each token alone (a
    position-free stand-in for the encoder), the best span over short overlapping windows
    must be the best span of one window holding the whole context (every span of at most
    ``qa_doc_stride`` + 1 tokens lies whole in some window)."""
    import copy
    import dataclasses

    from megamt.data.tokenize import load_tokenizer

    enc_model = encoder.backbone
    emb = enc_model.backbone.embeddings.word_embeddings
    monkeypatch.setattr(enc_model, "encode", lambda batch: emb(batch["input_ids"]))
    tok = load_tokenizer(demo.tokenizer)
    gold = _gold(demo, "qa")
    contexts = [g.fields["context"] for g in gold]
    # long contexts: each example's context among the others' (4 to 9 contexts each)
    examples = [dataclasses.replace(g, fields={**g.fields, "context": " ".join(contexts[i:] + contexts[:i])[:400]})
                for i, g in enumerate(gold)]
    et = api.resolve_tasks(encoder.config, ["qa"])[0]

    def run(seq_len, stride):
        cfg = copy.deepcopy(encoder.config)
        cfg.data.seq_len, cfg.data.qa_doc_stride, cfg.eval.max_answer_tokens = seq_len, stride, 5
        local, _ = api._predict_encoder(api._routed(enc_model, enc_model), tok, cfg, et, examples,
                                        list(range(len(examples))), 4, False)
        return [p for _, p, _ in sorted(local)]

    longest = max(len(tok(e.fields["question"], e.fields["context"])["input_ids"]) for e in examples)
    whole = run(longest + 1, 0)  # one window each
    short = max(len(tok(e.fields["question"])["input_ids"]) for e in examples) + 14
    assert min(len(api._qa_windows(tok, e, short, 6)) for e in examples) >= 3
    assert all(len(api._qa_windows(tok, e, longest + 1, 6)) == 1 for e in examples)
    assert run(short, 6) == whole
    assert all(p and p in e.fields["context"] for p, e in zip(whole, examples))
    # stride 0: the first window only (truncated): the best span of the whole context is not always in it
    assert run(short, 0) != whole


def test_all_templates_reports_each_and_the_mean(demo, causal, tmp_path):
    from megamt.eval.report import log_eval

    res = api.evaluate(causal, ["sentiment", "qa"], max_examples=4, max_new_tokens=3, out_dir=tmp_path,
                       progress=False, all_templates=True)
    one = api.evaluate(causal, ["sentiment", "qa"], max_examples=4, max_new_tokens=3, progress=False)
    for name in ("sentiment", "qa"):
        e = res["tasks"][name]
        per = e["per_template"]
        assert len(per) >= 2, per  # the task type's built-in templates
        # the first template's metrics are the single-template evaluation's
        assert per[e["first_template"]] == one["tasks"][name]["metrics"]
        assert e["first_template"] == one["tasks"][name]["template"]
        for m, mean in e["metrics"].items():
            vals = [v[m] for v in per.values()]
            assert mean == pytest.approx(sum(vals) / len(vals))
            sp = e["template_spread"][m]
            assert sp["min"] == min(vals) and sp["max"] == max(vals) and sp["std"] >= 0
        for tpl in list(per)[1:]:  # every template's predictions are written
            assert (tmp_path / "predictions" / f"{name}.{tpl}.jsonl").is_file()
    assert " ± " in (tmp_path / "eval.md").read_text()

    class Writer:
        tags: list = []

        def add_scalar(self, tag, value, step):
            self.tags.append(tag)

        def flush(self):
            pass

    w = Writer()
    log_eval(w, 1, res)
    assert "eval/sentiment/accuracy_template_std" in w.tags and "eval/sentiment/accuracy" in w.tags


@pytest.mark.parametrize("template", ["zero3", "zero3_offload", "zero2_offload"])
def test_inference_ds_config_is_zero3_without_optimizer(demo, template):
    """`megamt eval` under a launcher: the training template resolved the same way, then
    stage 3 with no optimizer, scheduler or optimizer offload (parameter offload kept)."""
    from megamt.ds_config import load_template
    from megamt.eval.evaluate import inference_ds_config

    ds = inference_ds_config(load_config(demo.spec, [f"train.ds_config={template}"]))
    assert ds["zero_optimization"]["stage"] == 3
    assert "optimizer" not in ds and "scheduler" not in ds and "offload_optimizer" not in ds["zero_optimization"]
    param_offload = load_template(template)[0]["zero_optimization"].get("offload_param")
    assert ds["zero_optimization"].get("offload_param") == param_offload


def test_inference_ds_config_bounds_the_parameters_gathered_at_once(demo):
    """eval.max_live_parameters: 0 (default) -> two prefetch buckets and no reuse distance; N ->
    N; -1 -> the template's own 1e9 (see test_trainer_hot_path.py for the measured effect)."""
    from megamt.eval.evaluate import inference_ds_config

    zero = inference_ds_config(load_config(demo.spec))["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 2 * zero["stage3_prefetch_bucket_size"]
    assert zero["stage3_max_reuse_distance"] == 0
    zero = inference_ds_config(load_config(demo.spec, ["eval.max_live_parameters=12345"]))["zero_optimization"]
    assert (zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"]) == (12345, 0)
    zero = inference_ds_config(load_config(demo.spec, ["eval.max_live_parameters=-1"]))["zero_optimization"]
    assert float(zero["stage3_max_live_parameters"]) == float(zero["stage3_max_reuse_distance"]) == 1e9
    with pytest.raises(Exception, match="eval.max_live_parameters"):
        load_config(demo.spec, ["eval.max_live_parameters=-2"])
