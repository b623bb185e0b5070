"""`megamt train`'s entry point without a launcher: what each rank prints for each kind of
failure (the launcher-level behaviour is in tests/integration/test_train_errors.py).

Startup problems (config, an unwritable or full run_dir, missing shards) are printed by
LOCAL_RANK 0 only, one line, exit 2; during training each rank speaks for itself, one line
for megamt's own errors, a traceback for others, one line for a lost peer. The trainer is
replaced by a stand-in that raises, so no process group is started here.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from megamt import train
from megamt.data.errors import DataError
from megamt.outputs import OutputDirError, ensure_writable


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megamt.config import load_config
    from megamt.data.shards import build_shards
    from megamt.data.synthetic import make_demo_assets

    d = make_demo_assets(tmp_path_factory.mktemp("demo"), n_train=12, n_val=4, seq_len=64)
    build_shards(load_config(d.spec), progress=False, log=None)
    return d


def unwritable(tmp: Path) -> Path:
    """A folder nobody may create: under /sys for root (chmod does not stop root), else chmod 555."""
    if os.geteuid() != 0:
        tmp.mkdir()
        tmp.chmod(0o555)
        return tmp / "run"
    return Path("/sys/megamt-test-run")


def run(argv, capsys, monkeypatch, local_rank=0, rank=0):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(rank))
    rc = train.main(argv)
    return rc, capsys.readouterr()


def test_startup_problems_once_per_node_without_traceback(demo, tmp_path, capsys, monkeypatch):
    cases = {"run_dir": ([f"train.run_dir={unwritable(tmp_path / 'ro')}"], "cannot write there"),
             "shards": ([f"train.run_dir={tmp_path / 'r'}", f"data.shards_dir={tmp_path / 'none'}"],
                        "no manifest.json: build the shards"),
             "tokenizer": ([f"train.run_dir={tmp_path / 'r'}", f"data.tokenizer={tmp_path / 'tok'}"],
                           "tokenizer folder not found"),
             "config": (["train.lr=-1"], "train.lr: must be > 0")}
    for case, (overrides, want) in cases.items():
        rc, out = run([str(demo.spec), *overrides], capsys, monkeypatch)
        assert rc == train.EXIT_CONFIG, case
        assert out.err.count("megamt train:") == 1 and want in out.err and "Traceback" not in out.err, (case, out.err)
        rc, out = run([str(demo.spec), *overrides], capsys, monkeypatch, local_rank=1, rank=1)
        assert rc == train.EXIT_CONFIG and out.err == "" and out.out == "", case  # said once, by local rank 0


class Boom:
    """Stands in for MultitaskTrainer: train() raises the given exception."""

    error: BaseException = RuntimeError("x")

    def __init__(self, *a, **k):
        pass

    def train(self):
        raise Boom.error


@pytest.mark.parametrize("rank", [0, 1])
def test_failures_during_training(demo, tmp_path, capsys, monkeypatch, rank):
    from megamt import trainer

    monkeypatch.setattr(trainer, "MultitaskTrainer", Boom)
    argv = [str(demo.spec), f"train.run_dir={tmp_path / 'run'}"]
    Boom.error = DataError("shard-1.tar", "corrupt_shard", "truncated tar; rebuild it")
    rc, out = run(argv, capsys, monkeypatch, rank=rank, local_rank=rank)
    assert rc == train.EXIT_FAILED
    assert out.err == f"megamt train: rank {rank}: shard-1.tar: truncated tar; rebuild it [corrupt_shard]\n"
    Boom.error = ValueError("a bug")
    rc, out = run(argv, capsys, monkeypatch, rank=rank, local_rank=rank)
    assert out.err.startswith(f"megamt train: rank {rank} failed: ValueError: a bug\nTraceback")
    Boom.error = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                              "by peer [127.0.0.1]:4242. This is typically caused by a remote worker crashing.")
    rc, out = run(argv, capsys, monkeypatch, rank=rank, local_rank=rank)
    assert out.err == (f"megamt train: rank {rank}: lost the connection to another rank, which failed first (its "
                       f"error is printed before this line): Connection closed by peer [127.0.0.1]:4242\n")
    from megamt.trainer import NonFiniteError

    Boom.error = NonFiniteError("step 7: non-finite loss in task(s) qa")  # the same on every rank
    rc, out = run(argv, capsys, monkeypatch, rank=rank, local_rank=rank)
    assert rc == train.EXIT_FAILED
    assert out.err == ("megamt train: rank 0: step 7: non-finite loss in task(s) qa\n" if rank == 0 else "")


def test_ensure_writable_names_a_full_disk(tmp_path, monkeypatch):
    ensure_writable(tmp_path / "a" / "b", "train.run_dir", "fix")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []  # probe removed

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the disk refuses the probe's blocks at the flush
    with pytest.raises(OutputDirError) as e:
        ensure_writable(tmp_path / "c", "train.run_dir", "Choose another folder.")
    assert str(e.value) == (f"train.run_dir={tmp_path / 'c'}: cannot write there: No space left on device "
                            f"(the disk is full). Choose another folder.")
    assert list((tmp_path / "c").iterdir()) == []


def test_export_checks_its_folder_before_loading(tmp_path, capsys):
    from megamt import export

    bad = unwritable(tmp_path / "ro")
    assert export.main([str(tmp_path / "run"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"megamt export: error: OUT_DIR={bad}: cannot write there") and "Traceback" not in err
