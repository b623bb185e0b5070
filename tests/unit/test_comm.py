"""megamt.comm: the one module every collective goes through.

Proof by design for NCCL's rule on the CPU (a stand-in): with MEGAMT_STRICT_COLLECTIVES set,
a CPU tensor that was not placed with comm.on_device()/zeros()/tensor() is refused, as NCCL
refuses a CPU tensor when the model is on a GPU. Two real gloo processes.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamt import comm


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ[comm.STRICT_ENV] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        got = {}
        got["sum"] = comm.reduce_values([rank + 1, 10 * rank], "sum")
        got["max"] = comm.reduce_values([rank + 1.5], "max")[0]
        got["min"] = comm.all_reduce(comm.tensor([rank + 3.0]), "min").tolist()
        got["obj"] = comm.broadcast_object({"rank": rank}, src=1)
        got["gather"] = comm.all_gather_objects(rank * 7)
        t = comm.on_device(torch.full((3,), float(rank)))
        got["inplace"] = comm.all_reduce(t).tolist()
        try:
            comm.all_reduce(torch.ones(2))  # an unplaced CPU tensor: NCCL would refuse it
            got["refused"] = False
        except comm.CollectiveDeviceError as e:
            got["refused"] = "on_device" in str(e)
        comm.barrier()
        out[rank] = got
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_gloo_ranks_and_the_strict_device_rule():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        got = out[rank]
        assert got["sum"] == [3.0, 10.0]
        assert got["max"] == 2.5
        assert got["min"] == [3.0]
        assert got["obj"] == {"rank": 1}
        assert got["gather"] == [0, 7]
        assert got["inplace"] == [1.0, 1.0, 1.0]
        assert got["refused"] is True


def _single(rank: int, out: dict) -> None:
    # a fresh process: other tests in this pytest process may have left a process group up
    got = {"initialized": comm.initialized(), "world": (comm.world_size(), comm.rank())}
    t = torch.ones(2)
    got["same"] = comm.all_reduce(t) is t  # no check, no collective
    got["values"] = comm.reduce_values([1, 2])
    got["objects"] = (comm.broadcast_object("x"), comm.all_gather_objects(3))
    got["device"] = comm.device().type
    out[rank] = got


def test_world_of_one_is_the_identity():
    out = mp.Manager().dict()
    mp.spawn(_single, args=(out,), nprocs=1, join=True)
    got = out[0]
    assert got["initialized"] is False
    assert got["world"] == (1, 0)
    assert got["same"] is True
    assert got["values"] == [1.0, 2.0]
    assert got["objects"] == ("x", [3])
    assert got["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_check_names_the_fix(monkeypatch):
    monkeypatch.setenv(comm.STRICT_ENV, "1")
    with pytest.raises(comm.CollectiveDeviceError, match="on_device"):
        comm.check_device(torch.zeros(1), "unit")
    comm.check_device(comm.zeros(1), "unit")
    monkeypatch.setenv(comm.STRICT_ENV, "0")
    comm.check_device(torch.zeros(1), "unit")


_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from megamt import comm

atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))  # runs last
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
comm.leave_at_exit()
comm.leave_at_exit()  # registered once
if "{how}" == "raise":
    raise RuntimeError("a rank failing")
"""


@pytest.mark.parametrize("how", ["return", "raise"])
def test_leave_at_exit_leaves_the_group_however_the_process_ends(how):
    """gloo threads still alive at interpreter exit can abort a finished rank (SIGABRT, seen in
    CI on a benchmark worker): every program that joins a group registers comm.leave_at_exit(),
    which destroys the group before exit -- on a normal end and on an uncaught exception."""
    import subprocess
    import sys

    code = _EXIT_SCRIPT.replace("{port}", str(_port())).replace("{how}", how)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "initialized at exit: False" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("initialized at exit") == 1
    assert proc.returncode == (0 if how == "return" else 1), proc.stderr[-2000:]


_HARD_EXIT = """
import atexit, sys
import torch.distributed as dist
from megamt import comm

atexit.register(lambda: print("exit handler ran; initialized:", dist.is_initialized(), flush=True))
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
comm.leave_at_exit()
log = open(sys.argv[1], "w")
log.write("written, never closed by the script")
print("buffered stdout line", end="")
comm.exit_process(3)
print("not reached")
"""


def test_exit_process_runs_the_exit_handlers_then_exits_hard(tmp_path):
    """A launched rank ends through comm.exit_process: its exit handlers run (the group left),
    unclosed files and stdout are flushed, the exit code is kept, nothing after it runs."""
    import subprocess
    import sys

    log = tmp_path / "log.txt"
    code = _HARD_EXIT.replace("{port}", str(_port()))
    proc = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "exit handler ran; initialized: False" in proc.stdout and "buffered stdout line" in proc.stdout
    assert "not reached" not in proc.stdout
    assert log.read_text() == "written, never closed by the script"
    plain = subprocess.run([sys.executable, "-c", "from megamt import comm; comm.exit_process(4)"], timeout=120)
    assert plain.returncode == 4  # no group joined: an ordinary sys.exit
