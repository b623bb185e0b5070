"""Every collective megamt runs goes through this module.

NCCL reduces only tensors on the rank's own CUDA device and refuses CPU tensors; gloo (CPU
ranks, what the tests run on) takes tensors on any device and hides the mistake. So the rule
is one place: a tensor handed to a collective is on :func:`device` -- put it there with
:func:`on_device`, or create it with :func:`zeros` / :func:`tensor`.

Proof on the CPU by design (a stand-in for NCCL's rule): with ``MEGAMT_STRICT_COLLECTIVES=1``
(the test suite sets it) every tensor collective checks that its tensor went through
:func:`on_device` / :func:`zeros` / :func:`tensor` (which mark it) or is on a CUDA device, and
raises :class:`CollectiveDeviceError` otherwise -- the same call sites NCCL would reject
with the model on a GPU. Object collectives (``broadcast_object``, ``all_gather_objects``)
pickle on the CPU and are allowed on every backend; use them for small Python values only.

Without an initialised process group (a plain ``python`` process) every function is the
identity for a world of one.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

STRICT_ENV = "MEGAMT_STRICT_COLLECTIVES"
_MARK = "_megamt_on_comm_device"
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class CollectiveDeviceError(RuntimeError):
    """A tensor collective got a tensor that NCCL would refuse (not on the backend's device)."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group=group) if initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group=group) if initialized() else 1


def backend(group=None) -> str | None:
    return dist.get_backend(group) if initialized() else None


def device(group=None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU."""
    if backend(group) == "nccl" or (not initialized() and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _mark(t: torch.Tensor) -> torch.Tensor:
    setattr(t, _MARK, True)
    return t


def on_device(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` on the collective device (no copy when it is there already), marked as placed."""
    return _mark(t.to(device(group)))


def zeros(n: int | Sequence[int], dtype=torch.float32, group=None) -> torch.Tensor:
    return _mark(torch.zeros(n, dtype=dtype, device=device(group)))


def tensor(data, dtype=torch.float32, group=None) -> torch.Tensor:
    return _mark(torch.as_tensor(data, dtype=dtype).to(device(group)).clone())


def check_device(t: torch.Tensor, what: str = "collective", group=None) -> None:
    """Raise :class:`CollectiveDeviceError` when NCCL would refuse ``t`` (see the module doc)."""
    want = device(group)
    if t.device.type != want.type:
        raise CollectiveDeviceError(
            f"{what}: tensor on {t.device}, but the {backend(group)} backend needs {want}; "
            "use megamt.comm.on_device()")
    if strict() and t.device.type == "cpu" and not getattr(t, _MARK, False):
        raise CollectiveDeviceError(
            f"{what}: a CPU tensor that was not placed with megamt.comm.on_device()/zeros()/tensor(); "
            f"under NCCL with the model on a GPU this call would be refused ({STRICT_ENV} is set)")


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce (``op``: sum, max, min); returns ``t``."""
    if world_size(group) > 1:
        check_device(t, f"all_reduce({op})", group)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return t


def reduce_values(values: Sequence[float], op: str = "sum", group=None) -> list[float]:
    """All-reduce a few Python numbers (one collective); returns them as floats."""
    if world_size(group) == 1:
        return [float(v) for v in values]
    t = tensor(list(values), dtype=torch.float64, group=group)
    return [float(v) for v in all_reduce(t, op, group).cpu()]


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    if world_size(group) > 1:
        check_device(t, "broadcast", group)
        dist.broadcast(t, src=src, group=group)
    return t


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``src``'s ``obj`` on every rank (pickled: small Python values only)."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj: Any, group=None) -> list:
    """Every rank's ``obj``, in rank order (pickled: small Python values only)."""
    if world_size(group) == 1:
        return [obj]
    parts: list = [None] * world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def barrier(group=None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=group)


def leave(barrier_first: bool = True) -> None:
    """Leave the process group before the process exits (a no-op without one). gloo/NCCL
    threads still alive at interpreter exit can abort a rank that has finished its work
    ("terminate called without an active exception", SIGABRT, exit -6), which the launcher
    reports as a failed run. With ``barrier_first`` every rank leaves together (after rank 0
    has written its files); without, for a rank leaving on an error its peers share."""
    if not initialized():
        return
    if barrier_first:
        barrier()
    dist.destroy_process_group()


def _leave_quietly() -> None:
    try:
        leave(barrier_first=False)
    except Exception:  # exiting anyway: a peer already gone must not turn exit into a traceback
        pass


_LEAVE_REGISTERED = False


def leave_at_exit() -> None:
    """Make sure this process leaves its process group before the interpreter exits, whatever
    way it exits (the end of a script, ``sys.exit``, an uncaught exception): the safety net
    behind :func:`leave` for every program that joins a group -- megamt's entry points, the
    Python API in a user's script, the benchmarks. No barrier (a rank exiting on an error must
    not wait for peers); registered once per process."""
    global _LEAVE_REGISTERED
    if not _LEAVE_REGISTERED:
        atexit.register(_leave_quietly)
        _LEAVE_REGISTERED = True


def exit_process(code: int | None) -> None:
    """End a launched rank: ``sys.exit(code)`` in a process that never joined a group; in one
    that did (:func:`leave_at_exit` registered), the Python exit handlers run (the group left,
    files flushed and closed), then ``os._exit`` -- skipping the C++ static destructors, where
    gloo/shared-memory threads still alive abort a rank that has finished all its work
    ("terminate called without an active exception", SIGABRT; seen in CI after the group was
    destroyed), which the launcher reports as a failed run."""
    import sys

    code = int(code or 0)
    if not _LEAVE_REGISTERED:
        sys.exit(code)
    import gc
    import io

    try:
        atexit._run_exitfuncs()
        gc.collect()  # unreferenced files: closed (and so flushed)
    finally:
        # files still open (a module-level log) and the standard streams: flushed, as the
        # interpreter's own shutdown would have done
        for f in [o for o in gc.get_objects() if isinstance(o, io.IOBase)] + [sys.stdout, sys.stderr]:
            try:
                if not f.closed and f.writable():
                    f.flush()
            except Exception:
                pass
        os._exit(code)


def new_group(timeout_s: float, backend_name: str | None = None):
    """A process group of all ranks with its own timeout (e.g. for long checkpoint I/O)."""
    if not initialized():
        return None
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s), backend=backend_name)


def set_timeout(timeout_s: float, group=None) -> bool:
    """Change the timeout of an existing group (default: the default group, where DeepSpeed runs
    its own collectives, e.g. the barriers inside ``engine.save_checkpoint``). Uses torch's
    ``_set_pg_timeout`` (NCCL and gloo); returns False where torch lacks it."""
    fn = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if not initialized() or fn is None:
        return False
    fn(datetime.timedelta(seconds=timeout_s), group)
    return True


__all__ = ["CollectiveDeviceError", "all_gather_objects", "all_reduce", "backend", "barrier", "broadcast",
           "broadcast_object", "check_device", "device", "initialized", "new_group", "on_device", "rank",
           "reduce_values", "set_timeout", "strict", "tensor", "world_size", "zeros"]
