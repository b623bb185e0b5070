"""The input pipeline the trainer and evaluators use.

- :class:`TrainPipeline`: infinite, resampled per-task streams (split by rank; a rank reads
  only its share of a task's bytes) → task mixture → best-fit packer → packed micro-batches
  (``mixture.level=batch``: one task per micro-batch, drawn from the mixture, each task with
  its own packer). Mixing and packing run in the caller's thread (no DataLoader workers):
  that is what makes ``state_dict()`` complete, so a run resumed at step k yields exactly the
  batches of an uninterrupted run. Packing is far cheaper than a training step (see
  tools/bench_data.py); the shard reads are not, so each stream reads its next shuffle window
  in a background thread (``data.prefetch_windows``) while the current one is consumed, in an
  order that does not depend on timing.
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
from megamt.data.packing import (Packer, Seq2SeqPacker, causal_item, collate_rows, collate_seq2seq_rows, encoder_item,
                                 seq2seq_item)
from megamt.data.shards import check_tokenizer, load_manifest, split_shards
from megamt.data.streams import ExampleDataset, TaskStream, identity

ENCODER_MODEL_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta",
                       "mpnet", "albert", "camembert", "modernbert"}
STATE_VERSION = 2  # 2: streams own contiguous example runs (not every S-th example) of shared shards


def resolve_objective(cfg) -> str:
    """``data.objective``; ``auto`` follows the model family (encoder backbones → encoder,
    encoder-decoders → seq2seq)."""
    if cfg.data.objective != "auto":
        return cfg.data.objective
    fam = cfg.model.family
    if fam == "auto":
        keys = dict(cfg.model.from_config or {})
        if not keys and cfg.model.name_or_path:
            import json

            p = Path(cfg.model.name_or_path) / "config.json"
            if p.is_file():
                keys = json.loads(p.read_text())
        if _is_encoder_decoder(keys):
            return "seq2seq"
        fam = "encoder" if keys.get("model_type") in ENCODER_MODEL_TYPES else "causal_lm"
    return fam


def _is_encoder_decoder(keys: dict) -> bool:
    """What the model's config says (``is_encoder_decoder``; a config built from a model type
    gets that type's default, read from transformers without building a model)."""
    if "is_encoder_decoder" in keys:
        return bool(keys["is_encoder_decoder"])
    if keys.get("model_type"):
        from transformers import AutoConfig

        try:
            return bool(AutoConfig.for_model(keys["model_type"]).is_encoder_decoder)
        except (KeyError, ValueError):
            return False
    return False


class Packing:
    """How one objective turns shard samples into packed batches: the item maker, the
    packer and the collation (one place for the three objectives)."""

    def __init__(self, cfg, objective: str, manifest: dict):
        self.data, self.objective = cfg.data, objective
        self.pad_id = _pad_id(manifest)
        eos = int(manifest["tokenizer"]["eos_id"])
        self.make = {"encoder": encoder_item, "causal_lm": causal_item,
                     "seq2seq": lambda s, t: seq2seq_item(s, t, eos)}[objective]
        self.fields = {"causal_lm": ("prompt_ids", "target_ids"), "seq2seq": ("prompt_ids", "target_ids"),
                       "encoder": ("enc_ids", "enc_tags", "meta")}[objective]

    def new_packer(self) -> Packer:
        d = self.data
        if self.objective == "seq2seq":
            return Seq2SeqPacker(d.seq_len, d.target_len, d.pack_buffer, d.overlong)
        return Packer(d.seq_len, d.pack_buffer, d.overlong, d.doc_stride())

    def collate(self, rows: list, num_rows: Optional[int] = None) -> dict[str, Any]:
        if self.objective == "seq2seq":
            return collate_seq2seq_rows(rows, self.data.seq_len, self.data.target_len, self.pad_id, num_rows)
        return collate_rows(rows, self.data.seq_len, self.pad_id, self.objective, num_rows=num_rows)

    def overlong(self, item) -> bool:
        return len(item) > self.data.seq_len or (item.dec is not None and len(item.dec) > self.data.target_len)


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
        self.packing = Packing(cfg, self.objective, self.manifest)
        # what the packer needs: causal LMs never look at the encoder arrays or the metadata
        self.fields = self.packing.fields
        self.seq_len, self.micro_batch = data.seq_len, cfg.train.micro_batch_size
        self.pad_id = self.packing.pad_id
        self.task_names = list(cfg.tasks)
        self.task_index = {t: i for i, t in enumerate(self.task_names)}
        self.train_tasks = list(cfg.train_task_names)
        self.streams: dict[str, TaskStream] = {}
        sizes = {}
        for t in self.train_tasks:
            shards = split_shards(self.manifest, data.shards_dir, t, "train")
            self.streams[t] = TaskStream(shards, rank, world_size, infinite=True, seed=data.seed, name=t,
                                         window=data.shuffle_buffer, fields=self.fields,
                                         prefetch=data.prefetch_windows)
            sizes[t] = sum(n for _, n in shards)
        self.mixture = TaskMixture(sizes, cfg.mixture, {t: cfg.tasks[t].weight for t in self.train_tasks})
        self.rng = random.Random(f"{data.seed}:mixture:{rank}")
        self.packer = self._new_packer()
        self.task_packers: dict[str, Packer] = {}
        self.step = 0
        self._make = self.packing.make
        self.log, self._warned_overlong = log, False
        if rank == 0 and log:
            log(self.mixture.describe(0))
        unindexed = sorted({p.name for s in self.streams.values() for p in s.unindexed_shared_shards()})
        if unindexed and log and rank == 0:
            log(f"data: {len(unindexed)} shard(s) shared by several ranks have no sample index (e.g. {unindexed[0]}; "
                f"built by an older megamt): each rank reads them whole; rebuild with `megamt build-shards` to read "
                f"only each rank's part")

    def _new_packer(self) -> Packer:
        return self.packing.new_packer()

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
            if not packer.add(item) or self.packing.overlong(item):
                self._warn_overlong(t, item)

    def _warn_overlong(self, task: str, item) -> None:
        if not self._warned_overlong and self.rank == 0 and self.log:
            side = (f"a target of {len(item.dec)} tokens > data.target_len={self.cfg.data.target_len}"
                    if len(item) <= self.seq_len else f"{len(item)} tokens > data.seq_len={self.seq_len}")
            self.log(f"data: an example of task {task!r} ({item.key}) has {side}; data.overlong={self.cfg.data.overlong}"
                     + (f", extractive QA split into windows (data.qa_doc_stride={self.cfg.data.doc_stride()})"
                        if self.cfg.data.doc_stride() and self.cfg.data.overlong == "truncate" else "")
                     + " (counted in TrainPipeline.stats(); this is said once)")
        self._warned_overlong = True

    def next_batch(self, task: Optional[str] = None) -> dict[str, Any]:
        """A micro-batch of ``train.micro_batch_size`` packed rows; with ``task``, only that task's examples."""
        if task is None and self.mixture.level == "batch":
            # mixture.level=batch: the mixture draws this micro-batch's one task (MT-DNN's scheme)
            task = self.mixture.sample(self.rng, self.step)
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
        return self.packing.collate(rows)

    # ------------------------------------------------------------------ dynamic mixing
    def observe_losses(self, step: int, losses: dict[str, float]) -> None:
        """``mixture.strategy=dynamic``: the per-task mean training losses of completed step
        ``step`` (all-reduced, so identical on every rank); see TaskMixture.observe_losses."""
        self.mixture.observe_losses(step, losses)

    def observe_eval(self, step: int, losses: dict[str, float], results: Optional[dict] = None) -> None:
        """``mixture.strategy=dynamic``: the validation at ``step`` (see TaskMixture.observe_eval)."""
        self.mixture.observe_eval(step, losses, results)

    def start_prefetch(self) -> None:
        """Begin reading every training stream's current window in the background (call it
        once the position is final, e.g. after ``load_state_dict``); without it the first
        batch reads synchronously and the streams prefetch from then on."""
        for s in self.streams.values():
            s.start_prefetch()

    def close(self) -> None:
        """Stop the streams' background readers."""
        for s in self.streams.values():
            s.close()

    def window_stats(self) -> dict[str, float]:
        """Shuffle windows taken, how many the caller waited for, and the seconds it waited."""
        return {"fills": sum(s.fills for s in self.streams.values()),
                "fill_waits": sum(s.fill_waits for s in self.streams.values()),
                "fill_wait_s": sum(s.fill_wait_s for s in self.streams.values())}

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
                "task_packers": {t: p.state_dict() for t, p in self.task_packers.items()},
                "mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") == 1:  # positions still valid; windows of shared shards were composed otherwise
            if self.rank == 0 and self.log:
                self.log("WARNING data pipeline state of an older megamt (version 1): stream positions are kept, "
                         "but the examples of shards shared by several ranks are now split by contiguous runs, so "
                         "the batches after the checkpoint differ from an uninterrupted run's")
        elif state.get("version") != STATE_VERSION:
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
        self.mixture.load_state_dict(state.get("mixture") or {})


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
    packing = Packing(cfg, resolve_objective(cfg), manifest)
    make = packing.make
    tid = list(cfg.tasks).index(task)
    B = batch_size or cfg.train.micro_batch_size
    workers = data.num_workers if num_workers is None else num_workers
    shards = split_shards(manifest, data.shards_dir, task, split)
    ds = ExampleDataset(shards, rank, world_size, workers, seed=data.seed, name=task)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=identity)
    packer = packing.new_packer()
    rows: list = []
    emitted = 0

    def batch():
        nonlocal rows, emitted
        out = packing.collate(rows, num_rows=B)
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
    st = packer.stats
    cut, dropped, split_qa = st["truncated"], st["overlong"], st["qa_split"]
    if (st["truncated_target"] or st["overlong_target"]) and log:
        log(f"eval data {task}/{split} rank {rank}: {st['truncated_target']} target(s) truncated, "
            f"{st['overlong_target']} rejected (longer than data.target_len={data.target_len}, "
            f"data.overlong={data.overlong})")
    if (cut or dropped or split_qa) and log:
        windows = (f", {split_qa} split into {packer.stats['qa_windows']} QA window(s)" if split_qa else "")
        log(f"eval data {task}/{split} rank {rank}: {cut} example(s) truncated, {dropped} rejected{windows} "
            f"(longer than data.seq_len={data.seq_len}, data.overlong={data.overlong}"
            + (f", data.qa_doc_stride={data.doc_stride()})" if split_qa else ")"))


def padding_batch(cfg, manifest: Optional[dict] = None, batch_size: Optional[int] = None) -> dict[str, Any]:
    """An all-padding batch (no loss terms): for ranks that ran out of eval batches."""
    manifest = manifest or load_manifest(cfg.data.shards_dir)
    return Packing(cfg, resolve_objective(cfg), manifest).collate([], num_rows=batch_size or cfg.train.micro_batch_size)
