"""Checkpoints: DeepSpeed's engine state + megamt's own state, made visible atomically.

Layout under ``<run_dir>/checkpoints/``::

    latest                      # the tag of the newest *complete* checkpoint (plain text)
    step_00000100/              # DeepSpeed's files (model states, ZeRO partitions) +
        megamt_state_rank0.pt   #   per rank: step, data pipeline state, RNG states, balancer,
                                #   gradient-method state (PCGrad step, GradVac targets)
        megamt_config.yaml      #   the resolved megamt config
        ds_config.json          #   the resolved DeepSpeed config
        derived.json            #   derived numbers (tokens per step ...)
    zero_to_fp32.py             # DeepSpeed's recovery script (it reads `latest`)

A checkpoint is written under ``step_N.partial``; after every rank has finished, rank 0
renames it to ``step_N`` and then replaces ``latest`` (write to a temp file, ``os.replace``).
DeepSpeed's own ``latest`` is turned off (``save_latest=False``): we write the same file
in the same format, but only once the checkpoint is complete, so ``zero_to_fp32.py`` and
``engine.load_checkpoint`` still find it. A crash mid-save leaves the previous checkpoint as
``latest``; the next save removes the leftover ``.partial`` folder. The last
``keep_last`` complete checkpoints are kept.

State keys are constant (``STATE_KEYS``) and every value is a plain type or a tensor, so
``torch.load(..., weights_only=True)`` reads it back.

Elastic resume (another number of ranks than the checkpoint's): rank 0 converts the
checkpoint once into a DeepSpeed universal checkpoint under ``step_N/universal/``
(``python -m deepspeed.checkpoint.ds_to_universal``, written to ``universal.partial`` and
renamed), every rank loads it with DeepSpeed's ``load_universal`` switched on for that call
(``engine._config.load_universal_checkpoint``, read only by ``load_checkpoint``; checked in
deepspeed 0.19.8), and gets rank 0's megamt state (step, balancer, surgery: identical on
every rank) without the per-rank pipeline and RNG states (``elastic_from`` = the old world
size): the trainer restarts the data streams reshuffled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

LATEST = "latest"
PARTIAL = ".partial"
UNIVERSAL = "universal"
TAG_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "megamt_state_rank{rank}.pt"
STATE_KEYS = ("step", "world_size", "pipeline", "rng", "balancer", "surgery", "extra")


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


# --------------------------------------------------------------------------- finding


def read_latest(ckpt_dir: Path) -> str | None:
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def find_checkpoint(path: str | Path) -> tuple[Path | None, str | None]:
    """(checkpoint root, tag) for a run dir, a ``checkpoints/`` dir or one tag's folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        tag = read_latest(root)
        if tag is not None:
            return root, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None, None


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save / load / prune megamt checkpoints of one run (every rank holds one)."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int,
                 barrier: Callable[[], None]):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier

    def latest_tag(self) -> str | None:
        return read_latest(self.dir)

    def save(self, engine, step: int, rank_state: dict[str, Any], rank0_files: dict[str, str]) -> Path:
        """Write a complete checkpoint of ``step`` and make it ``latest``. Collective."""
        tag = tag_for(step)
        partial = tag + PARTIAL
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / partial, ignore_errors=True)  # leftover of a crashed save
        self.barrier()
        engine.save_checkpoint(str(self.dir), tag=partial, client_state={"megamt_step": step}, save_latest=False)
        state = {k: rank_state.get(k) for k in STATE_KEYS}
        state["step"], state["world_size"] = step, self.world_size
        _atomic_torch_save(state, self.dir / partial / STATE_FILE.format(rank=self.rank))
        if self.rank == 0:
            for name, text in rank0_files.items():
                (self.dir / partial / name).write_text(text)
        self.barrier()  # every rank's files are on disk
        if self.rank == 0:
            final = self.dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.dir / partial, final)
            _atomic_write_text(self.dir / LATEST, tag)
            self.prune()
        self.barrier()
        return self.dir / tag

    def prune(self) -> list[str]:
        """Remove complete checkpoints beyond the newest ``keep_last`` (never ``latest``)."""
        latest = self.latest_tag()
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        removed = [t for t in tags[:-self.keep_last] if t != latest]
        for t in removed:
            shutil.rmtree(self.dir / t, ignore_errors=True)
        return removed

    def load(self, engine, tag: str, elastic: bool = False) -> dict[str, Any]:
        """Restore the engine (weights, optimizer, scheduler) and return this rank's megamt
        state; with ``elastic``, also from a checkpoint of another world size (see the module
        docstring: the returned state then has ``elastic_from`` and no pipeline / RNG state)."""
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
            raise RuntimeError(f"{path}: written by {written} ranks, resumed with {self.world_size}; resume with "
                               f"{written} ranks, or set train.elastic_resume=true (weights and optimizer through a "
                               f"DeepSpeed universal checkpoint, data streams reshuffled)")
        universal = path / UNIVERSAL
        if self.rank == 0 and not (universal / "zero").is_dir():
            convert_to_universal(path, universal)
        self.barrier()
        config = engine._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            config.load_universal_checkpoint = before
        if load_path is None:
            raise RuntimeError(f"{universal}: DeepSpeed could not load this universal checkpoint")
        state = state0
        state["pipeline"], state["rng"], state["elastic_from"] = None, None, written
        return state


def convert_to_universal(path: Path, out: Path) -> Path:
    """DeepSpeed's ``ds_to_universal`` on checkpoint folder ``path`` into ``out`` (atomic)."""
    import subprocess
    import sys

    tmp = out.with_name(out.name + PARTIAL)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"elastic resume: converting {path} into a DeepSpeed universal checkpoint ({out})", flush=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
                           # ZeRO-1/2 checkpoints of a plain (no tensor-parallel) model carry no
                           # universal_checkpoint_info: the default one (version only) is right for them
                           "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "zero").is_dir():
        raise RuntimeError(f"{path}: conversion to a DeepSpeed universal checkpoint failed (exit {proc.returncode}):\n"
                           + (proc.stdout[-2000:] + proc.stderr[-2000:]).strip())
    os.replace(tmp, out)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
