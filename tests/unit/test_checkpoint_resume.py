"""Resume and checkpoint decisions at scale, with stand-ins for DeepSpeed and for the ranks.

Several ranks are simulated by threads sharing a stand-in of the checkpoint process group
(``ThreadComm``: a barrier, and a broadcast that hands rank 0's object to every rank); each
simulated rank may see its own folder (a stale NFS view of ``latest``). DeepSpeed's engine is
``FakeEngine`` (it writes one file per rank through a checkpoint engine, as DeepSpeed's
``checkpoint_engine.save`` does). The universal conversion itself (DeepSpeed's
``ds_to_universal``) runs in tests/integration/test_train_elastic.py; here it is replaced
by a stand-in that writes the folder and its marker, to test the waiting and the refusals.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import types
from pathlib import Path

import pytest
import torch

import megamt.checkpoint as ck
from megamt.checkpoint import (MARKER, PROGRESS, UNIVERSAL, CheckpointError, CheckpointManager, rng_state,
                               universal_status, wait_for_universal)


class FakeCheckpointEngine:
    def __init__(self):
        self.saved = []

    def save(self, state_dict, path):
        torch.save(state_dict, path)
        self.saved.append(path)


class FakeEngine:
    """engine.save_checkpoint / load_checkpoint writing and reading one file per rank."""

    def __init__(self, rank=0):
        self.rank, self.loaded = rank, []
        self.checkpoint_engine = FakeCheckpointEngine()
        self._config = types.SimpleNamespace(load_universal_checkpoint=False)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"step": client_state["megamt_step"]}, f"{save_dir}/{tag}/rank{self.rank}_model_states.pt")

    def load_checkpoint(self, load_dir, tag, **kw):
        self.loaded.append((load_dir, tag, self._config.load_universal_checkpoint))
        return f"{load_dir}/{tag}", {}


class ThreadComm:
    """Stand-in for the checkpoint process group: the ranks are threads."""

    def __init__(self, world):
        self.world, self.barrier_ = world, threading.Barrier(world, timeout=20)
        self.slot, self.broadcasts, self.windows = None, 0, []

    def for_rank(self, rank):
        outer = self

        class RankComm:
            def barrier(self):
                outer.barrier_.wait()

            def broadcast_object(self, obj):
                if rank == 0:
                    outer.slot = obj
                    outer.broadcasts += 1
                outer.barrier_.wait()
                value = outer.slot
                outer.barrier_.wait()
                return value

            @contextlib.contextmanager
            def io_window(self):
                outer.windows.append((rank, "enter"))
                yield
                outer.windows.append((rank, "exit"))

        return RankComm()


def run_ranks(world, fn):
    """``fn(rank)`` in ``world`` threads; returns the results in rank order (re-raises)."""
    out, errors = [None] * world, []

    def body(r):
        try:
            out[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def save_steps(ckpt_dir, steps, world=1, keep_last=10):
    comm = ThreadComm(world)

    def rank_fn(r):
        mgr = CheckpointManager(ckpt_dir, keep_last, r, world, comm.for_rank(r), log=None)
        for step in steps:
            mgr.save(FakeEngine(r), step, {"pipeline": {"rank": r, "step": step}, "rng": rng_state()}, {})

    run_ranks(world, rank_fn)


# --------------------------------------------------------------------------- rank 0 decides


def test_a_rank_with_a_stale_view_of_latest_follows_rank_0(tmp_path):
    """Rank 1 sees an older `latest` (an NFS client's cached copy): the resume point and the
    final `latest` check come from rank 0 on every rank."""
    view0, view1 = tmp_path / "rank0_view", tmp_path / "rank1_view"
    save_steps(view0, [4, 8])
    save_steps(view1, [4])
    assert ck.read_latest(view1) == "step_00000004"
    comm = ThreadComm(2)

    def rank_fn(r):
        mgr = CheckpointManager(view0 if r == 0 else view1, 2, r, 2, comm.for_rank(r), log=None)
        return mgr.resume_point(), mgr.latest_tag()

    assert run_ranks(2, rank_fn) == [(("step_00000008", ""), "step_00000008")] * 2
    assert comm.broadcasts == 2


def test_save_fsyncs_every_file_before_latest_moves(tmp_path, monkeypatch):
    """Each rank fsyncs the files DeepSpeed's checkpoint engine wrote for it and its megamt
    state; rank 0 fsyncs the folder, renames it, fsyncs the parent, then moves `latest`; the
    save runs inside the long-timeout window; only rank 0 renames and prunes."""
    events, lock = [], threading.Lock()

    def record(kind):
        def fn(path, *a):
            with lock:
                events.append((kind, Path(path).name))
        return fn

    monkeypatch.setattr(ck, "fsync_file", record("fsync"))
    monkeypatch.setattr(ck, "fsync_dir", record("fsync_dir"))
    real_write = ck._atomic_write_text
    monkeypatch.setattr(ck, "_atomic_write_text", lambda p, t: (real_write(p, t), record("latest")(p)))
    real_torch_save = ck._atomic_torch_save
    monkeypatch.setattr(ck, "_atomic_torch_save", lambda o, p: (real_torch_save(o, p), record("state")(p)))
    comm = ThreadComm(2)
    d = tmp_path / "ckpt"

    def rank_fn(r):
        mgr = CheckpointManager(d, 1, r, 2, comm.for_rank(r), log=None)
        for step in (3, 6):
            mgr.save(FakeEngine(r), step, {"rng": rng_state()}, {"note.txt": "x"} if r == 0 else {})

    run_ranks(2, rank_fn)
    latest_at = [i for i, e in enumerate(events) if e[0] == "latest"]
    assert len(latest_at) == 2
    second = events[latest_at[0] + 1:latest_at[1] + 1]  # the save of step 6
    i_folder = second.index(("fsync_dir", "step_00000006.partial"))  # rank 0, after the barrier: then the rename
    for r in (0, 1):
        assert second.index(("fsync", f"rank{r}_model_states.pt")) < i_folder
        assert second.index(("state", f"megamt_state_rank{r}.pt")) < i_folder
    assert second[i_folder + 1:] == [("fsync_dir", "ckpt"), ("fsync_dir", "ckpt"), ("latest", "latest")]
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000006"]  # pruned by rank 0
    assert comm.windows.count((0, "enter")) == comm.windows.count((1, "exit")) == 2


def test_long_timeout_window_raises_and_restores_the_default_groups_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(ck.comm, "set_timeout", lambda s, group=None: calls.append(s) or True)
    monkeypatch.setattr(ck.comm, "new_group", lambda timeout_s, backend_name=None: ("group", timeout_s, backend_name))
    c = ck.CheckpointComm(3600, normal_timeout_s=600)
    assert c.group[:2] == ("group", 3600)
    with c.io_window():
        assert calls == [3600]
    assert calls == [3600, 600]


# --------------------------------------------------------------------------- latest missing (issue 10)


class StubPipeline:
    def __init__(self):
        self.loaded, self.prefetching = None, False

    def load_state_dict(self, state):
        self.loaded = state

    def start_prefetch(self):
        self.prefetching = True


def stub_trainer(ckpt_dir, resume=None):
    """A MultitaskTrainer without DeepSpeed: the attributes maybe_resume reads."""
    from megamt.trainer import MultitaskTrainer

    t = MultitaskTrainer.__new__(MultitaskTrainer)
    t.rank, t.world_size, t.resume, t.step, t.surgery, t.consecutive_nonfinite = 0, 1, resume, 0, None, 0
    t.engine, t.pipeline = FakeEngine(), StubPipeline()
    t.tcfg = types.SimpleNamespace(elastic_resume=True)
    t.balancer = types.SimpleNamespace(load_state_dict=lambda s: None)
    t.checkpoints = CheckpointManager(ckpt_dir, 1, 0, 1, log=None)
    return t


def test_a_lost_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys):
    """`latest` deleted (or a crash between the rename and `latest`): the run resumes from the
    newest complete step_N and says so, instead of starting at step 0 and pruning the old
    checkpoints away. An incomplete folder and a .partial one are not taken."""
    d = tmp_path / "checkpoints"
    save_steps(d, [4, 8])
    (d / "step_00000012.partial").mkdir()
    (d / "step_00000010").mkdir()  # no megamt state: not complete
    (d / "latest").unlink()
    t = stub_trainer(d)
    t.maybe_resume()
    out = capsys.readouterr().out
    assert t.step == 8 and t.pipeline.loaded == {"rank": 0, "step": 8} and t.pipeline.prefetching
    assert "latest was missing" in out and "resuming from the newest" in out and "--no-resume" in out
    assert f"resumed from {d / 'step_00000008'} at step 8" in out
    assert ck.read_latest(d) == "step_00000008"  # written again, for zero_to_fp32.py and export
    assert ck.find_checkpoint(tmp_path) == (d, "step_00000008")
    # a later save (keep_last=1) keeps the newest; nothing was lost before it
    t.checkpoints.save(FakeEngine(), 9, {"rng": rng_state()}, {})
    assert ck.complete_tags(d) == ["step_00000009"]


def test_without_any_complete_checkpoint_the_run_starts_fresh_and_resume_true_refuses(tmp_path):
    d = tmp_path / "checkpoints"
    (d / "step_00000004.partial").mkdir(parents=True)
    t = stub_trainer(d)
    t.maybe_resume()
    assert t.step == 0 and t.pipeline.loaded is None
    with pytest.raises(FileNotFoundError, match="no complete step_N"):
        stub_trainer(d, resume=True).maybe_resume()


def test_no_resume_is_the_explicit_way_to_start_over(tmp_path, capsys):
    d = tmp_path / "checkpoints"
    save_steps(d, [4])
    (d / "latest").unlink()
    t = stub_trainer(d, resume=False)
    t.maybe_resume()
    assert t.step == 0 and "starting fresh (--no-resume)" in capsys.readouterr().out


def test_resumed_logs_hold_each_step_once(tmp_path):
    """A run that logged steps 1-6 but checkpointed at 4 resumes at 4: train_log.jsonl keeps
    steps 1-4 (the rest moved to train_log.discarded.jsonl) and TensorBoard shows steps 5-6
    once, from the resumed run (purge on restart). A fresh start over an old log starts over."""
    from megamt.metrics_log import MetricsLogger, read_scalars

    def run(start, steps, offset):
        m = MetricsLogger(tmp_path, 0, 10, progress_bar=False, log_every=100, start_step=start)
        for s in steps:
            m.log_step(s, {"train/loss": offset + s})
        m.close()

    run(0, range(1, 7), 0.0)
    with open(tmp_path / "train_log.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a torn last line of a killed run
    time.sleep(1.1)  # event files are named by the second
    run(4, range(5, 9), 100.0)
    lines = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["train/loss"] for r in lines][4:] == [105.0, 106.0, 107.0, 108.0]
    assert (tmp_path / "train_log.discarded.jsonl").read_text().count("\n") == 3
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(s, s + (100.0 if s > 4 else 0.0))
                                                                     for s in range(1, 9)]
    time.sleep(1.1)
    run(0, range(1, 3), 200.0)
    assert [json.loads(l)["step"] for l in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 201.0), (2, 202.0)]


# --------------------------------------------------------------------------- elastic resume


def fake_conversion(path, workers=1, merge_workers=None, log=None, echo=False, delay=0.3):
    """Stand-in for ds_to_universal: claims, works a while, writes the folder and the marker."""
    ck.claim_conversion(path, workers, merge_workers)
    time.sleep(delay)
    tmp = path / (UNIVERSAL + ".partial")
    (tmp / "zero").mkdir(parents=True)
    (tmp / MARKER).write_text("{}")
    tmp.rename(path / UNIVERSAL)
    (path / PROGRESS).unlink()
    return path / UNIVERSAL


def test_elastic_resume_rank_0_converts_and_the_others_wait_on_the_marker(tmp_path, monkeypatch):
    """A 2-rank checkpoint resumed by 3 ranks: rank 0 converts (small: at start-up), ranks 1-2
    wait by polling the marker file -- one broadcast in all, no collective while they wait --
    and every rank loads the universal checkpoint."""
    d = tmp_path / "checkpoints"
    save_steps(d, [5], world=2)
    monkeypatch.setattr(ck, "convert_to_universal", fake_conversion)
    comm, engines, logs = ThreadComm(3), [FakeEngine(r) for r in range(3)], []

    def rank_fn(r):
        mgr = CheckpointManager(d, 2, r, 3, comm.for_rank(r), poll_s=0.02, log=logs.append)
        return mgr.load(engines[r], "step_00000005", elastic=True)

    states = run_ranks(3, rank_fn)
    assert comm.broadcasts == 1
    assert all(s["elastic_from"] == 2 and s["step"] == 5 and s["pipeline"] is None for s in states)
    assert all(e.loaded == [(str(d / "step_00000005"), UNIVERSAL, True)] for e in engines)
    assert engines[0]._config.load_universal_checkpoint is False  # switched on for that call only
    assert any("converting it into a DeepSpeed universal checkpoint on rank 0" in l for l in logs)


def test_elastic_resume_refuses_a_large_or_half_converted_checkpoint_with_the_command(tmp_path):
    d = tmp_path / "checkpoints"
    save_steps(d, [5], world=2)
    path = d / "step_00000005"
    big = CheckpointManager(d, 2, 0, 1, convert_max_gb=1e-9, log=None)  # everything is "large"
    with pytest.raises(CheckpointError) as e:
        big.load(FakeEngine(), "step_00000005", elastic=True)
    assert f"megamt convert-checkpoint {path} --workers" in str(e.value) and "elastic_convert_max_gb" in str(e.value)
    (path / UNIVERSAL / "zero").mkdir(parents=True)  # ds_to_universal stopped halfway: no marker
    assert universal_status(path)[0] == "half"
    never = CheckpointManager(d, 2, 0, 1, convert_max_gb=0, log=None)
    with pytest.raises(CheckpointError, match="half-converted") as e:
        never.load(FakeEngine(), "step_00000005", elastic=True)
    assert f"megamt convert-checkpoint {path}" in str(e.value)
    # small worlds convert by themselves: the half-converted folder is replaced
    assert CheckpointManager(d, 2, 0, 1, log=None).universal_plan(path, 2)[0] == "convert"


def test_waiting_on_a_conversion_in_progress_and_on_one_that_died(tmp_path):
    path = tmp_path / "step_00000005"
    path.mkdir()
    lines = []
    t = threading.Thread(target=fake_conversion, args=(path,), kwargs={"delay": 0.5})
    t.start()
    time.sleep(0.1)
    assert universal_status(path)[0] == "converting"
    assert CheckpointManager(tmp_path, 2, 0, 1, log=None).universal_plan(path, 2)[0] == "wait"
    wait_for_universal(path, timeout_s=30, poll_s=0.02, log=lines.append, announce_every_s=0.1)
    t.join()
    assert universal_status(path)[0] == "complete" and any("waiting for" in l for l in lines)
    # a converter that died: its progress file stops being updated
    other = tmp_path / "step_00000009"
    other.mkdir()
    (other / PROGRESS).write_text(json.dumps({"host": "h", "pid": 1, "phase": "2. Merging", "started": 0,
                                              "updated": time.time() - 3600}))
    status, detail = universal_status(other)
    assert status == "interrupted" and "no progress for" in detail
    assert CheckpointManager(tmp_path, 2, 0, 1, convert_max_gb=0, log=None).universal_plan(other, 2)[0] == "refuse"
    (other / PROGRESS).write_text(json.dumps({"failed": "disk full", "updated": time.time()}))
    with pytest.raises(CheckpointError, match="disk full"):
        wait_for_universal(other, timeout_s=30, poll_s=0.02, log=None)
    with pytest.raises(CheckpointError, match="no completed universal checkpoint after"):
        (other / PROGRESS).write_text(json.dumps({"host": "h", "pid": 1, "started": time.time(),
                                                  "updated": time.time() + 3600}))
        wait_for_universal(other, timeout_s=0.1, poll_s=0.02, log=None)


def test_convert_checkpoint_cli_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    assert ck.main([str(tmp_path)]) == 1
    assert "no complete megamt checkpoint" in capsys.readouterr().err
    d = tmp_path / "run" / "checkpoints"
    save_steps(d, [2])
    (d / "step_00000002" / UNIVERSAL).mkdir()
    (d / "step_00000002" / UNIVERSAL / MARKER).write_text("{}")
    assert ck.main([str(tmp_path / "run")]) == 0
    assert "already converted" in capsys.readouterr().out
