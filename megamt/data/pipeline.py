"""The input pipeline the trainer and evaluators use.

- :class:`TrainPipeline`: infinite, resampled per-task streams (split by rank) → task
  mixture → best-fit packer → packed micro-batches. Runs in the trainer's main process
  (no DataLoader workers): that is what makes ``state_dict()`` complete, so a run resumed at
  step k yields exactly the batches of an uninterrupted run. Packing is far cheaper than a
  training step (see tools/bench_data.py), so workers would buy nothing.
- :func:`eval_batches`: one exact pass over a task/split; every example exactly once across
  ranks × DataLoader workers (``data.num_workers``); packed in the main process.

Task ids are indices into ``list(cfg.tasks)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Optional

from megamt.data.errors import DataError
from megamt.data.mixture import TaskMixture
from megamt.data.packing import Packer, causal_item, collate_rows, encoder_item
from megamt.data.shards import check_tokenizer, load_manifest, split_shards
from megamt.data.streams import ExampleDataset, TaskStream, identity

ENCODER_MODEL_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta",
                       "mpnet", "albert", "camembert", "modernbert"}
STATE_VERSION = 1


def resolve_objective(cfg) -> str:
    """``data.objective``; ``auto`` follows the model family (encoder backbones → encoder)."""
    if cfg.data.objective != "auto":
        return cfg.data.objective
    fam = cfg.model.family
    if fam == "auto":
        mt = (cfg.model.from_config or {}).get("model_type")
        if mt is None and cfg.model.name_or_path:
            import json

            p = Path(cfg.model.name_or_path) / "config.json"
            if p.is_file():
                mt = json.loads(p.read_text()).get("model_type")
        fam = "encoder" if mt in ENCODER_MODEL_TYPES else "causal_lm"
    return fam


def _pad_id(manifest: dict) -> int:
    return int(manifest["tokenizer"]["pad_id"])


class TrainPipeline:
    """Packed multitask training micro-batches for one rank (see module docstring)."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, log=print, check_tok: bool = True):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        data = cfg.data
        self.manifest = load_manifest(data.shards_dir)
        if check_tok and data.tokenizer:
            check_tokenizer(self.manifest, data.tokenizer, str(Path(data.shards_dir) / "manifest.json"))
        self.objective = resolve_objective(cfg)
        # what the packer needs: causal LMs never look at the encoder arrays or the metadata
        self.fields = ("prompt_ids", "target_ids") if self.objective == "causal_lm" else ("enc_ids", "enc_tags", "meta")
        self.seq_len, self.micro_batch = data.seq_len, cfg.train.micro_batch_size
        self.pad_id = _pad_id(self.manifest)
        self.task_names = list(cfg.tasks)
        self.task_index = {t: i for i, t in enumerate(self.task_names)}
        self.train_tasks = list(cfg.train_task_names)
        self.streams: dict[str, TaskStream] = {}
        sizes = {}
        for t in self.train_tasks:
            shards = split_shards(self.manifest, data.shards_dir, t, "train")
            self.streams[t] = TaskStream(shards, rank, world_size, infinite=True, seed=data.seed, name=t,
                                         window=data.shuffle_buffer, fields=self.fields)
            sizes[t] = sum(n for _, n in shards)
        self.mixture = TaskMixture(sizes, cfg.mixture, {t: cfg.tasks[t].weight for t in self.train_tasks})
        self.rng = random.Random(f"{data.seed}:mixture:{rank}")
        self.packer = self._new_packer()
        self.task_packers: dict[str, Packer] = {}
        self.step = 0
        self._make = encoder_item if self.objective == "encoder" else causal_item
        self.log, self._warned_overlong = log, False
        if rank == 0 and log:
            log(self.mixture.describe(0))

    def _new_packer(self) -> Packer:
        return Packer(self.seq_len, self.cfg.data.pack_buffer, self.cfg.data.overlong, self.cfg.data.doc_stride())

    # ------------------------------------------------------------------ batches
    def set_step(self, step: int) -> None:
        """The optimizer step about to run (curriculum phases switch on it)."""
        self.step = int(step)

    def rates(self, step: Optional[int] = None) -> dict[str, float]:
        return self.mixture.rates(self.step if step is None else step)

    def _fill(self, packer: Packer, task: Optional[str]) -> None:
        while not packer.full:
            t = task if task is not None else self.mixture.sample(self.rng, self.step)
            item = self._make(self.streams[t].next(), self.task_index[t])
            if not packer.add(item) or len(item) > self.seq_len:
                self._warn_overlong(t, item)

    def _warn_overlong(self, task: str, item) -> None:
        if not self._warned_overlong and self.rank == 0 and self.log:
            self.log(f"data: an example of task {task!r} ({item.key}) has {len(item)} tokens > data.seq_len="
                     f"{self.seq_len}; data.overlong={self.cfg.data.overlong}"
                     + (f", extractive QA split into windows (data.qa_doc_stride={self.cfg.data.doc_stride()})"
                        if self.cfg.data.doc_stride() and self.cfg.data.overlong == "truncate" else "")
                     + " (counted in TrainPipeline.stats(); this is said once)")
        self._warned_overlong = True

    def next_batch(self, task: Optional[str] = None) -> dict[str, Any]:
        """A micro-batch of ``train.micro_batch_size`` packed rows; with ``task``, only that task's examples."""
        if task is None:
            packer = self.packer
        else:
            if task not in self.streams:
                raise KeyError(f"{task!r} is not a training task ({self.train_tasks})")
            packer = self.task_packers.get(task)
            if packer is None:
                packer = self.task_packers[task] = self._new_packer()
        rows = []
        for _ in range(self.micro_batch):
            self._fill(packer, task)
            rows.append(packer.pop_row())
        return collate_rows(rows, self.seq_len, self.pad_id, self.objective)

    def stats(self) -> dict[str, int]:
        """Packer counters (rows, tokens, truncated, overlong) summed over packers."""
        out: dict[str, int] = dict(self.packer.stats)
        for p in self.task_packers.values():
            for k, v in p.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed for exact resume (plain lists/dicts/ints: JSON- and torch.save-able)."""
        v, internal, gauss = self.rng.getstate()
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "step": self.step,
                "rng": [v, list(internal), gauss],
                "streams": {t: s.state_dict() for t, s in self.streams.items()},
                "packer": self.packer.state_dict(),
                "task_packers": {t: p.state_dict() for t, p in self.task_packers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data pipeline state version {state.get('version')} != {STATE_VERSION}")
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            raise ValueError(f"data pipeline state is for rank {state.get('rank')}/{state.get('world_size')}, "
                             f"this is rank {self.rank}/{self.world_size}: exact resume needs the same world size")
        missing = set(self.streams) ^ set(state["streams"])
        if missing:
            raise ValueError(f"data pipeline state has other training tasks (differ: {sorted(missing)})")
        self.step = int(state["step"])
        v, internal, gauss = state["rng"]
        self.rng.setstate((int(v), tuple(int(x) for x in internal), gauss))
        for t, s in state["streams"].items():
            self.streams[t].load_state_dict(s)
        self.packer.load_state_dict(state["packer"])
        self.task_packers = {}
        for t, s in state.get("task_packers", {}).items():
            self.task_packers[t] = self._new_packer()
            self.task_packers[t].load_state_dict(s)


def eval_batches(cfg, task: str, split: str, rank: int = 0, world_size: int = 1,
                 max_batches: Optional[int] = None, num_workers: Optional[int] = None,
                 batch_size: Optional[int] = None, log=print) -> Iterator[dict[str, Any]]:
    """One exact pass of ``task``/``split`` for this rank, as packed batches.

    Every example lands in exactly one batch of exactly one rank. Ranks may get different
    numbers of batches: a trainer running ZeRO-3 collectives must agree on a count
    (all-reduce max) and feed :func:`padding_batch` to the ranks that ran out.
    The last batch is filled with all-padding rows up to ``batch_size`` rows
    (default ``train.micro_batch_size``). Examples longer than ``data.seq_len`` are truncated
    or rejected per ``data.overlong``; the counts are logged at the end of the pass.
    """
    import torch.utils.data

    data = cfg.data
    manifest = load_manifest(data.shards_dir)
    if task not in cfg.tasks:
        raise KeyError(f"unknown task {task!r} ({list(cfg.tasks)})")
    objective = resolve_objective(cfg)
    make = encoder_item if objective == "encoder" else causal_item
    tid = list(cfg.tasks).index(task)
    B = batch_size or cfg.train.micro_batch_size
    workers = data.num_workers if num_workers is None else num_workers
    shards = split_shards(manifest, data.shards_dir, task, split)
    ds = ExampleDataset(shards, rank, world_size, workers, seed=data.seed, name=task)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=identity)
    packer = Packer(data.seq_len, data.pack_buffer, data.overlong, data.doc_stride())
    rows: list = []
    emitted = 0

    def batch():
        nonlocal rows, emitted
        out = collate_rows(rows, data.seq_len, _pad_id(manifest), objective, num_rows=B)
        rows = []
        emitted += 1
        return out

    for sample in loader:
        packer.add(make(sample, tid))
        if packer.full:
            rows.append(packer.pop_row())
            if len(rows) == B:
                yield batch()
                if max_batches is not None and emitted >= max_batches:
                    return
    while len(packer):
        rows.append(packer.pop_row())
        if len(rows) == B:
            yield batch()
            if max_batches is not None and emitted >= max_batches:
                return
    if rows:
        yield batch()
    cut, dropped, split_qa = packer.stats["truncated"], packer.stats["overlong"], packer.stats["qa_split"]
    if (cut or dropped or split_qa) and log:
        log(f"eval data {task}/{split} rank {rank}: {cut} example(s) truncated, {dropped} rejected, {split_qa} "
            f"split into {packer.stats['qa_windows']} QA window(s) (longer than data.seq_len={data.seq_len}, "
            f"data.overlong={data.overlong}, data.qa_doc_stride={data.doc_stride()})")


def padding_batch(cfg, manifest: Optional[dict] = None, batch_size: Optional[int] = None) -> dict[str, Any]:
    """An all-padding batch (no loss terms): for ranks that ran out of eval batches."""
    manifest = manifest or load_manifest(cfg.data.shards_dir)
    return collate_rows([], cfg.data.seq_len, _pad_id(manifest), resolve_objective(cfg),
                        num_rows=batch_size or cfg.train.micro_batch_size)
