"""The checkpoint component without DeepSpeed: atomic `latest`, pruning, state round trip."""

import os
import random

import numpy as np
import pytest
import torch

from megamt.checkpoint import CheckpointManager, find_checkpoint, read_latest, rng_state, set_rng_state


class FakeEngine:
    """Writes/reads a file per rank, like engine.save_checkpoint / load_checkpoint."""

    def __init__(self, fail_on=None):
        self.fail_on, self.loaded = fail_on, None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed must not write its own `latest`
        if tag.startswith(str(self.fail_on)):
            raise RuntimeError("disk full")
        os.makedirs(f"{save_dir}/{tag}", exist_ok=True)
        torch.save({"step": client_state["megamt_step"]}, f"{save_dir}/{tag}/model.pt")

    def load_checkpoint(self, load_dir, tag, **kw):
        self.loaded = tag
        return f"{load_dir}/{tag}", {}


def test_save_prune_latest_and_load(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2, rank=0, world_size=1)
    assert mgr.latest_tag() is None
    for step in (3, 6, 9):
        mgr.save(FakeEngine(), step, {"pipeline": {"drawn": step}, "rng": rng_state()}, {"note.txt": "x"})
    assert read_latest(tmp_path / "ckpt") == "step_00000009"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["step_00000006", "step_00000009"]
    assert find_checkpoint(tmp_path / "ckpt") == (tmp_path / "ckpt", "step_00000009")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000001").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step_00000001")
    assert find_checkpoint(run_dir) == (run_dir / "checkpoints", "step_00000001")
    assert find_checkpoint(tmp_path / "ckpt" / "step_00000006")[0] is None  # no model_states file in the fake
    engine = FakeEngine()
    state = mgr.load(engine, "step_00000009")
    assert engine.loaded == "step_00000009" and state["step"] == 9 and state["pipeline"] == {"drawn": 9}


def test_every_part_of_the_trainer_state_round_trips(tmp_path):
    """Each key the trainer saves comes back (a key missing from STATE_KEYS would be dropped
    silently): balancer, gradient-method state (GradVac's EMA targets), extra."""
    from megamt.gradients.methods import build_method

    gradvac = build_method("gradvac", 3, gradvac_beta=0.5, seed=1)
    G = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 2.0, 0.1], [0.2, 0.1, 1.5]], dtype=torch.float64)
    gradvac.coefficients(G, tasks=[0, 1, 2])
    rank_state = {"pipeline": {"drawn": 1}, "rng": rng_state(), "balancer": {"name": "dwa", "w": torch.ones(3)},
                  "surgery": {"method": gradvac.state_dict()}, "extra": {"consecutive_nonfinite": 2}}
    mgr = CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=1)
    mgr.save(FakeEngine(), 4, rank_state, {})
    state = mgr.load(FakeEngine(), "step_00000004")
    for key, value in rank_state.items():
        if key != "rng":
            assert key in state, key
    fresh = build_method("gradvac", 3, gradvac_beta=0.5, seed=1)
    fresh.load_state_dict(state["surgery"]["method"])
    assert fresh.step == gradvac.step == 1 and np.array_equal(fresh.rho_hat, gradvac.rho_hat)
    assert state["extra"] == {"consecutive_nonfinite": 2} and torch.equal(state["balancer"]["w"], torch.ones(3))


def test_a_crashed_save_leaves_the_previous_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    mgr.save(FakeEngine(), 5, {"rng": rng_state()}, {})
    with pytest.raises(RuntimeError, match="disk full"):
        mgr.save(FakeEngine(fail_on="step_00000010"), 10, {"rng": rng_state()}, {})
    assert mgr.latest_tag() == "step_00000005"
    mgr.save(FakeEngine(), 10, {"rng": rng_state()}, {})  # the leftover .partial is replaced
    assert mgr.latest_tag() == "step_00000010"
    assert not list(tmp_path.glob("*.partial"))


def test_world_size_change_is_refused(tmp_path):
    CheckpointManager(tmp_path, 2, 0, 1).save(FakeEngine(), 1, {"rng": rng_state()}, {})
    with pytest.raises(RuntimeError, match="resume with 1 ranks"):
        CheckpointManager(tmp_path, 2, 0, 2).load(FakeEngine(), "step_00000001")


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
