"""MultitaskTrainer: the DeepSpeed training loop (ZeRO-3 by default).

All DeepSpeed code of megamt lives here (and in the checkpoint component it drives). The loop
is split into named steps, each fitting on a screen:

    train()                     resume -> start-up print -> loop -> final checkpoint
      train_step()              one optimizer step
        next_micro_batches()    the step's micro-batches, prefetched (normal: grad_accum mixed
                                ones; gradient-method mode: one task-homogeneous one per task)
        global_target_counts()  per-task target tokens of the whole step, ONE all-reduce
        forward_backward_step() forward -> TaskLoss -> scaled step loss -> engine.backward
        engine.step()           after every micro-batch, as DeepSpeed expects; it updates the
                                weights only at the accumulation boundary
      evaluate_loss()           per-task validation loss (eval/loss/<task>)
      save_checkpoint()         engine state + every rank's data/RNG state, then `latest`

Loss scaling (see megamt.losses.step_loss): every micro-batch hands
``world_size * grad_accum * sum_t w_t * loss_sum_t / N_t`` to ``engine.backward``; DeepSpeed
divides by ``grad_accum`` and averages over ranks, so the gradient after the step is exactly
d(sum_t w_t * mean_t)/d(theta) with means over the global batch.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megamt.checkpoint import CheckpointManager, json_text, rng_state, set_rng_state
from megamt.config import MultitaskConfig
from megamt.ds_config import build_ds_config, hidden_size_of, zero_stage
from megamt.losses import TaskLoss, count_targets, step_loss, task_means
from megamt.metrics_log import MetricsLogger, estimate_mfu, peak_memory_gib
from megamt.model import MultitaskModel, describe, hf_config, resolve_dtype

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Fault injection for tests: comma-separated 1-based steps whose first task's loss becomes NaN.
FAULT_NONFINITE_ENV = "MEGAMT_FAULT_NONFINITE_STEPS"


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


@dataclass
class StepResult:
    """What one optimizer step reports (already reduced over ranks)."""

    step: int
    loss: float
    task_loss: dict[str, float]
    task_tokens: dict[str, int]
    tokens: int
    """Non-pad tokens (prompt + target) of the step, all ranks."""
    grad_norm: float | None
    lr: float
    step_time_s: float
    applied: bool
    nonfinite_tasks: list[str] = field(default_factory=list)
    stop_requested: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    """The balancer's per-task loss weights used in this step."""
    surgery: Any = None
    """megamt.gradients.SurgeryStats when this step measured per-task gradients, else None."""
    rep_grad_norms: dict[str, float] | None = None
    """GradNorm without G: per-task gradient norms at the shared representation."""


# --------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(timeout_s: int) -> tuple[int, int, int]:
    """Join the process group the launcher describes (deepspeed, torchrun, srun+launcher);
    a plain ``python`` process becomes a world of one. Returns (rank, world_size, local_rank)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-step INFO lines drown megamt's log
    # torch 2.13 deprecates the collective DeepSpeed 0.19 uses on every backward
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the node's cores: without this each rank starts one OpenMP thread per
        # core and they spin against each other (a 2-rank run on 2 cores was 5x slower).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if local_rank == 0:
        warn_stale_build_locks()
    # A finite timeout: a dead peer must end the job, not hang it (FIELD_NOTES: NCCL waits
    # up to the process-group timeout; gloo fails at the next collective).
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    rank = torch.distributed.get_rank()
    release_cpu_shm_at_exit(rank)
    return rank, torch.distributed.get_world_size(), local_rank


def warn_stale_build_locks(min_age_s: float = 600.0) -> list[Path]:
    """DeepSpeed JIT-builds its ops (CPU Adam for optimizer offload, the CPU ranks' shared-memory
    all-reduce) through torch's extension loader on first use. The loader serialises builds with
    a ``lock`` file in the op's build directory and waits on it forever; a build killed midway
    (Ctrl-C, a job time limit) leaves it behind and every later launch then hangs silently
    after "Loading extension module". Name such locks up front. Returns the ones found."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    stale = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except OSError:
            continue
        if age >= min_age_s:
            stale.append(lock)
            print(f"WARNING {lock} is {age / 60:.0f} min old: an interrupted build of a torch/DeepSpeed "
                  "extension leaves this lock, and a run that needs the op waits on it forever. If no build "
                  "is running on this machine, delete the file.", file=sys.stderr, flush=True)
    return stale


def cpu_shm_buffer(rank: int, master_addr: str, master_port: int | str) -> Path:
    """The /dev/shm file of DeepSpeed's CPU shared-memory all-reduce for one rank of a launch."""
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}")


def release_cpu_shm_at_exit(rank: int) -> None:
    """On CPU ranks DeepSpeed's shared-memory all-reduce (``deepspeed_shm_comm_op``) creates a
    66 MB file per rank in /dev/shm, named by user, MASTER_ADDR, MASTER_PORT and rank, and
    never removes it: every launch on a new port leaves them behind (/dev/shm is RAM; a test
    suite or a day of runs filled 20 GB here). Remove this rank's file at exit; the other
    ranks have mapped it long before then, and unlinking keeps their mappings valid."""
    if torch.cuda.is_available():
        return
    import atexit

    name = cpu_shm_buffer(rank, os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))

    def unlink() -> None:
        try:
            os.unlink(name)
        except OSError:
            pass

    atexit.register(unlink)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------- trainer


class MultitaskTrainer:
    """Train a :class:`MultitaskModel` on the config's task mixture with DeepSpeed.

    ``model=None`` builds it here, under ZeRO-3's ``zero.Init`` (partitioned as it is
    created), which is what the CLI does. ``pipeline``: a ``TrainPipeline``-like object
    (default: ``megamt.data.pipeline.TrainPipeline(config, rank, world_size)``); ``eval_batches``:
    a function like ``megamt.data.pipeline.eval_batches`` (the default).
    ``resume``: None = resume when the run directory has a checkpoint, True = must resume,
    False = start fresh.
    """

    def __init__(self, model: MultitaskModel | None, config: MultitaskConfig, *, pipeline=None,
                 eval_batches=None, resume: bool | None = None):
        import deepspeed

        self.cfg = config
        self.tcfg = config.train
        self.run_dir = Path(self.tcfg.run_dir)
        self.task_names = list(config.tasks)
        self.train_tasks = config.train_task_names
        self.num_tasks = len(self.task_names)
        self.resume = resume
        self.rank, self.world_size, self.local_rank = setup_distributed(self.tcfg.dist_timeout_s)
        torch.manual_seed(self.tcfg.seed)

        # gradient-method mode: one task-homogeneous micro-batch per training task per step
        self.gradient_method_mode = config.gradients.method != "none"
        self.grad_accum = len(self.train_tasks) if self.gradient_method_mode else self.tcfg.grad_accum
        hf = hf_config(config.model) if model is None else getattr(model.backbone, "config", None)
        self.dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            resolve_dtype(config.model)]
        self.ds_config = build_ds_config(config, self.world_size, grad_accum=self.grad_accum,
                                         hidden_size=hidden_size_of(hf) if hf is not None else None,
                                         dtype=self.dtype_name)
        if model is None:
            model = self.build_model()
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        self.device = self.engine.device
        self._own_pipeline = pipeline is None
        self.pipeline = pipeline if pipeline is not None else self.build_pipeline()
        self.eval_batches = eval_batches
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", self.tcfg.keep_last, self.rank,
                                             self.world_size, barrier)
        self.n_params = describe(model)["parameters"]
        self.step = 0
        self.consecutive_nonfinite = 0
        self._signal: int | None = None
        self._fault_steps = {int(s) for s in os.environ.get(FAULT_NONFINITE_ENV, "").split(",") if s.strip()}
        # megamt.gradients: the loss balancer gives the per-task weights w_t of every step;
        # GradientSurgery acts on the ZeRO partitions between per-task backward passes, on
        # every step in gradient-method mode and, measure-only, every monitor_every steps.
        from megamt.gradients import GradientSurgery, build_balancer

        self.balancer = build_balancer(config.gradients, self.task_names)
        self.monitor_every = config.gradients.monitor_every
        self.surgery = None
        if self.gradient_method_mode or self.monitor_every:
            # losses.step_loss cancels DeepSpeed's 1/GAS and rank averaging, so a snapshot
            # difference is exactly d(w_t * mean_t)/d(theta): no GAS rescaling of G
            self.surgery = GradientSurgery(self.engine, config.gradients, self.task_names,
                                           method=None if self.gradient_method_mode else "none",
                                           scale_wrt_gas=False)
        # GradNorm on steps that do not measure G: per-task gradient norms at the shared
        # representation, from the one mixed backward (megamt.gradients.representation)
        self.rep_grad_norms = None
        if (self.balancer.needs_grad_norms and not self.gradient_method_mode
                and hasattr(self.model, "track_representation_grad_norms")):
            from megamt.gradients.representation import RepresentationGradNorms

            self.rep_grad_norms = RepresentationGradNorms(self.num_tasks)
            self.model.track_representation_grad_norms(self.rep_grad_norms)
        self.metrics: MetricsLogger | None = None

    # ----------------------------------------------------------------- building
    def build_model(self) -> MultitaskModel:
        """Build the model; under ZeRO-3, partitioned while it is created (``zero.Init``
        through transformers' ``HfDeepSpeedConfig``, which must stay alive while loading)."""
        if zero_stage(self.ds_config) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # noqa: keep a reference
        return MultitaskModel(self.cfg)

    def build_pipeline(self, config: MultitaskConfig | None = None):
        from megamt.data.pipeline import TrainPipeline

        return TrainPipeline(config or self.cfg, self.rank, self.world_size)

    # ----------------------------------------------------------------- derived numbers
    def derived(self) -> dict[str, Any]:
        """Derived numbers printed at start-up and saved with every checkpoint."""
        t, seq = self.tcfg, self.cfg.data.seq_len
        return {
            "world_size": self.world_size,
            "zero_stage": zero_stage(self.ds_config),
            "dtype": self.dtype_name,
            "family": self.model.family,
            "fused_loss": getattr(self.model, "fused_loss", False),
            "parameters": self.n_params,
            "micro_batch_size": t.micro_batch_size,
            "seq_len": seq,
            "grad_accum": self.grad_accum,
            "gradient_method_mode": self.gradient_method_mode,
            # micro_batch rows * seq_len tokens * accumulation * ranks
            "tokens_per_step": t.micro_batch_size * seq * self.grad_accum * self.world_size,
            "tokens_total": t.micro_batch_size * seq * self.grad_accum * self.world_size * t.max_steps,
            "max_steps": t.max_steps,
        }

    def print_startup(self) -> None:
        if self.rank != 0:
            return
        d = self.derived()
        p = self.metrics.print
        p("=" * 72 + "\nmegamt train: resolved config\n" + "-" * 72 + "\n" + self.cfg.to_yaml().rstrip())
        p("-" * 72 + "\nderived numbers")
        p(f"  {d['micro_batch_size']} rows * {d['seq_len']} tokens * {d['grad_accum']} accum * {d['world_size']} ranks"
          f" = {d['tokens_per_step']:,} tokens/step; {d['max_steps']} steps = {d['tokens_total']:,} tokens")
        for k, v in d.items():
            p(f"  {k}: {v}")
        p("-" * 72 + "\nmixture rates at step %d" % self.step)
        for task, prob in self.pipeline.rates(self.step).items():
            p(f"  {task}: {prob:.4f}")
        p("-" * 72 + "\nresolved ds_config\n" + json.dumps(self.ds_config, indent=2))
        p("=" * 72)

    # ----------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """Run to ``train.max_steps`` (or until a stop signal); returns a summary."""
        self.install_signal_handlers()
        self.maybe_resume()
        self.metrics = MetricsLogger(self.run_dir, self.rank, self.tcfg.max_steps, log_every=self.tcfg.log_every,
                                     progress_bar=self.tcfg.progress_bar, start_step=self.step)
        self.print_startup()
        if self.step == 0 and self.tcfg.eval_at_start:
            self.validate()
        result = None
        last_saved = self.step
        try:
            while self.step < self.tcfg.max_steps:
                result = self.train_step()
                self.step += 1
                self.log_step(result)
                if result.stop_requested or self.step == self.tcfg.stop_at_step:
                    why = "stop signal received" if result.stop_requested else "train.stop_at_step reached"
                    self.metrics.print(f"{why}: checkpointing at step {self.step} and exiting")
                    self.save_checkpoint()
                    return {"step": self.step, "stopped": True}
                if self.tcfg.eval_every and self.step % self.tcfg.eval_every == 0 and self.step < self.tcfg.max_steps:
                    self.validate()
                if self.tcfg.save_every and self.step % self.tcfg.save_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            if last_saved != self.step or self.checkpoints.latest_tag() is None:
                self.save_checkpoint()
            eval_losses = self.validate()
            return {"step": self.step, "stopped": False, "eval_loss": eval_losses,
                    "loss": None if result is None else result.loss}
        finally:
            self.metrics.close()

    def train_step(self) -> StepResult:
        """One optimizer step: prefetch micro-batches, count targets once, forward/backward each."""
        t0 = time.perf_counter()
        if hasattr(self.pipeline, "set_step"):
            self.pipeline.set_step(self.step)
        measure = self.measures_task_gradients(self.step + 1)
        micro_batches = self.next_micro_batches(per_task=measure)
        global_count, tokens = self.global_target_counts(micro_batches)
        weights = self.task_weights()
        loss_sum = torch.zeros(self.num_tasks, dtype=torch.float32)
        stats = None
        if measure:
            self.surgery.begin_step()
        if self.rep_grad_norms is not None:
            self.rep_grad_norms.enabled = not measure  # a measuring step has G
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # the boundary is set explicitly: a measuring step has one micro-batch per task,
            # the others train.grad_accum (step_loss scales by DeepSpeed's GAS either way)
            self.engine.set_gradient_accumulation_boundary(last)
            if measure:
                self.surgery.before_backward()  # ZeRO-1/2: each task's backward is reduced on its own
            task_loss = self.forward_backward_step(batch, global_count, weights)
            loss_sum += task_loss.loss_sum.detach().float().cpu()
            if measure:
                # micro-batch i holds task self.train_tasks[i] only
                self.surgery.after_backward(self.task_names.index(self.train_tasks[i]))
                if last:
                    stats = self.surgery.finish()  # combined partitions written back before the real step
            self.engine.step()  # DeepSpeed: a no-op for the weights until the accumulation boundary
        # one all-reduce: the step's per-task loss sums and the stop flag of every rank
        reduced = all_reduce_sum(torch.cat([loss_sum, torch.tensor([float(self._signal is not None)])]).to(
            self.device)).cpu()
        loss_sum, stop = reduced[:-1], bool(reduced[-1] > 0)
        means = task_means(loss_sum, global_count)
        present = global_count > 0
        loss = float((weights * means)[present].sum())
        rep = self.rep_grad_norms.take(self.world_size) if self.rep_grad_norms is not None and not measure else None
        self.balancer.update(self.step + 1, torch.where(present, means, torch.full_like(means, float("nan"))),
                             gram=None if stats is None else stats.gram, present=present, grad_norms=rep)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        applied = self.engine.was_step_applied()
        nonfinite = [self.task_names[i] for i in range(self.num_tasks) if present[i] and not math.isfinite(means[i])]
        self.check_finite(applied, nonfinite, grad_norm)
        return StepResult(
            step=self.step + 1, loss=loss,
            task_loss={self.task_names[i]: float(means[i]) for i in range(self.num_tasks) if present[i]},
            task_tokens={self.task_names[i]: int(global_count[i]) for i in range(self.num_tasks)
                         if self.task_names[i] in self.train_tasks},
            tokens=tokens, grad_norm=grad_norm, lr=float(self.engine.get_lr()[0]),
            step_time_s=time.perf_counter() - t0, applied=applied and not nonfinite, nonfinite_tasks=nonfinite,
            stop_requested=stop, weights={t: float(weights[i]) for i, t in enumerate(self.task_names)
                                          if t in self.train_tasks}, surgery=stats,
            rep_grad_norms=None if rep is None else {t: float(rep[i]) for i, t in enumerate(self.task_names)
                                                     if present[i]})

    def measures_task_gradients(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) runs per-task backward passes."""
        return self.gradient_method_mode or bool(self.monitor_every and step % self.monitor_every == 0)

    def next_micro_batches(self, per_task: bool = False) -> list[dict[str, Any]]:
        """The whole step's micro-batches, fetched before any forward (their target counts
        are needed up front for the global normalisation)."""
        if per_task:
            # one task-homogeneous micro-batch per training task, in task order, each its own
            # forward + backward (ZeRO-3 cannot backward twice through one forward);
            # megamt.gradients.GradientSurgery measures and combines them before the step.
            return [self.pipeline.next_batch(task=t) for t in self.train_tasks]
        return [self.pipeline.next_batch() for _ in range(self.grad_accum)]

    def global_target_counts(self, micro_batches: list[dict[str, Any]]) -> tuple[torch.Tensor, int]:
        """Per-task target tokens of the step over all ranks (fp32 [T]) and the step's non-pad
        tokens, with one all-reduce of T+1 numbers."""
        local = torch.zeros(self.num_tasks + 1, dtype=torch.float32)
        for b in micro_batches:
            local[:-1] += self.count_loss_terms(b)
            local[-1] += float((b["task_ids"] >= 0).sum())
        total = all_reduce_sum(local.to(self.device)).cpu()
        return total[:-1], int(total[-1])

    def count_loss_terms(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-task loss terms of a micro-batch from its labels alone (no forward)."""
        if self.model.family == "encoder":
            from megamt.heads import count_loss_terms

            return count_loss_terms(batch, self.num_tasks)
        return count_targets(batch["labels"], batch["task_ids"], self.num_tasks)

    def task_weights(self) -> torch.Tensor:
        """Per-task loss weights w_t of this step, from the balancer (gradients.loss_weighting);
        constant within the step, identical on every rank."""
        return self.balancer.current_weights().detach().float().cpu()

    def forward_backward_step(self, batch: dict[str, Any], global_count: torch.Tensor,
                              weights: torch.Tensor) -> TaskLoss:
        """Forward one micro-batch, backward its share of the step objective; returns its TaskLoss."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        # the fused loss' upstream gradient is w_t / N_t up to one scalar (step_loss): with it
        # as a hint the kernel computes the gradients during the forward (3 matmuls, not 4)
        batch["loss_grad_scale"] = (weights / global_count.clamp_min(1.0)).to(self.device)
        task_loss = self.engine(batch)
        if self.step + 1 in self._fault_steps:
            poison = torch.ones_like(task_loss.loss_sum)
            poison[int(torch.nonzero(global_count > 0)[0])] = float("nan")
            task_loss = TaskLoss(task_loss.loss_sum * poison.to(task_loss.loss_sum), task_loss.count)
        loss = step_loss(task_loss, global_count.to(self.device), weights.to(self.device), self.world_size,
                         self.grad_accum)
        self.engine.backward(loss)
        return task_loss

    def check_finite(self, applied: bool, nonfinite_tasks: list[str], grad_norm: float | None) -> None:
        """A non-finite loss or gradient: DeepSpeed skipped the update (non-finite gradient
        norm); log it with the task(s) responsible; stop after max_nonfinite_steps in a row."""
        bad = nonfinite_tasks or not applied or (grad_norm is not None and not math.isfinite(grad_norm))
        if not bad:
            self.consecutive_nonfinite = 0
            return
        self.consecutive_nonfinite += 1
        what = (f"non-finite loss in task(s) {', '.join(nonfinite_tasks)}" if nonfinite_tasks
                else f"non-finite gradient (grad norm {grad_norm}) with finite task losses")
        msg = (f"step {self.step + 1}: {what}; optimizer update skipped "
               f"({self.consecutive_nonfinite}/{self.tcfg.max_nonfinite_steps} in a row)")
        if self.rank == 0:
            (self.metrics.print if self.metrics else print)("WARNING " + msg)
        if self.consecutive_nonfinite >= self.tcfg.max_nonfinite_steps:
            raise NonFiniteError(f"{msg}. Stopping: lower train.lr, check the data of the task(s) named, "
                                 f"or raise train.max_nonfinite_steps")

    # ----------------------------------------------------------------- evaluation
    def evaluate_loss(self, split: str | None = None) -> dict[str, float]:
        """Per-task validation loss: one exact pass over each task's held-out shards (at most
        ``train.eval_batches`` micro-batches per rank), normalised by the global target count."""
        from megamt.data.errors import DataError

        if self.eval_batches is None:
            from megamt.data.pipeline import eval_batches as default_eval_batches

            self.eval_batches = default_eval_batches
        split = split or self.cfg.eval.split
        self.engine.eval()
        loss_sum = torch.zeros(self.num_tasks, dtype=torch.float32)
        count = torch.zeros(self.num_tasks, dtype=torch.float32)
        try:
            for task in self.task_names:
                try:
                    batches = list(self.eval_batches(self.cfg, task, split, self.rank, self.world_size,
                                                max_batches=self.tcfg.eval_batches))
                except (KeyError, FileNotFoundError, ValueError, DataError) as e:
                    if self.rank == 0 and self.metrics:
                        self.metrics.print(f"eval: no {split} data for task {task!r} ({e}); skipped")
                    batches = []
                # ZeRO-3 forwards are collective: every rank runs as many as the busiest rank
                n = int(self._all_reduce_max(len(batches)))
                for i in range(n):
                    batch = batches[i] if i < len(batches) else self.padding_batch(batches)
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    with torch.no_grad():
                        tl = self.engine(batch)
                    loss_sum += tl.loss_sum.detach().float().cpu()
                    count += tl.count.detach().float().cpu()
        finally:
            self.engine.train()
        reduced = all_reduce_sum(torch.cat([loss_sum, count]).to(self.device)).cpu()
        loss_sum, count = reduced[: self.num_tasks], reduced[self.num_tasks:]
        return {self.task_names[i]: float(loss_sum[i] / count[i]) for i in range(self.num_tasks) if count[i] > 0}

    def _all_reduce_max(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.device)
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t[0])

    def padding_batch(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """An all-padding batch (no loss term) for a rank with fewer eval batches than others."""
        from megamt.data.pipeline import padding_batch

        rows = batches[0]["input_ids"].shape[0] if batches else None
        return padding_batch(self.cfg, batch_size=rows)

    # ----------------------------------------------------------------- logging
    def log_step(self, r: StepResult) -> None:
        if self.rank != 0:
            return
        scalars: dict[str, float | None] = {"train/loss": r.loss}
        for task, v in r.task_loss.items():
            scalars[f"train/loss/{task}"] = v
        for task, n in r.task_tokens.items():
            scalars[f"train/tokens/{task}"] = n
        for task, p in self.pipeline.rates(r.step - 1).items():
            scalars[f"mix/prob/{task}"] = p
        scalars["train/lr"] = r.lr
        scalars["train/grad_norm"] = r.grad_norm if r.grad_norm is not None and math.isfinite(r.grad_norm) else None
        scalars["perf/tokens_per_s"] = r.tokens / r.step_time_s
        scalars["perf/step_time_s"] = r.step_time_s
        scalars["perf/mfu"] = estimate_mfu(self.n_params, r.tokens / r.step_time_s / self.world_size)
        scalars["mem/peak_gib"] = peak_memory_gib()
        if not r.applied:
            scalars["train/skipped"] = 1.0
        if self.cfg.gradients.loss_weighting != "equal":
            for task, w in r.weights.items():
                scalars[f"loss_weight/{task}"] = w
        for task, n in (r.rep_grad_norms or {}).items():
            scalars[f"grad/rep_norm/{task}"] = n
        if r.surgery is not None:
            for part, seconds in r.surgery.timings.items():
                scalars[f"grad/time_s/{part}"] = seconds
            scalars["grad/conflicts"] = float(r.surgery.conflicts)
            if self.monitor_every and r.step % self.monitor_every == 0 or r.step % self.tcfg.log_every == 0:
                from megamt.gradients.methods import cosine_matrix
                from megamt.gradients.monitor import cosine_heatmap, interference_scalars

                scalars.update(interference_scalars(self.task_names, r.surgery.gram, r.surgery.present))
                self.metrics.writer.add_image("grad/cos_heatmap", cosine_heatmap(
                    self.task_names, cosine_matrix(r.surgery.gram), r.surgery.present), r.step, dataformats="CHW")
        self.metrics.log_step(r.step, scalars)

    def validate(self) -> dict[str, float]:
        """Per-task validation loss, and per-task metrics when ``eval.during_training``."""
        losses = self.evaluate_loss()
        self.log_eval(losses)
        if self.cfg.eval.during_training:
            self.evaluate_metrics()
        return losses

    def evaluate_metrics(self) -> dict[str, Any]:
        """megamt.eval on a plain copy of the weights (gathered from the ZeRO-3 partitions, a
        collective), examples split over the ranks; ``eval/<task>/<metric>`` from rank 0."""
        from megamt.eval.api import evaluate, gather_plain_copy
        from megamt.eval.report import log_eval

        plain = gather_plain_copy(self.engine.module, self.cfg)
        results = evaluate(plain, config=self.cfg, out_dir=self.run_dir / "eval" / f"step_{self.step:08d}",
                           progress=False)
        if self.rank == 0:
            log_eval(self.metrics.writer, self.step, results)
            self.metrics.print(f"eval metrics step {self.step}: " + "  ".join(
                f"{t}/{m}={v:.2f}" for t, r in results["tasks"].items() for m, v in r["metrics"].items()))
        self.engine.train()
        return results

    def log_eval(self, losses: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.log_eval(self.step, losses)

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        rank_state = {"pipeline": self.pipeline.state_dict(), "rng": rng_state(),
                      "balancer": self.balancer.state_dict(),
                      "surgery": self.surgery.state_dict() if self.surgery is not None else None,
                      "extra": {"consecutive_nonfinite": self.consecutive_nonfinite}}
        files = {"megamt_config.yaml": self.cfg.to_yaml(), "ds_config.json": json_text(self.ds_config),
                 "derived.json": json_text(self.derived())}
        path = self.checkpoints.save(self.engine, self.step, rank_state, files)
        if self.rank == 0 and self.metrics:
            self.metrics.print(f"checkpoint: {path}")
        return path

    def maybe_resume(self) -> None:
        tag = self.checkpoints.latest_tag()
        if tag is None:
            if self.resume is True:
                raise FileNotFoundError(f"--resume: no complete checkpoint under {self.checkpoints.dir} "
                                        f"(no `latest` file pointing to an existing folder)")
            return
        if self.resume is False:
            if self.rank == 0:
                print(f"WARNING {self.checkpoints.dir} has checkpoint {tag}; starting fresh (--no-resume); "
                      f"new checkpoints replace it")
            return
        state = self.checkpoints.load(self.engine, tag, elastic=self.tcfg.elastic_resume)
        self.step = int(state["step"])
        if state.get("elastic_from"):
            self.resume_elastic(tag, int(state["elastic_from"]))
        else:
            self.pipeline.load_state_dict(state["pipeline"])
            set_rng_state(state["rng"])
        if state.get("balancer") is not None:
            self.balancer.load_state_dict(state["balancer"])
        if self.surgery is not None and state.get("surgery") is not None:
            self.surgery.load_state_dict(state["surgery"])
        self.consecutive_nonfinite = int((state.get("extra") or {}).get("consecutive_nonfinite", 0))
        if self.rank == 0:
            print(f"resumed from {self.checkpoints.dir / tag} at step {self.step}", flush=True)

    def resume_elastic(self, tag: str, old_world: int) -> None:
        """After loading a checkpoint of ``old_world`` ranks into this world: new data streams
        (the per-rank stream positions do not map onto other ranks), reshuffled with a seed
        offset by the step so they do not replay the run's first batches, and new RNG seeds."""
        seed = self.cfg.data.seed + self.step
        if self._own_pipeline:
            cfg = copy.deepcopy(self.cfg)
            cfg.data.seed = seed
            self.pipeline = self.build_pipeline(cfg)
        torch.manual_seed(self.tcfg.seed + 1000003 * self.step + self.rank)
        random.seed(self.tcfg.seed + self.step + self.rank)
        np.random.seed((self.tcfg.seed + self.step + self.rank) % 2**32)
        if self.rank == 0:
            was = self.cfg.train.tokens_per_step(self.cfg.data.seq_len, old_world)
            print(f"WARNING elastic resume: {self.checkpoints.dir / tag} was written by {old_world} rank(s), this run "
                  f"has {self.world_size}. Weights, optimizer and learning-rate schedule come from a DeepSpeed "
                  f"universal checkpoint; the data streams restart reshuffled (data.seed + step = {seed})"
                  + ("" if self._own_pipeline else " -- a pipeline passed to the trainer is used as it is")
                  + f", so the examples after step {self.step} differ from an uninterrupted run's. Tokens per step: "
                  f"{was:,} before, {self.cfg.train.tokens_per_step(self.cfg.data.seq_len, self.world_size):,} now.",
                  flush=True)

    # ----------------------------------------------------------------- signals
    def install_signal_handlers(self) -> None:
        """SIGUSR1 / SIGTERM only set a flag; the loop finishes the step, checkpoints, exits 0."""

        def handler(signum, frame):
            self._signal = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)
