"""Dynamic, batch-level mixing in a real 2-rank ZeRO-3 run (deepspeed launcher, CPU).

Three launches on the demo corpus with ``mixture.strategy=dynamic`` (group_dro, updated every
2 steps from the all-reduced task losses) and ``mixture.level=batch``: one uninterrupted run,
one stopped after step 3 (mid-window: a step's losses already summed for the next update) and
resumed. The resumed run logs the same rates and losses at every step, and both ranks hold
the same mixture state, computed without a collective of its own.

Two more with ``target_gap`` on the metrics of the 2-rank evaluation during training (every 2
steps), stopped right after step 2 (a validation step: it checkpoints before validating) and
resumed: the resumed run does the missed evaluation, and the rates from each evaluation on
follow the paper's formula from the scores in that evaluation's ``eval.json``, on both ranks.
"""

from __future__ import annotations

import json

import pytest
import torch

from test_train_deepspeed import TASKS, finish_ok, launch, log_text, step_losses

pytestmark = pytest.mark.integration

STEPS = 6
MIX = ["mixture.strategy=dynamic", "mixture.dynamic.method=group_dro", "mixture.dynamic.eta=0.5",
       "mixture.dynamic.every=2", "mixture.level=batch", "train.grad_accum=2", f"train.max_steps={STEPS}",
       "train.save_every=0", "train.eval_at_start=false", "train.keep_last=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megamt.demo import prepare

    out = tmp_path_factory.mktemp("mixing")
    config = prepare(out, n_train=60, n_val=8, seq_len=128, steps=STEPS)
    full = out / "full"
    finish_ok(launch(config, full, *MIX), full, 400)
    stopped = out / "stopped"
    finish_ok(launch(config, stopped, *MIX, "train.stop_at_step=3"), stopped, 400)
    assert "train.stop_at_step reached: checkpointing at step 3" in log_text(stopped)
    finish_ok(launch(config, stopped, *MIX), stopped, 400)
    return full, stopped


def test_resume_reproduces_rates_and_losses(runs):
    full, stopped = runs
    ref, got = step_losses(full), step_losses(stopped)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    probs = {s: {k: v for k, v in ref[s].items() if k.startswith("mix/prob/")} for s in ref}
    assert len(probs[1]) == 6 and all(abs(sum(p.values()) - 1) < 1e-9 for p in probs.values())
    # rates: fixed for steps 1-2, updated after steps 2 and 4 from the losses
    assert probs[1] == probs[2] != probs[3] == probs[4] != probs[5] == probs[6]
    for step in ref:
        for k, v in ref[step].items():
            if k.startswith("mix/prob/"):
                assert got[step][k] == v, (step, k)
            elif k.startswith("train/loss"):
                assert abs(got[step][k] - v) <= 1e-6, (step, k, got[step][k], v)


def test_ranks_hold_the_same_mixture_state(runs):
    full, _ = runs
    folder = full / "checkpoints" / f"step_{STEPS:08d}"
    states = [torch.load(folder / f"megamt_state_rank{r}.pt", weights_only=True) for r in range(2)]
    mixtures = [s["pipeline"]["mixture"]["dynamic"] for s in states]
    assert mixtures[0] == mixtures[1] and mixtures[0]["updates"] == STEPS // 2
    assert states[0]["extra"]["mixture"] == states[0]["pipeline"]["mixture"]  # kept for an elastic resume
    assert states[0]["pipeline"]["rng"] != states[1]["pipeline"]["rng"]  # each rank draws its own batches


GAP_TARGET = 90.0
GAP = ["mixture.strategy=dynamic", "mixture.dynamic.method=target_gap", "mixture.dynamic.min_prob=0",
       "mixture.dynamic.targets={%s}" % ", ".join(f"{t}: {GAP_TARGET}" for t in TASKS),
       "eval.during_training=true", "eval.max_examples=4", "eval.max_new_tokens=4", "train.eval_every=2",
       f"train.max_steps={STEPS}", "train.save_every=0", "train.eval_at_start=false", "train.keep_last=1"]


def test_target_gap_follows_the_evaluations_and_resumes_the_missed_one(tmp_path):
    from megamt.data.mixture import primary_scores
    from megamt.demo import prepare

    config = prepare(tmp_path, n_train=60, n_val=8, seq_len=128, steps=STEPS)
    run = tmp_path / "gap"
    finish_ok(launch(config, run, *GAP, "train.stop_at_step=2"), run, 400)
    assert not (run / "eval" / "step_00000002").exists()  # stopped before validating
    finish_ok(launch(config, run, *GAP), run, 400)
    logged = step_losses(run)
    assert sorted(logged) == list(range(1, STEPS + 1))
    probs = {s: {k[len("mix/prob/"):]: v for k, v in r.items() if k.startswith("mix/prob/")} for s, r in logged.items()}
    assert probs[1] == probs[2] and all(abs(v - 1 / len(TASKS)) < 1e-12 for v in probs[1].values())  # init uniform
    for at in range(2, STEPS, 2):  # an evaluation after step `at` sets the rates of steps at+1, at+2
        scores = primary_scores(json.loads((run / "eval" / f"step_{at:08d}" / "eval.json").read_text()))
        assert set(scores) == set(TASKS), scores
        gaps = {t: max(0.0, (GAP_TARGET - v) / GAP_TARGET) for t, v in scores.items()}
        want = {t: g / sum(gaps.values()) for t, g in gaps.items()}
        for step in (at + 1, at + 2):
            assert probs[step] == pytest.approx(want, abs=1e-9), (step, scores)
    assert len({tuple(sorted(p.items())) for p in probs.values()}) > 1  # the scores moved the rates
    folder = run / "checkpoints" / f"step_{STEPS:08d}"
    states = [torch.load(folder / f"megamt_state_rank{r}.pt", weights_only=True) for r in range(2)]
    mixtures = [st["pipeline"]["mixture"]["dynamic"] for st in states]
    assert mixtures[0] == mixtures[1] and mixtures[0]["extra"]["last_eval"] == STEPS - 2
