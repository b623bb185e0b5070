"""Batch- vs example-level mixing and dynamic (loss-driven) mixing: the rates each method
sets (held to reference formulas), the floor, curriculum phases, the rates a finished step
used, and exact resume of the rates and the batches (unit level, with fake loss sequences;
the 2-rank run is in tests/integration/test_train_mixing.py)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from megamt.config import ConfigError, DynamicMixtureConfig, MixtureConfig, PhaseConfig, load_config
from megamt.data.errors import DataError
from megamt.data.mixture import TaskMixture, floored, read_targets
from megamt.data.pipeline import TrainPipeline
from megamt.data.shards import build_shards
from megamt.data.synthetic import make_demo_assets

SIZES = {"a": 100, "b": 400, "c": 1600}


def dyn(method, **kw) -> MixtureConfig:
    return MixtureConfig(strategy="dynamic", dynamic=DynamicMixtureConfig(method=method, **kw))


def fake_losses(step: int, rng: random.Random) -> dict[str, float]:
    """Task c's loss stays high, a's falls fast; b is sometimes absent from a step."""
    out = {"a": 2.0 * math.exp(-step / 5) + 0.1 * rng.random(), "c": 3.0 + 0.2 * rng.random()}
    if step % 3:
        out["b"] = 1.5 + 0.1 * rng.random()
    return out


def drive(mx: TaskMixture, steps: range, seed: int = 0) -> list[dict[str, float]]:
    """Feed a fake loss sequence; return the rates of every step (those it was sampled with)."""
    rng = random.Random(seed)
    out = []
    for step in steps:  # 0-based step index; observe after it completes (step + 1)
        out.append(mx.rates(step))
        mx.observe_losses(step + 1, fake_losses(step, rng))
    return out


# --------------------------------------------------------------------------- the methods


def test_group_dro_matches_exponentiated_gradient_reference():
    mx = TaskMixture(SIZES, dyn("group_dro", eta=0.05, min_prob=0.0, init="proportional"))
    rates = drive(mx, range(12))
    log_q = {t: math.log(n / 2100) for t, n in SIZES.items()}
    rng = random.Random(0)
    for step in range(12):
        for t, v in fake_losses(step, rng).items():
            log_q[t] += 0.05 * v
        z = sum(math.exp(v) for v in log_q.values())
        expect = {t: math.exp(v) / z for t, v in log_q.items()}
        got = rates[step + 1] if step + 1 < 12 else mx.rates(12)
        assert got == pytest.approx(expect, rel=1e-12)
    assert mx.rates(12)["c"] > mx.rates(0)["c"]  # the task whose loss stays high gains


def test_exp3_follows_online_data_mixing():
    """Importance-weighted EMA rewards, decaying exploration e_k = min(1/K, sqrt(ln K / (K k)))."""
    cfg = dyn("exp3", smoothing=0.5, min_prob=0.0)
    mx = TaskMixture(SIZES, cfg)
    rates = drive(mx, range(40))
    K = 3
    reward, eps = dict.fromkeys(SIZES, 0.0), 1 / K
    rng = random.Random(0)
    for k in range(1, 41):
        used = rates[k - 1]
        for t, v in fake_losses(k - 1, rng).items():
            reward[t] = 0.5 * reward[t] + 0.5 * v / used[t]
        prev, eps = eps, min(1 / K, math.sqrt(math.log(K) / (K * k)))
        w = {t: math.exp(prev * r) for t, r in reward.items()}
        expect = {t: (1 - K * eps) * w[t] / sum(w.values()) + eps for t in SIZES}
        assert (rates[k] if k < 40 else mx.rates(40)) == pytest.approx(expect, rel=1e-9)
    assert rates[0] == pytest.approx({t: 1 / 3 for t in SIZES})  # uniform exploration first
    final = mx.rates(40)
    assert final["c"] > 1 / 3 > final["a"], final


def test_target_gap_rates_follow_the_gaps_and_files(tmp_path):
    transfer = tmp_path / "transfer.json"
    transfer.write_text(json.dumps({"tasks": [{"task": "a", "single": 80.0}, {"task": "b", "single": 50.0}]}))
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"tasks": {"c": {"metrics": {"f1": 40.0, "exact_match": 30.0}}}}))
    assert read_targets([str(transfer), str(ev)], "metric") == {"a": 80.0, "b": 50.0, "c": 40.0}
    cfg = dyn("target_gap", targets_from=[str(transfer), str(ev)], targets={"c": 60.0}, min_prob=0.05)
    mx = TaskMixture(SIZES, cfg)
    assert mx.rates(0) == pytest.approx({t: 1 / 3 for t in SIZES})
    mx.observe_losses(1, {"a": 9.0})  # training losses do not move target_gap
    results = {"tasks": {"a": {"metrics": {"accuracy": 60.0}}, "b": {"metrics": {"accuracy": 50.0}},
                         "c": {"metrics": {"f1": 30.0, "exact_match": 5.0}}}}
    mx.observe_eval(10, {}, results)
    gaps = {"a": 0.25, "b": 0.0, "c": 0.5}  # (target - score) / target, never below 0
    expect = {t: 0.05 + (1 - 3 * 0.05) * g / 0.75 for t, g in gaps.items()}
    assert mx.rates(10) == pytest.approx(expect) and mx.rates(9) == pytest.approx({t: 1 / 3 for t in SIZES})
    mx.observe_eval(20, {}, {"tasks": {"a": {"metrics": {"accuracy": 90.0}}, "c": {"metrics": {"f1": 70.0}}}})
    assert mx.rates(20) == pytest.approx({t: 1 / 3 for t in SIZES})  # every gap closed: init again
    loss_cfg = dyn("target_gap", target_signal="loss", targets={"a": 1.0, "b": 1.0, "c": 2.0}, min_prob=0.0)
    mx = TaskMixture(SIZES, loss_cfg)
    mx.observe_eval(0, {"a": 1.5, "b": 1.0}, None)  # c never evaluated: the mean gap of the others
    assert mx.rates(0) == pytest.approx({"a": 0.5 / 0.75, "b": 0.0, "c": 0.25 / 0.75})
    with pytest.raises(DataError, match=r"none for \['b'\]"):
        TaskMixture(SIZES, dyn("target_gap", targets={"a": 1.0, "c": 1.0}))
    with pytest.raises(DataError, match="file not found"):
        TaskMixture(SIZES, dyn("target_gap", targets_from=[str(tmp_path / "nope.json")]))


@pytest.mark.parametrize("method", ["exp3", "group_dro", "target_gap"])
def test_floor_phases_every_and_warmup(method):
    phases = [PhaseConfig(0, ["a", "b"]), PhaseConfig(6, [])]
    cfg = dyn(method, min_prob=0.1, every=3, warmup_steps=2, eta=2.0, init="temperature",
              targets={"a": 90.0, "b": 90.0, "c": 90.0})
    cfg.phases = phases
    mx = TaskMixture(SIZES, cfg)
    assert mx.rates(0)["a"] == pytest.approx(floored(mx.dynamic.init, ["a", "b"], 0.1)["a"])
    rng = random.Random(1)
    seen = []
    for step in range(30):
        r = mx.rates(step)
        assert sum(r.values()) == pytest.approx(1.0)
        active = ["a", "b"] if step < 6 else list(SIZES)
        assert all(r[t] >= 0.1 - 1e-12 for t in active) and all(r[t] == 0 for t in SIZES if t not in active)
        seen.append(mx.dynamic.version_at(step))
        mx.observe_losses(step + 1, fake_losses(step, rng))
        if method == "target_gap" and (step + 1) % 5 == 0:
            mx.observe_eval(step + 1, {}, {"tasks": {t: {"metrics": {"m": rng.uniform(0, 90)}} for t in SIZES}})
    if method == "target_gap":
        assert seen[:5] == [0] * 5 and len(set(seen)) == 6  # an update at every evaluation
    else:  # warmup: steps 1-2 ignored; then an update after steps 5, 8, 11, ... (every 3)
        assert seen[:5] == [0] * 5 and seen[5] == 1 and seen[7] == 1 and seen[8] == 2
        assert len(set(seen)) == 1 + (30 - 2) // 3


def test_config_checks():
    with pytest.raises(ConfigError, match="min_prob"):
        load_config(None, ["tasks={a: {}, b: {}, c: {}}", "mixture.strategy=dynamic", "mixture.dynamic.min_prob=0.4"])
    with pytest.raises(ConfigError, match="target_gap: updates at every validation point") as e:
        load_config(None, ["tasks={a: {}, b: {}}", "mixture.strategy=dynamic", "mixture.dynamic.method=target_gap"])
    assert "eval.during_training" in str(e.value) and "needs targets" in str(e.value)
    with pytest.raises(ConfigError, match="phases.0.weights"):
        load_config(None, ["tasks={a: {}, b: {}}", "mixture.strategy=dynamic", "mixture.phases=[{weights: {a: 2}}]"])
    with pytest.raises(ConfigError, match="mixture.level"):
        load_config(None, ["tasks={a: {}}", "mixture.level=task"])
    with pytest.raises(ConfigError, match="would have no effect"):
        load_config(None, ["tasks={a: {}, b: {}}", "mixture.level=batch", "gradients.method=pcgrad"])


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["exp3", "group_dro", "target_gap"])
def test_mixture_state_resumes_the_same_rates(method):
    cfg = dyn(method, every=2, targets={"a": 50.0, "b": 60.0, "c": 70.0})
    ref, k = TaskMixture(SIZES, cfg), 13

    def run(mx, steps, seed):
        rng = random.Random(seed)
        out = []
        for step in steps:
            out.append(mx.rates(step))
            mx.observe_losses(step + 1, fake_losses(step, rng))
            if (step + 1) % 4 == 0:
                mx.observe_eval(step + 1, fake_losses(step, rng), {"tasks": {t: {"metrics": {"m": 10.0 * step % 60}}
                                                                             for t in SIZES}})
        return out

    first = run(ref, range(k), 0)
    state = json.loads(json.dumps(ref.state_dict()))
    rest = run(ref, range(k, 40), 1)
    resumed = TaskMixture(SIZES, cfg)
    resumed.load_state_dict(state)
    assert run(resumed, range(k, 40), 1) == rest  # exactly, floats included
    assert len({json.dumps(r) for r in first + rest}) > 3  # the rates did move


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    a = make_demo_assets(root, seed=3, n_train=40, n_val=8)
    build_shards(load_config(a.spec, ["data.shard_max_examples=16"]), a.shards, a.tokenizer, progress=False, log=None)
    return a, ["data.seq_len=96", "train.micro_batch_size=2", "data.pack_buffer=8"]


def micro_batch_tasks(b, names) -> set[str]:
    return {names[int(t)] for t in b["task_ids"].unique().tolist() if t >= 0}


def test_batch_level_one_task_per_micro_batch_at_the_mixture_rates(demo):
    a, over = demo
    cfg = load_config(a.spec, over + ["mixture.level=batch", "mixture.strategy=explicit", "tasks.sentiment.weight=3",
                                      "tasks.nli.weight=1", "tasks.qa.weight=0", "tasks.ner.weight=0",
                                      "tasks.summ.weight=0", "tasks.instruct.weight=0"])
    lines = []
    p = TrainPipeline(cfg, 0, 1, log=lines.append)
    assert "one task per micro-batch" in lines[0]
    names = list(cfg.tasks)
    counts = Counter()
    for _ in range(200):
        tasks = micro_batch_tasks(p.next_batch(), names)
        assert len(tasks) == 1
        counts[tasks.pop()] += 1
    assert set(counts) == {"sentiment", "nli"}
    sd = math.sqrt(200 * 0.75 * 0.25)
    assert abs(counts["sentiment"] - 150) < 4.5 * sd
    # example level on the same config mixes tasks inside micro-batches
    cfg.mixture.level = "example"
    p = TrainPipeline(cfg, 0, 1, log=None)
    assert any(len(micro_batch_tasks(p.next_batch(), names)) > 1 for _ in range(20))


@pytest.mark.parametrize("level,method", [("batch", "group_dro"), ("example", "exp3"), ("batch", "target_gap")])
def test_pipeline_exact_resume_with_dynamic_rates(demo, level, method):
    """Batches and rates after a resume equal an uninterrupted run's, with the mixture state
    (rates, rewards / weights / gaps, window sums) and every RNG in the pipeline state."""
    a, over = demo
    cfg = load_config(a.spec, over + [f"mixture.level={level}", "mixture.strategy=dynamic",
                                      f"mixture.dynamic.method={method}", "mixture.dynamic.every=2",
                                      "mixture.dynamic.eta=1.0", "train.eval_every=5", "eval.during_training=true",
                                      "mixture.dynamic.targets={sentiment: 60, nli: 60, qa: 60, ner: 60, "
                                      "summ: 60, instruct: 60}"])
    names = list(cfg.tasks)
    k, n = 9, 24

    def run(p, steps):
        out = []
        rng = random.Random(7)
        for step in steps:
            p.set_step(step)
            batches = [p.next_batch(), p.next_batch()]
            out.append((batches, p.rates()))
            losses = {t: 1.0 + ((step * 7 + i * 3) % 5) / 2 for i, t in enumerate(names)}
            p.observe_losses(step + 1, losses)
            if (step + 1) % 5 == 0:
                p.observe_eval(step + 1, losses, {"tasks": {t: {"metrics": {"m": rng.uniform(0, 60)}} for t in names}})
        return out

    ref = TrainPipeline(cfg, 0, 1, log=None)
    run(ref, range(k))
    state = json.loads(json.dumps(ref.state_dict()))
    want = run(ref, range(k, n))
    resumed = TrainPipeline(cfg, 0, 1, log=None)
    resumed.load_state_dict(state)
    got = run(resumed, range(k, n))
    for (bw, rw), (bg, rg) in zip(want, got):
        assert rw == rg
        for x, y in zip(bw, bg):
            assert x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x if torch.is_tensor(x[key]))
    assert len({json.dumps(r) for _, r in want}) > 1  # the rates moved after the resume point
    if level == "batch":
        assert all(len(micro_batch_tasks(b, names)) == 1 for bs, _ in want for b in bs)


def test_readme_task_types_and_mixing_snippet_is_a_valid_config():
    """The YAML of README's "Task types and mixing" section uses real keys and values."""
    import yaml

    from megamt.config import config_from_dict

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Task types and mixing", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = config_from_dict(yaml.safe_load(block))
    assert cfg.mixture.level == "batch" and cfg.mixture.dynamic.method == "exp3"
    assert cfg.tasks["pos"].inputs["train"].tag_column == "pos" and cfg.tasks["piqa"].fields["choices"] == "sol1,sol2"


def test_a_run_stopped_before_its_validation_revalidates_on_resume_for_target_gap():
    """The trainer checkpoints a stop (signal, stop_at_step) before that step's validation;
    target_gap's rates depend on it, so the resumed run validates first (the predicate the
    trainer's loop uses, on stand-in objects)."""
    from types import SimpleNamespace

    from megamt.trainer import MultitaskTrainer

    def trainer(method, step, last_eval):
        mx = TaskMixture(SIZES, dyn(method, targets={t: 1.0 for t in SIZES}, target_signal="loss"))
        if method == "target_gap":
            mx.dynamic.last_eval = last_eval
        tcfg = SimpleNamespace(eval_every=4, max_steps=20)
        return SimpleNamespace(pipeline=SimpleNamespace(mixture=mx), tcfg=tcfg, step=step)

    missed = MultitaskTrainer.missed_validation
    assert missed(trainer("target_gap", 8, 4))          # stopped after step 8, its validation not done
    assert not missed(trainer("target_gap", 8, 8))      # validated, then checkpointed (save_every)
    assert not missed(trainer("target_gap", 7, 4))      # not a validation step
    assert not missed(trainer("target_gap", 20, 16))    # the last step: train() validates at the end
    assert not missed(trainer("group_dro", 8, 4))       # only target_gap reads evaluations


def test_target_gap_a_zero_metric_target_is_met_at_once():
    """A single-task reference that scored 0 (too few steps to learn the task) is a target of 0:
    its gap is 0, the task keeps the floor; a loss target must stay > 0."""
    mx = TaskMixture(SIZES, dyn("target_gap", targets={"a": 0.0, "b": 50.0, "c": 50.0}, min_prob=0.1))
    mx.observe_eval(0, {}, {"tasks": {t: {"metrics": {"f1": 0.0}} for t in SIZES}})
    assert mx.rates(0) == pytest.approx({"a": 0.1, "b": 0.45, "c": 0.45})
    with pytest.raises(DataError, match="> 0"):
        TaskMixture(SIZES, dyn("target_gap", target_signal="loss", targets={"a": 0.0, "b": 1.0, "c": 1.0}))
    with pytest.raises(ConfigError, match="targets.a: must be a finite number > 0"):
        load_config(None, ["tasks={a: {}, b: {}}", "mixture.strategy=dynamic", "mixture.dynamic.method=target_gap",
                           "mixture.dynamic.target_signal=loss", "mixture.dynamic.targets={a: 0, b: 1}",
                           "train.eval_every=5"])
