"""Checkpoints: DeepSpeed's engine state + megamt's own state, made visible atomically.

Layout under ``<run_dir>/checkpoints/``::

    latest                      # the tag of the newest *complete* checkpoint (plain text)
    step_00000100/              # DeepSpeed's files (model states, ZeRO partitions) +
        megamt_state_rank0.pt   #   per rank: step, data pipeline state, RNG states, balancer,
                                #   gradient-method state (PCGrad step, GradVac targets)
        megamt_config.yaml      #   the resolved megamt config
        ds_config.json          #   the resolved DeepSpeed config
        derived.json            #   derived numbers (tokens per step ...)
        universal/              #   a DeepSpeed universal checkpoint of it (elastic resume), once
            megamt_universal.json  # converted; this completion marker is written last
    zero_to_fp32.py             # DeepSpeed's recovery script (it reads `latest`)

Saving. A checkpoint is written under ``step_N.partial``; every rank fsyncs the files it wrote
(its megamt state and the DeepSpeed files its checkpoint engine saved); after every rank has
finished, rank 0 renames it to ``step_N``, fsyncs the folder, then replaces ``latest`` (temp
file, fsync, ``os.replace``, fsync of the folder) and prunes. DeepSpeed's own ``latest`` is
turned off (``save_latest=False``): we write the same file in the same format, but only once
the checkpoint is complete, so ``zero_to_fp32.py`` and ``engine.load_checkpoint`` still find
it. A crash mid-save leaves the previous checkpoint as ``latest``; the next save removes the
leftover ``.partial`` folder. The last ``keep_last`` complete checkpoints are kept.

Collectives. Saving 13 GB per rank (70B on 64 GPUs) or removing old checkpoints on a network
file system outlasts a default collective timeout, so the waits around checkpoint I/O run on
a process group of their own with ``train.checkpoint_timeout_s`` (:class:`CheckpointComm`),
and the default group's timeout is raised to it while DeepSpeed's ``save_checkpoint`` runs
(its own barriers wait on the slowest writer). Ranks never act on their own reads of
``latest`` (an NFS client may cache an old one): rank 0 reads, decides (the tag to resume, the
tags to prune, what elastic resume needs) and broadcasts.

Resume point. ``latest`` names it. A run directory whose ``latest`` is missing (deleted, or a
crash between the rename and ``latest``) but which holds complete ``step_N`` folders resumes
from the newest of them, says so and writes ``latest`` again: a run started without
``--no-resume`` never overwrites complete checkpoints.

Elastic resume (another number of ranks than the checkpoint's) loads a DeepSpeed universal
checkpoint ``step_N/universal/``, converted by DeepSpeed's ``ds_to_universal`` with several
worker processes (``megamt convert-checkpoint RUN_DIR --workers N``, see :func:`main`) into
``universal.partial/``; the completion marker is written and fsynced last, then the folder is
renamed. At start-up rank 0 decides from the folder's state and broadcasts:

- converted (marker present): every rank loads it;
- being converted (a progress file updated in the last ``HEARTBEAT_STALE_S``): every rank
  waits for the marker by polling the file system (not a collective), with a progress line;
- not converted, and the checkpoint holds at most ``train.elastic_convert_max_gb``: rank 0
  converts it (the others wait for the marker, as above) -- the small-world convenience;
- otherwise (larger, half-converted, or an interrupted conversion): every rank stops with
  one message naming the command to run. At scale elastic resume is a planned, offline step.

Every rank loads with DeepSpeed's ``load_universal`` switched on for that call
(``engine._config.load_universal_checkpoint``, read only by ``load_checkpoint``; checked in
deepspeed 0.19.8) and gets rank 0's megamt state (step, balancer, surgery: identical on
every rank) without the per-rank pipeline and RNG states (``elastic_from`` = the old world
size): the trainer restarts the data streams reshuffled.

State keys are constant (``STATE_KEYS``) and every value is a plain type or a tensor, so
``torch.load(..., weights_only=True)`` reads it back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from megamt import comm

LATEST = "latest"
PARTIAL = ".partial"
UNIVERSAL = "universal"
MARKER = "megamt_universal.json"
"""Written last into a universal checkpoint: its presence means the conversion completed."""
PROGRESS = "universal.progress.json"
"""Beside ``universal/`` while a conversion runs: host, pid, phase, updated every few seconds."""
HEARTBEAT_S = 5.0
HEARTBEAT_STALE_S = 120.0
"""A progress file not updated for this long belongs to a conversion that died."""
TAG_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "megamt_state_rank{rank}.pt"
STATE_KEYS = ("step", "world_size", "pipeline", "rng", "balancer", "surgery", "extra")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message says what to run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG the run uses, as plain values and tensors (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- durable files


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename / new entries in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _recording_saves(engine, paths: list[str]) -> Iterator[None]:
    """Record the files DeepSpeed's checkpoint engine writes on this rank (to fsync them)."""
    ce = getattr(engine, "checkpoint_engine", None)
    original = getattr(ce, "save", None)
    if original is None:
        yield
        return

    def save(state_dict, path, *args, **kwargs):
        out = original(state_dict, path, *args, **kwargs)
        paths.append(str(path))
        return out

    had_own = "save" in vars(ce)
    ce.save = save
    try:
        yield
    finally:
        if had_own:
            ce.save = original
        else:
            del ce.save


# --------------------------------------------------------------------------- finding


def read_latest(ckpt_dir: Path) -> str | None:
    """This process's read of ``latest`` (a tag whose folder exists), or None. Not for
    decisions every rank must share: see :meth:`CheckpointManager.latest_tag`."""
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def is_complete(folder: Path) -> bool:
    """A ``step_N`` folder holding every rank's megamt state (what a finished save leaves)."""
    state0 = folder / STATE_FILE.format(rank=0)
    if not state0.is_file():
        return False
    try:
        world = int(torch.load(state0, map_location="cpu", weights_only=True)["world_size"])
    except Exception:
        return False
    return all((folder / STATE_FILE.format(rank=r)).is_file() for r in range(world))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete ``step_N`` folders, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name) and is_complete(p))


def find_checkpoint(path: str | Path) -> tuple[Path | None, str | None]:
    """(checkpoint root, tag) for a run dir, a ``checkpoints/`` dir or one tag's folder; a root
    without ``latest`` gives its newest complete ``step_N``."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        tag = read_latest(root)
        if tag is None:
            tags = complete_tags(root)
            tag = tags[-1] if tags else None
        if tag is not None:
            return root, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None, None


def folder_bytes(path: Path) -> int:
    """Bytes of a checkpoint folder's own files (not its universal conversion)."""
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and not p.relative_to(path).parts[0].startswith(UNIVERSAL))


# --------------------------------------------------------------------------- collectives


class CheckpointComm:
    """The collectives around checkpoint I/O: a process group of its own with a long timeout
    (``train.checkpoint_timeout_s``; gloo, so waiting ranks hold no GPU stream), rank 0's
    decisions broadcast on it, and the default group's timeout raised while DeepSpeed saves.
    Without a process group every call is the identity for a world of one."""

    def __init__(self, timeout_s: float = 3600.0, normal_timeout_s: Optional[float] = None):
        import torch.distributed as dist

        self.timeout_s, self.normal_timeout_s = timeout_s, normal_timeout_s
        gloo = dist.is_available() and dist.is_gloo_available()
        self.group = comm.new_group(timeout_s, "gloo" if gloo else None)

    def barrier(self) -> None:
        comm.barrier(self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return comm.broadcast_object(obj, 0, self.group)

    @contextlib.contextmanager
    def io_window(self) -> Iterator[None]:
        """Raise the default group's timeout to ``timeout_s`` for the duration (DeepSpeed's own
        barriers inside ``save_checkpoint``), then set it back to ``normal_timeout_s``."""
        raised = self.normal_timeout_s is not None and comm.set_timeout(self.timeout_s)
        try:
            yield
        finally:
            if raised:
                comm.set_timeout(self.normal_timeout_s)


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save / load / prune megamt checkpoints of one run (every rank holds one).

    ``comm``: a :class:`CheckpointComm` (or a stand-in with ``barrier()``,
    ``broadcast_object(obj)`` and ``io_window()``). ``convert_max_gb``: the largest checkpoint
    elastic resume converts at start-up (``train.elastic_convert_max_gb``); ``wait_timeout_s``:
    how long ranks wait for a conversion's completion marker."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int,
                 comm: Any = None, *, convert_max_gb: float = 20.0, wait_timeout_s: float = 3600.0,
                 poll_s: float = 2.0, log: Callable[[str], None] = print):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.comm = comm if comm is not None else CheckpointComm()
        self.convert_max_gb = convert_max_gb
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.log = log

    def say(self, text: str) -> None:
        if self.rank == 0 and self.log:
            self.log(text)

    # ----------------------------------------------------------------- deciding
    def latest_tag(self) -> str | None:
        """The tag of ``latest`` as rank 0 reads it, on every rank. Collective."""
        return self.comm.broadcast_object(read_latest(self.dir) if self.rank == 0 else None)

    def resume_point(self) -> tuple[str, str] | None:
        """``(tag, note)`` of the checkpoint to resume, decided by rank 0 and broadcast
        (collective), or None when the run directory has no complete checkpoint. ``note`` is
        empty when ``latest`` named it, else says that ``latest`` was missing and has been
        written again (rank 0 does it) for the newest complete ``step_N``."""
        decision = None
        if self.rank == 0:
            tag = read_latest(self.dir)
            if tag is not None:
                decision = (tag, "")
            else:
                tags = complete_tags(self.dir)
                if tags:
                    why = "missing" if not (self.dir / LATEST).exists() else "pointing to no checkpoint"
                    _atomic_write_text(self.dir / LATEST, tags[-1])
                    decision = (tags[-1], f"WARNING {self.dir / LATEST} was {why}, but the run directory holds "
                                          f"{len(tags)} complete checkpoint(s): resuming from the newest, "
                                          f"{self.dir / tags[-1]}, and `latest` names it again. To start from "
                                          f"step 0 instead, run with --no-resume (the old checkpoints are then "
                                          f"replaced) or another train.run_dir.")
        return self.comm.broadcast_object(decision)

    # ----------------------------------------------------------------- saving
    def save(self, engine, step: int, rank_state: dict[str, Any], rank0_files: dict[str, str]) -> Path:
        """Write a complete checkpoint of ``step`` and make it ``latest``. Collective."""
        tag = tag_for(step)
        partial = self.dir / (tag + PARTIAL)
        with self.comm.io_window():
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)  # leftover of a crashed save
            self.comm.barrier()
            written: list[str] = []
            with _recording_saves(engine, written):
                engine.save_checkpoint(str(self.dir), tag=partial.name, client_state={"megamt_step": step},
                                       save_latest=False)
            for f in written:  # DeepSpeed's files of this rank: on disk before `latest` can move
                fsync_file(Path(f))
            state = {k: rank_state.get(k) for k in STATE_KEYS}
            state["step"], state["world_size"] = step, self.world_size
            _atomic_torch_save(state, partial / STATE_FILE.format(rank=self.rank))
            if self.rank == 0:
                for name, text in rank0_files.items():
                    _write_synced(partial / name, text)
            self.comm.barrier()  # every rank's files are on disk
            if self.rank == 0:
                final = self.dir / tag
                fsync_dir(partial)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(partial, final)
                fsync_dir(self.dir)
                _atomic_write_text(self.dir / LATEST, tag)
                self.prune(tag)
            self.comm.barrier()
        return self.dir / tag

    def prune(self, latest: str | None = None) -> list[str]:
        """Remove complete checkpoints beyond the newest ``keep_last``, never ``latest`` (rank 0
        only: the tag it just wrote; else its own read)."""
        latest = latest if latest is not None else read_latest(self.dir)
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        removed = [t for t in tags[:-self.keep_last] if t != latest]
        for t in removed:
            shutil.rmtree(self.dir / t, ignore_errors=True)
        return removed

    # ----------------------------------------------------------------- loading
    def load(self, engine, tag: str, elastic: bool = False) -> dict[str, Any]:
        """Restore the engine (weights, optimizer, scheduler) and return this rank's megamt
        state; with ``elastic``, also from a checkpoint of another world size (see the module
        docstring: the returned state then has ``elastic_from`` and no pipeline / RNG state).
        Collective."""
        path = self.dir / tag
        state0_file = path / STATE_FILE.format(rank=0)
        if not state0_file.is_file():
            raise FileNotFoundError(f"{state0_file}: missing; {path} is not a complete megamt checkpoint")
        state0 = torch.load(state0_file, map_location="cpu", weights_only=True)
        written = int(state0["world_size"])
        if written == self.world_size:
            state_file = path / STATE_FILE.format(rank=self.rank)
            if not state_file.is_file():
                raise FileNotFoundError(f"{state_file}: missing; the checkpoint {path} is incomplete")
            state = state0 if self.rank == 0 else torch.load(state_file, map_location="cpu", weights_only=True)
            load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
            return state
        if not elastic:
            raise CheckpointError(f"{path}: written by {written} ranks, resumed with {self.world_size}; resume with "
                                  f"{written} ranks, or set train.elastic_resume=true (weights and optimizer through a "
                                  f"DeepSpeed universal checkpoint, data streams reshuffled)")
        self.prepare_universal(path, written)
        config = engine._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            config.load_universal_checkpoint = before
        if load_path is None:
            raise RuntimeError(f"{path / UNIVERSAL}: DeepSpeed could not load this universal checkpoint")
        state = state0
        state["pipeline"], state["rng"], state["elastic_from"] = None, None, written
        return state

    def prepare_universal(self, path: Path, written: int) -> None:
        """Make sure ``path/universal`` is a complete universal checkpoint before any rank loads
        it (see the module docstring): rank 0 decides, every rank follows. Collective (one
        broadcast); the waiting is on the file system."""
        plan = None
        if self.rank == 0:
            plan = self.universal_plan(path, written)
            if plan[0] == "convert":  # before the others look: no stale folder, a fresh progress file
                claim_conversion(path, default_workers())
        action, message = self.comm.broadcast_object(plan)
        if action == "refuse":
            raise CheckpointError(message)
        if action == "load":
            return
        if message:
            self.say(message)
        if action == "convert" and self.rank == 0:
            convert_to_universal(path, workers=default_workers(), log=self.log)
        # "convert" (the others) and "wait" (everyone): poll for the completion marker
        wait_for_universal(path, self.wait_timeout_s, self.poll_s,
                           log=self.log if self.rank == (1 if action == "convert" else 0) else None,
                           written=written)

    def universal_plan(self, path: Path, written: int) -> tuple[str, str]:
        """Rank 0's decision for elastic resume from ``path``: ("load" | "wait" | "convert" |
        "refuse", message)."""
        status, detail = universal_status(path)
        command = f"megamt convert-checkpoint {path} --workers 16"
        if status == "complete":
            return "load", ""
        if status == "converting":
            return "wait", (f"elastic resume: {path / UNIVERSAL} is being converted ({detail}); every rank waits "
                            f"for its completion marker (up to train.checkpoint_timeout_s={self.wait_timeout_s:.0f} s)")
        size_gb = folder_bytes(path) / 1e9
        if 0 < self.convert_max_gb and size_gb <= self.convert_max_gb:
            what = {"absent": "", "half": f" (replacing a half-converted one: {detail})",
                    "interrupted": f" (after an interrupted conversion: {detail})"}[status]
            return "convert", (f"elastic resume: {path} was written by {written} rank(s), this run has "
                               f"{self.world_size}: converting it into a DeepSpeed universal checkpoint on rank 0"
                               f"{what} ({size_gb:.2f} GB <= train.elastic_convert_max_gb="
                               f"{self.convert_max_gb:g}); the other ranks wait for the completion marker")
        why = {"absent": f"it has not been converted, and at {size_gb:.1f} GB it is above "
                         f"train.elastic_convert_max_gb={self.convert_max_gb:g}, the largest checkpoint converted at "
                         f"start-up",
               "half": f"{path / UNIVERSAL} is half-converted ({detail})",
               "interrupted": f"a conversion was interrupted ({detail})"}[status]
        return "refuse", (f"{path}: written by {written} rank(s), this run has {self.world_size}. Elastic resume "
                          f"loads a DeepSpeed universal checkpoint, and {why}. Convert it first (one node, several "
                          f"processes; it starts over):\n    {command}\nthen start the job again, or resume with "
                          f"{written} rank(s).")


# --------------------------------------------------------------------------- universal checkpoints


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def universal_status(path: Path, now: Optional[float] = None) -> tuple[str, str]:
    """State of ``path/universal``: ("complete" | "converting" | "half" | "interrupted" |
    "absent", detail)."""
    now = time.time() if now is None else now
    uni, progress = path / UNIVERSAL, path / PROGRESS
    if (uni / MARKER).is_file():
        return "complete", ""
    if uni.is_dir():
        return "half", f"no completion marker {MARKER}"
    p = _read_json(progress) if progress.is_file() else None
    if p is not None and p.get("failed"):
        return "interrupted", f"the conversion failed: {p['failed']}"
    if p is not None:
        age = now - float(p.get("updated", 0))
        where = f"{p.get('host')} pid {p.get('pid')}, phase {p.get('phase') or 'starting'!r}"
        if age < HEARTBEAT_STALE_S:
            return "converting", f"{where}, {now - float(p.get('started', now)):.0f} s so far"
        return "interrupted", f"{where}, no progress for {age:.0f} s"
    if (path / (UNIVERSAL + PARTIAL)).exists():
        return "interrupted", f"{path / (UNIVERSAL + PARTIAL)} left without a progress file"
    return "absent", ""


def wait_for_universal(path: Path, timeout_s: float, poll_s: float = 5.0, log: Optional[Callable] = print,
                       written: Optional[int] = None, announce_every_s: float = 60.0) -> None:
    """Poll until ``path/universal`` has its completion marker (no collective). Raises
    :class:`CheckpointError` when the conversion failed or stopped making progress, or after
    ``timeout_s``. ``log`` (one rank's) gets a progress line every ``announce_every_s``."""
    t0 = last = time.time()
    command = f"megamt convert-checkpoint {path} --workers 16"
    while True:
        status, detail = universal_status(path)
        now = time.time()
        if status == "complete":
            if log and now - t0 > poll_s:
                log(f"elastic resume: {path / UNIVERSAL} is complete after {now - t0:.0f} s of waiting")
            return
        # "absent" right after the start: the converting rank has not written its progress file yet
        if status == "half" or (status == "interrupted" and (now - t0 > HEARTBEAT_STALE_S or "failed" in detail)) \
                or (status == "absent" and now - t0 > HEARTBEAT_STALE_S):
            raise CheckpointError(f"{path}: the universal checkpoint conversion did not complete ({detail or status}); "
                                  f"run\n    {command}\nthen start the job again"
                                  + (f", or resume with {written} rank(s)." if written else "."))
        if now - t0 > timeout_s:
            raise CheckpointError(f"{path}: no completed universal checkpoint after {timeout_s:.0f} s "
                                  f"(train.checkpoint_timeout_s; {detail or status}); convert it beforehand:\n"
                                  f"    {command}")
        if log and now - last >= announce_every_s:
            log(f"elastic resume: waiting for {path / UNIVERSAL} ({detail or status}; {now - t0:.0f} s)")
            last = now
        time.sleep(poll_s)


def claim_conversion(path: Path, workers: int, merge_workers: Optional[int] = None) -> dict[str, Any]:
    """Remove what an earlier conversion left in ``path`` and write the progress file of a new
    one (ranks waiting for the marker then see a conversion in progress)."""
    path = Path(path)
    progress = path / PROGRESS
    old = _read_json(progress) if progress.is_file() else None
    if old and old.get("host") == socket.gethostname() and old.get("pid") == os.getpid() and not old.get("failed"):
        return old  # claimed by this process already
    for stale in (path / (UNIVERSAL + PARTIAL), path / UNIVERSAL):
        shutil.rmtree(stale, ignore_errors=True)
    now = time.time()
    info = {"host": socket.gethostname(), "pid": os.getpid(), "phase": "", "started": now, "updated": now,
            "workers": workers, "merge_workers": merge_workers or max(1, workers // 4)}
    _atomic_write_text(progress, json.dumps(info))
    return info


def convert_to_universal(path: Path, workers: int = 1, merge_workers: Optional[int] = None,
                         log: Optional[Callable[[str], None]] = print, echo: bool = False) -> Path:
    """DeepSpeed's ``ds_to_universal`` on checkpoint folder ``path`` into ``path/universal``.

    ``workers`` processes extract the ZeRO fragments, ``merge_workers`` (default a quarter of
    them: merging holds whole parameters) merge them. Written into ``universal.partial/``
    while a progress file beside it is updated every ``HEARTBEAT_S`` (host, pid, phase); the
    files are fsynced, the completion marker is written last, the folder renamed. A
    half-converted ``universal/`` (no marker) is replaced."""
    import subprocess

    path = Path(path)
    out = path / UNIVERSAL
    tmp, progress = path / (UNIVERSAL + PARTIAL), path / PROGRESS
    merge_workers = merge_workers or max(1, workers // 4)
    info = claim_conversion(path, workers, merge_workers)
    t0 = info["started"]

    def beat() -> None:
        info["updated"] = time.time()
        _atomic_write_text(progress, json.dumps(info))

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            beat()

    if log:
        log(f"converting {path} into a DeepSpeed universal checkpoint ({out}) with {workers} extract / "
            f"{merge_workers} merge worker(s)")
    thread = threading.Thread(target=heartbeat, name="megamt-convert-heartbeat", daemon=True)
    thread.start()
    tail: list[str] = []
    try:
        proc = subprocess.Popen([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                 str(path), "--output_folder", str(tmp), "--num_extract_workers", str(workers),
                                 "--num_merge_workers", str(merge_workers),
                                 # ZeRO-1/2 checkpoints of a plain (no tensor-parallel) model carry no
                                 # universal_checkpoint_info: the default one (version only) is right for them
                                 "--inject_missing_state"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            if line.startswith("***"):
                info["phase"] = line.strip("* ").strip()
                if log:
                    log(f"  {info['phase']} ({time.time() - t0:.0f} s)")
            elif echo and log:
                log("  " + line)
        rc = proc.wait()
        if rc != 0 or not (tmp / "zero").is_dir():
            raise CheckpointError(f"{path}: conversion to a DeepSpeed universal checkpoint failed (exit {rc}):\n"
                                  + "\n".join(tail[-25:]))
        info["phase"] = "syncing files"
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        for d in [*sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True), tmp]:
            fsync_dir(d)
        marker = {"source": str(path), "tag": path.name, "seconds": round(time.time() - t0, 1),
                  "workers": workers, "merge_workers": merge_workers, "host": info["host"]}
        _write_synced(tmp / MARKER, json.dumps(marker, indent=1))
        fsync_dir(tmp)
        os.replace(tmp, out)
        fsync_dir(path)
        (path / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's, naming the .partial folder
    except BaseException as e:
        stop.set()
        thread.join()
        info["failed"] = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        beat()
        raise
    stop.set()
    thread.join()
    progress.unlink(missing_ok=True)
    if log:
        log(f"universal checkpoint complete: {out} ({time.time() - t0:.1f} s)")
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``megamt convert-checkpoint RUN_DIR|CHECKPOINT [--workers N]``."""
    ap = argparse.ArgumentParser(
        prog="megamt convert-checkpoint",
        description="Convert a megamt checkpoint into a DeepSpeed universal checkpoint (step_N/universal/), "
                    "the form elastic resume (another number of ranks) loads. Run it once, offline, on one node "
                    "before resuming a large run with another world size; ranks of a job started meanwhile wait "
                    "for its completion marker.")
    ap.add_argument("path", help="a run directory (its latest checkpoint), its checkpoints/ folder, or a step_N folder")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="processes extracting ZeRO fragments (default: min(8, CPUs))")
    ap.add_argument("--merge-workers", type=int, default=None,
                    help="processes merging them into whole parameters (default: workers / 4; each holds whole "
                         "parameters in memory)")
    ap.add_argument("--force", action="store_true", help="convert again even when converted or being converted")
    ap.add_argument("--verbose", action="store_true", help="print ds_to_universal's output")
    args = ap.parse_args(argv)
    target = Path(args.path)
    if target.is_dir() and (target / STATE_FILE.format(rank=0)).is_file():
        folder = target
    else:
        root, tag = find_checkpoint(target)
        if root is None:
            print(f"megamt convert-checkpoint: error: no complete megamt checkpoint under {target}", file=sys.stderr)
            return 1
        folder = root / tag
    if not is_complete(folder):
        print(f"megamt convert-checkpoint: error: {folder} is not a complete megamt checkpoint (a megamt state file "
              f"per rank)", file=sys.stderr)
        return 1
    status, detail = universal_status(folder)
    if status == "complete" and not args.force:
        print(f"{folder / UNIVERSAL}: already converted ({MARKER} present); --force converts again")
        return 0
    if status == "converting" and not args.force:
        print(f"megamt convert-checkpoint: error: {folder / UNIVERSAL} is being converted ({detail}); --force "
              f"starts over", file=sys.stderr)
        return 1
    if status in ("half", "interrupted"):
        print(f"{folder / UNIVERSAL}: {detail}; starting over")
    try:
        convert_to_universal(folder, workers=max(1, args.workers), merge_workers=args.merge_workers,
                             log=lambda s: print(s, flush=True), echo=args.verbose)
    except CheckpointError as e:
        print(f"megamt convert-checkpoint: error: {e}", file=sys.stderr)
        return 1
    print(f"resume with any number of ranks (train.elastic_resume=true): the job loads {folder / UNIVERSAL}")
    return 0


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
