"""MultitaskTrainer: the DeepSpeed training loop (ZeRO-3 by default).

All DeepSpeed code of megamt lives here (and in the checkpoint component it drives). The loop
is split into named steps, each fitting on a screen:

    train()                     resume -> start-up print -> loop -> final checkpoint
      train_step()              one optimizer step
        next_micro_batches()    the step's micro-batches and their local target counts, built in
                                a background thread while the previous step runs (megamt.prefetch;
                                normal: grad_accum mixed ones; gradient-method mode: one
                                task-homogeneous one per task)
        global_target_counts()  per-task target tokens of the whole step, ONE all-reduce
        forward_backward_step() forward -> TaskLoss -> scaled step loss -> engine.backward
        engine.step()           after every micro-batch, as DeepSpeed expects; it updates the
                                weights only at the accumulation boundary
        reduce_step_numbers()   loss sums, stop flags, step times of every rank: ONE all-reduce,
                                then the step's only device-to-host transfer
      evaluate_loss()           per-task validation loss (eval/loss/<task>)
      save_checkpoint()         engine state + every rank's data/RNG state, then `latest`

Loss scaling (see megamt.losses.step_loss): every micro-batch hands
``world_size * grad_accum * sum_t w_t * loss_sum_t / N_t`` to ``engine.backward``; DeepSpeed
divides by ``grad_accum`` and averages over ranks, so the gradient after the step is exactly
d(sum_t w_t * mean_t)/d(theta) with means over the global batch.

Host-device synchronisation: the per-step numbers (loss sums, counts, the grad norm) stay on
the device through the micro-batch loop; nothing in it reads a device value on the host. The
step ends with one all-reduce and one transfer (tests/unit/test_trainer_hot_path.py counts
the calls on a CPU stand-in).
"""

from __future__ import annotations

import contextlib
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

from megamt import comm
from megamt.checkpoint import CheckpointComm, CheckpointManager, json_text, rng_state, set_rng_state
from megamt.config import MultitaskConfig
from megamt.ds_config import build_ds_config, eval_zero_limits, hidden_size_of, zero_stage
from megamt.losses import TaskLoss, count_targets, step_loss
from megamt.metrics_log import MetricsLogger, estimate_mfu, peak_memory_gib
from megamt.model import MultitaskModel, describe, hf_config, resolve_dtype
from megamt.prefetch import PrefetchingPipeline

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
    """Rank 0's wall time of the whole step."""
    applied: bool
    nonfinite_tasks: list[str] = field(default_factory=list)
    stop_requested: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    """The balancer's per-task loss weights used in this step."""
    surgery: Any = None
    """megamt.gradients.SurgeryStats when this step measured per-task gradients, else None."""
    rep_grad_norms: dict[str, float] | None = None
    """GradNorm without G: per-task gradient norms at the shared representation."""
    step_time_s_min: float | None = None
    """Fastest rank's time from the step's start until its device finished the step's work
    (before the closing all-reduce, so it does not include waiting for the slowest rank there)."""
    step_time_s_max: float | None = None
    """Slowest rank's (a slow node shows as max >> min)."""
    data_wait_s_max: float | None = None
    """Longest time a rank waited for its micro-batches (their build outlasted the previous step)."""
    meta: dict[str, Any] | None = None
    """Meta-learning steps (meta.method): task, inner losses before/after adaptation, displacement
    norm, outer learning rate."""
    affinity: dict[str, float] | None = None
    """``affinity/<i>/<j>`` and ``affinity_first_order/<i>/<j>`` when this step measured them."""


@dataclass
class StepBatches:
    """One optimizer step's micro-batches for this rank, built on the host (see next_micro_batches)."""

    step: int
    """0-based optimizer step they belong to."""
    micro_batches: list[dict[str, Any]]
    local_counts: torch.Tensor
    """fp32 [T+1] on the host: this rank's loss terms per task over the micro-batches, then its
    non-pad tokens (pinned on CUDA, so the copy to the device does not block). Meta-learning
    steps: [micro-batches, T+1], one row per inner step (each is normalised on its own)."""
    tasks: list[str] | None = None
    """Meta-learning steps: the outer step's task(s), one block of micro-batches each."""


def poison_first_task(task_loss: TaskLoss, global_count: torch.Tensor) -> TaskLoss:
    """Fault injection (``MEGAMT_FAULT_NONFINITE_STEPS``): NaN in the loss sum of the first task
    with targets in the step; chosen on the device (no host sync, like the step it stands in)."""
    first = (global_count > 0).to(torch.int8).argmax().reshape(1)
    poison = torch.ones_like(task_loss.loss_sum).index_fill(0, first, float("nan"))
    return TaskLoss(task_loss.loss_sum * poison, task_loss.count)


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
    comm.leave_at_exit()
    return rank, torch.distributed.get_world_size(), local_rank


_COORDINATOR_LIMITS = {"stage3_max_live_parameters": "_PartitionedParameterCoordinator__max_n_available_params",
                       "stage3_max_reuse_distance": "_PartitionedParameterCoordinator__max_reuse_dist_in_numel"}


def _fresh_trace(offload, coordinator) -> None:
    """Release every gathered parameter and make ZeRO-3 record a new module trace at the next
    forward (including the release decisions it caches per trace position)."""
    offload.partition_all_parameters()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    # DeepSpeed caches "which parameters to release after module M at trace position i" without
    # clearing it with the trace: evaluation's trace matches the training trace's forward part
    # position by position, so the cached training decisions (keep everything for the
    # backward) would come back. The cache (functools.lru_cache) sits inside a profiling wrapper.
    fn = getattr(type(coordinator), "_PartitionedParameterCoordinator__params_to_release", None)
    seen = 0
    while fn is not None and not hasattr(fn, "cache_clear") and seen < 4:
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            inner = next((c.cell_contents for c in (getattr(fn, "__closure__", None) or ())
                          if callable(getattr(c, "cell_contents", None))), None)
        fn, seen = inner, seen + 1
    if hasattr(fn, "cache_clear"):
        fn.cache_clear()


@contextlib.contextmanager
def bounded_gathering(engine, limits: dict[str, int]):
    """ZeRO-3 evaluation inside a training run, with the limits of
    :func:`megamt.ds_config.eval_zero_limits` (see there for why and what they save).

    The training engine's parameter coordinator decides what to release from the module trace
    it recorded in training, which continues into a backward pass that evaluation never runs:
    evaluation would keep every parameter gathered "for reuse" until the next training step.
    So around the block: every parameter released and a fresh trace (evaluation records its
    own, training re-records its own after). DeepSpeed reads ``stage3_max_live_parameters``
    and ``stage3_max_reuse_distance`` once, into the coordinator, and has no setter: its
    fields are lowered here and restored after. No limits (``eval.max_live_parameters=-1``),
    ZeRO-1/2 or a DeepSpeed whose coordinator lacks the fields: unchanged."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if hasattr(offload, "get_param_coordinator") else None
    fields = {_COORDINATOR_LIMITS[k]: int(v) for k, v in limits.items()}
    old = {f: getattr(coordinator, f, None) for f in fields}
    if not limits or coordinator is None or not all(isinstance(v, int) for v in old.values()) \
            or not hasattr(coordinator, "_invalidate_trace"):
        yield
        return
    _fresh_trace(offload, coordinator)
    for f, v in fields.items():
        setattr(coordinator, f, min(old[f], v))
    try:
        yield
    except BaseException:
        for f, v in old.items():
            setattr(coordinator, f, v)
        try:  # best effort: the error in flight is the one to report
            _fresh_trace(offload, coordinator)
        except Exception:
            pass
        raise
    for f, v in old.items():
        setattr(coordinator, f, v)
    _fresh_trace(offload, coordinator)


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


def meta_ds_problems(ds: dict, cfg: MultitaskConfig) -> list[str]:
    """What a resolved ds_config lacks for ``meta.method`` (the config-only combinations are
    checked by megamt.config): ZeRO-1, 2 or 3 partitions, no NVMe offload, no fp16 loss scaling."""
    m = f"meta.method={cfg.meta.method}"
    out = []
    zero = ds.get("zero_optimization") or {}
    if zero_stage(ds) not in (1, 2, 3):
        out.append(f"train.ds_config={cfg.train.ds_config}: {m} runs on ZeRO partitions (got stage {zero_stage(ds)}); "
                   "use a ZeRO-1, 2 or 3 config (templates: zero2, zero2_offload, zero3, zero3_offload)")
    for part in ("offload_optimizer", "offload_param"):
        if str((zero.get(part) or {}).get("device", "none")).endswith("nvme"):
            out.append(f"train.ds_config={cfg.train.ds_config}: zero_optimization.{part}.device=nvme is not supported "
                       f"with {m} (partitions swapped out); use cpu or none")
    if (ds.get("fp16") or {}).get("enabled") is True:
        out.append(f"train.ds_config={cfg.train.ds_config}: fp16 loss scaling is not supported with {m}; use bf16 or fp32")
    return out


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

    meta_mode = False
    """``meta.method != none``: every optimizer step is a meta-learning outer step."""
    meta = None
    """megamt.gradients.meta.MetaPartitions in meta mode."""

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
        # meta-learning: every optimizer step is one outer step of inner updates on one task's
        # micro-batches (megamt.gradients.meta); DeepSpeed sees GAS = 1 and no boundary in between
        self.meta_mode = config.meta.method != "none"
        hf = hf_config(config.model) if model is None else getattr(model.backbone, "config", None)
        self.dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            resolve_dtype(config.model)]
        self.ds_config = build_ds_config(config, self.world_size, grad_accum=self.grad_accum,
                                         hidden_size=hidden_size_of(hf) if hf is not None else None,
                                         dtype=self.dtype_name)
        if self.meta_mode:
            problems = meta_ds_problems(self.ds_config, config)
            if problems:
                from megamt.config import ConfigError

                raise ConfigError(problems)
        if model is None:
            model = self.build_model()
        self.model = model
        self.memory_plan = self.resolve_gradient_checkpointing(hf)
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        self.device = self.engine.device
        self._own_pipeline = pipeline is None
        self.pin_memory = torch.cuda.is_available()
        self.pipeline = (PrefetchingPipeline(pipeline, enabled=self.tcfg.prefetch) if pipeline is not None
                         else self.build_pipeline())
        self.eval_batches = eval_batches
        # checkpoint I/O waits on a long-timeout group of its own; rank 0 decides, the others follow
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", self.tcfg.keep_last, self.rank, self.world_size,
            CheckpointComm(self.tcfg.checkpoint_timeout_s, normal_timeout_s=self.tcfg.dist_timeout_s),
            convert_max_gb=self.tcfg.elastic_convert_max_gb, wait_timeout_s=self.tcfg.checkpoint_timeout_s,
            log=lambda text: print(text, flush=True))
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
        if self.gradient_method_mode or self.monitor_every or config.gradients.affinity_every:
            # losses.step_loss cancels DeepSpeed's 1/GAS and rank averaging, so a snapshot
            # difference is exactly d(w_t * mean_t)/d(theta): no GAS rescaling of G
            self.surgery = GradientSurgery(self.engine, config.gradients, self.task_names,
                                           method=None if self.gradient_method_mode else "none",
                                           scale_wrt_gas=False, train_tasks=self.train_tasks)
        # GradNorm on steps that do not measure G: per-task gradient norms at the shared
        # representation, from the one mixed backward (megamt.gradients.representation)
        self.rep_grad_norms = None
        if (self.balancer.needs_grad_norms and not self.gradient_method_mode
                and hasattr(self.model, "track_representation_grad_norms")):
            from megamt.gradients.representation import RepresentationGradNorms

            self.rep_grad_norms = RepresentationGradNorms(self.num_tasks)
            self.model.track_representation_grad_norms(self.rep_grad_norms)
        self.meta = None
        if self.meta_mode:
            from megamt.gradients.meta import MetaPartitions

            self.meta = MetaPartitions(self.engine, config.meta.inner_optimizer, betas=tuple(config.meta.inner_betas))
        # TAG inter-task affinity on measuring steps (megamt.gradients.affinity): the lookahead
        # runs inside surgery.finish() on the per-task partitions, the first-order one from G
        self.affinity = None
        if config.gradients.affinity_every:
            from megamt.gradients.affinity import TaskAffinity

            self.affinity = TaskAffinity(
                config.gradients, self.task_names, lr=self.tcfg.lr, surgery=self.surgery, run_dir=self.run_dir,
                rank=self.rank, forward=lambda b: self.engine({k: v.to(self.device) if torch.is_tensor(v) else v
                                                               for k, v in b.items()}))
        self.on_validation = None
        """Optional ``callback(trainer, losses, results) -> bool`` after every validation, on every
        rank (``results``: the metrics when ``eval.during_training``, else None). It must give the
        same answer on every rank; True ends training after this validation, without a
        checkpoint (an HPO pruner stopping a trial: megamt.experiments.hpo)."""
        self.stopped_by_callback = False
        self.metrics: MetricsLogger | None = None

    # ----------------------------------------------------------------- building
    def build_model(self) -> MultitaskModel:
        """Build the model; under ZeRO-3, partitioned while it is created (``zero.Init``
        through transformers' ``HfDeepSpeedConfig``, which must stay alive while loading)."""
        if zero_stage(self.ds_config) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # noqa: keep a reference
        return MultitaskModel(self.cfg)

    def build_pipeline(self, config: MultitaskConfig | None = None) -> PrefetchingPipeline:
        from megamt.data.pipeline import TrainPipeline

        return PrefetchingPipeline(TrainPipeline(config or self.cfg, self.rank, self.world_size),
                                   enabled=self.tcfg.prefetch)

    def resolve_gradient_checkpointing(self, hf):
        """``model.gradient_checkpointing=auto``: on when megamt.plan's estimate of this run's
        per-device peak without it exceeds the device's memory (the CUDA device's; on CPU ranks
        the machine's RAM shared by its ranks). Returns the plan (None when not auto)."""
        if self.cfg.model.gradient_checkpointing != "auto" or hf is None:
            return None
        from megamt.plan import device_memory_bytes, plan_memory, shape_of

        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        try:
            plan = plan_memory(self.cfg, shape_of(self.model.backbone, hf), world_size=self.world_size,
                               device_bytes=device_memory_bytes(local), gpus_per_node=local,
                               ds_config=self.ds_config, dtype=self.dtype_name, grad_accum=self.grad_accum)
        except Exception as e:  # noqa: BLE001 -- an estimate must not stop a run that may fit
            if self.rank == 0:
                print(f"WARNING model.gradient_checkpointing=auto: no memory estimate for this model ({e!r}); "
                      "left off (set it to true or false)", file=sys.stderr, flush=True)
            return None
        if plan.gradient_checkpointing and not self.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        return plan

    # ----------------------------------------------------------------- derived numbers
    def derived(self) -> dict[str, Any]:
        """Derived numbers printed at start-up and saved with every checkpoint."""
        t, seq = self.tcfg, self.cfg.data.seq_len
        # a seq2seq row is an encoder row of seq_len and a decoder row of target_len
        row = seq + self.cfg.data.target_len if self.model.family == "seq2seq" else seq
        extra = {"target_len": self.cfg.data.target_len} if self.model.family == "seq2seq" else {}
        return {
            "world_size": self.world_size,
            "zero_stage": zero_stage(self.ds_config),
            "dtype": self.dtype_name,
            "family": self.model.family,
            "fused_loss": getattr(self.model, "fused_loss", False),
            "parameters": self.n_params,
            "micro_batch_size": t.micro_batch_size,
            "seq_len": seq,
            **extra,
            "grad_accum": self.grad_accum,
            "micro_batches_per_step": self.micro_batches_per_step,
            "gradient_method_mode": self.gradient_method_mode,
            "meta_method": self.cfg.meta.method,
            "gradient_checkpointing": bool(getattr(self.model, "gradient_checkpointing", False)),
            "gradient_checkpointing_setting": self.cfg.model.gradient_checkpointing,
            # megamt.plan's per-device estimate (GiB) behind gradient_checkpointing=auto
            "memory_plan_peak_gib": None if self.memory_plan is None else round(self.memory_plan.peak / 2**30, 3),
            "device_memory_gib": None if self.memory_plan is None else round(self.memory_plan.device_bytes / 2**30, 3),
            "prefetch": bool(self.tcfg.prefetch),
            "grad_comm_dtype": self.ds_config.get("communication_data_type", self.dtype_name),
            # micro_batch rows * row tokens * micro-batches per step (accumulation, inner steps) * ranks
            "tokens_per_step": t.micro_batch_size * row * self.micro_batches_per_step * self.world_size,
            "tokens_total": t.micro_batch_size * row * self.micro_batches_per_step * self.world_size * t.max_steps,
            "max_steps": t.max_steps,
        }

    def print_startup(self) -> None:
        if self.rank != 0:
            return
        d = self.derived()
        p = self.metrics.print
        p("=" * 72 + "\nmegamt train: resolved config\n" + "-" * 72 + "\n" + self.cfg.to_yaml().rstrip())
        p("-" * 72 + "\nderived numbers")
        row = f"({d['seq_len']} encoder + {d['target_len']} decoder)" if "target_len" in d else d["seq_len"]
        p(f"  {d['micro_batch_size']} rows * {row} tokens * {d['micro_batches_per_step']} micro-batches * {d['world_size']} ranks"
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
        if (self.step == 0 and self.tcfg.eval_at_start) or self.missed_validation():
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
                    if self.stopped_by_callback:
                        self.metrics.print(f"stopped at step {self.step} by the validation callback (no checkpoint)")
                        return {"step": self.step, "stopped": True, "stopped_by_callback": True}
                if self.tcfg.save_every and self.step % self.tcfg.save_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            if last_saved != self.step or self.checkpoints.latest_tag() is None:
                self.save_checkpoint()
            eval_losses = self.validate()
            return {"step": self.step, "stopped": False, "eval_loss": eval_losses,
                    "loss": None if result is None else result.loss}
        finally:
            self.pipeline.close()
            self.metrics.close()

    def missed_validation(self) -> bool:
        """A run stopped (signal, ``stop_at_step``) right after a step that validates checkpoints
        before validating; ``target_gap`` mixing needs that evaluation, so the resumed run does it."""
        mixture = getattr(self.pipeline, "mixture", None)
        dyn = getattr(mixture, "dynamic", None)
        every = self.tcfg.eval_every
        return (self.step > 0 and every > 0 and self.step % every == 0 and self.step < self.tcfg.max_steps
                and getattr(dyn, "last_eval", self.step) < self.step)

    def train_step(self) -> StepResult:
        """One optimizer step: take the step's (prefetched) micro-batches, count targets once,
        forward/backward each; the step's numbers stay on the device until reduce_step_numbers."""
        t0 = time.perf_counter()
        if not isinstance(self.pipeline, PrefetchingPipeline):  # a pipeline assigned after __init__
            self.pipeline = PrefetchingPipeline(self.pipeline, enabled=self.tcfg.prefetch)
        if self.meta_mode:
            return self.meta_train_step(t0)
        measure = self.measures_task_gradients(self.step + 1)
        following = self.step + 1 if self.step + 1 < self.tcfg.max_steps else None
        built = self.pipeline.take(self.step, self.next_micro_batches, next_step=following)
        data_wait_s = self.pipeline.wait_s
        global_count = self.global_target_counts(built.local_counts)  # [T+1] on the device
        weights = self.task_weights()
        weights_dev = self.to_device(weights)
        # the fused loss' upstream gradient is w_t / N_t up to one scalar (step_loss): with it
        # as a hint the kernel computes the gradients during the forward (3 matmuls, not 4)
        grad_scale = weights_dev / global_count[:-1].clamp_min(1.0)
        loss_sum = torch.zeros(self.num_tasks, dtype=torch.float32, device=self.device)
        stats = None
        if measure:
            self.surgery.begin_step()
        if self.rep_grad_norms is not None:
            self.rep_grad_norms.enabled = not measure  # a measuring step has G
        for i, batch in enumerate(built.micro_batches):
            last = i == len(built.micro_batches) - 1
            # the boundary is set explicitly: a measuring step has one micro-batch per task,
            # the others train.grad_accum (step_loss scales by DeepSpeed's GAS either way)
            self.engine.set_gradient_accumulation_boundary(last)
            if measure:
                self.surgery.before_backward()  # ZeRO-1/2: each task's backward is reduced on its own
            task_loss = self.forward_backward_step(batch, global_count[:-1], weights_dev, grad_scale)
            loss_sum += task_loss.loss_sum.detach().float()
            if measure:
                # micro-batch i holds task self.train_tasks[i] only
                self.surgery.after_backward(self.task_names.index(self.train_tasks[i]))
                if last:
                    if self.affinity is not None:  # the lookahead runs inside finish() when due
                        self.affinity.arm(self.step + 1, {self.task_names.index(t): b for t, b in
                                                          zip(self.train_tasks, built.micro_batches)})
                    stats = self.surgery.finish()  # combined partitions written back before the real step
            self.engine.step()  # DeepSpeed: a no-op for the weights until the accumulation boundary
        rep = self.rep_grad_norms.take(self.world_size) if self.rep_grad_norms is not None and not measure else None
        n = self.reduce_step_numbers(loss_sum, global_count, self.engine.get_global_grad_norm(), t0, data_wait_s)
        means = [s / max(c, 1.0) for s, c in zip(n["loss_sum"], n["count"])]  # losses.task_means on host floats
        present = [c > 0 for c in n["count"]]
        self.update_mixture(means, present)
        w = weights.tolist()  # the balancer's weights live on the host
        loss = sum(w[i] * means[i] for i in range(self.num_tasks) if present[i])
        present_t = torch.tensor(present)
        self.balancer.update(self.step + 1, torch.tensor([m if p else float("nan") for m, p in zip(means, present)]),
                             gram=None if stats is None else stats.gram, present=present_t, grad_norms=rep)
        affinity = (self.affinity.scalars() if self.affinity is not None and self.affinity.update(
            self.step + 1, stats, [m if p else float("nan") for m, p in zip(means, present)]) else None)
        applied = self.engine.was_step_applied()
        nonfinite = [self.task_names[i] for i in range(self.num_tasks) if present[i] and not math.isfinite(means[i])]
        self.check_finite(applied, nonfinite, n["grad_norm"])
        return StepResult(
            step=self.step + 1, loss=loss,
            task_loss={self.task_names[i]: means[i] for i in range(self.num_tasks) if present[i]},
            task_tokens={self.task_names[i]: int(n["count"][i]) for i in range(self.num_tasks)
                         if self.task_names[i] in self.train_tasks},
            tokens=int(n["tokens"]), grad_norm=n["grad_norm"], lr=float(self.engine.get_lr()[0]),
            step_time_s=time.perf_counter() - t0, applied=applied and not nonfinite, nonfinite_tasks=nonfinite,
            stop_requested=n["stop"], weights={t: w[i] for i, t in enumerate(self.task_names) if t in self.train_tasks},
            surgery=stats, rep_grad_norms=None if rep is None else {
                t: float(rep[i]) for i, t in enumerate(self.task_names) if present[i]},
            step_time_s_min=min(n["step_time_s"]), step_time_s_max=max(n["step_time_s"]),
            data_wait_s_max=max(n["data_wait_s"]), affinity=affinity)

    def reduce_step_numbers(self, loss_sum: torch.Tensor, global_count: torch.Tensor, grad_norm,
                            t0: float, data_wait_s: float, extra: torch.Tensor | None = None) -> dict[str, Any]:
        """The step's closing collective and its only device-to-host transfer.

        Every rank writes its row of a ``[world, T + 3]`` table (its loss sums, stop flag, step
        time, data wait) and zeros elsewhere; the sum over ranks is then an exact all-gather
        (x + 0 = x), so the loss sums add up on the host and the step times give min and max
        over ranks without another collective (22 KB at 512 ranks and 8 tasks). The table, the
        step's global counts and the grad norm come to the host in one transfer. ``extra``: more
        per-rank numbers (on the device) whose sums over ranks come back as ``"extra"``.
        """
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # this rank's step time ends with its device work
        elapsed = time.perf_counter() - t0
        T = self.num_tasks
        E = 0 if extra is None else extra.numel()
        table = comm.zeros((self.world_size, T + 3 + E))
        table[self.rank, :T] = loss_sum
        for j, value in enumerate((float(self._signal is not None), elapsed, data_wait_s)):
            table[self.rank, T + j] = value  # a fill with a host scalar: no copy, no sync
        if E:
            table[self.rank, T + 3:] = extra.reshape(-1)
        comm.all_reduce(table)
        width = T + 3 + E
        parts = [table.flatten(), global_count.float()]
        if torch.is_tensor(grad_norm):
            parts.append(grad_norm.detach().float().reshape(1))
        host = torch.cat(parts).tolist()  # the transfer
        rows = [host[r * width:(r + 1) * width] for r in range(self.world_size)]
        counts = host[self.world_size * width:self.world_size * width + T + 1]
        if torch.is_tensor(grad_norm):
            grad_norm = host[-1]
        return {"loss_sum": [sum(r[t] for r in rows) for t in range(T)], "count": counts[:T],  # float64 sums
                "tokens": counts[T], "stop": any(r[T] > 0 for r in rows),
                "step_time_s": [r[T + 1] for r in rows], "data_wait_s": [r[T + 2] for r in rows],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "extra": [sum(r[T + 3 + e] for r in rows) for e in range(E)]}

    def update_mixture(self, means: list[float], present: list[bool]) -> None:
        """``mixture.strategy=dynamic``: hand the step's per-task mean losses (already
        all-reduced, so identical on every rank; no collective here) to the pipeline's mixture,
        which may update the rates of the steps that follow."""
        if self.cfg.mixture.strategy != "dynamic" or not hasattr(self.pipeline, "observe_losses"):
            return
        losses = {t: v for t, v, p in zip(self.task_names, means, present)
                  if p and t in self.train_tasks and math.isfinite(v)}
        self.pipeline.observe_losses(self.step + 1, losses)

    def measures_task_gradients(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) runs per-task backward passes."""
        return (self.gradient_method_mode or bool(self.monitor_every and step % self.monitor_every == 0)
                or (self.affinity is not None and self.affinity.due(step)))

    def next_micro_batches(self, pipeline, step: int) -> StepBatches:
        """Step ``step``'s (0-based) micro-batches and their local target counts, on the host.

        Runs in the prefetch thread (``train.prefetch``) while step ``step - 1`` trains, so it
        touches only ``pipeline`` and the batches. All micro-batches come before any forward:
        their target counts are needed up front for the global normalisation.
        """
        if hasattr(pipeline, "set_step"):
            pipeline.set_step(step)
        if self.meta_mode:
            return self.next_meta_batches(pipeline, step)
        if self.measures_task_gradients(step + 1):
            # one task-homogeneous micro-batch per training task, in task order, each its own
            # forward + backward (ZeRO-3 cannot backward twice through one forward);
            # megamt.gradients.GradientSurgery measures and combines them before the step.
            batches = [pipeline.next_batch(task=t) for t in self.train_tasks]
        else:
            batches = [pipeline.next_batch() for _ in range(self.grad_accum)]
        from megamt.data.packing import non_pad_tokens

        local = torch.zeros(self.num_tasks + 1, dtype=torch.float32)
        for b in batches:
            local[:-1] += self.count_loss_terms(b)
            local[-1] += non_pad_tokens(b)  # both sides of a seq2seq batch
        for b in batches:  # host copies of the segment boundaries (megamt.attention's per-segment path reads them)
            for key in [k for k in b if k.endswith("cu_seqlens") and torch.is_tensor(b[k])]:
                b[key + "_host"] = tuple(b[key].tolist())
        if self.pin_memory:  # page-locked: the copies to the device run asynchronously
            batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
            local = local.pin_memory()
        return StepBatches(step, batches, local)

    # ----------------------------------------------------------------- meta-learning
    def next_meta_batches(self, pipeline, step: int) -> StepBatches:
        """Outer step ``step``'s micro-batches (meta.method): its task(s) (``meta.tasks_per_step``),
        drawn by the mixture's rates from a generator seeded by (meta.seed, step) -- the same on every
        rank and on resume, without a collective -- then per task one task-homogeneous micro-batch per
        inner step (fomaml: one more, the query), each with its own local counts (each inner step
        is normalised alone)."""
        from megamt.gradients.meta import sample_meta_tasks

        mcfg = self.cfg.meta
        tasks = sample_meta_tasks(pipeline.rates(step), self.train_tasks, mcfg.seed, step, mcfg.tasks_per_step)
        batches = [pipeline.next_batch(task=t) for t in tasks for _ in range(self.micro_batches_per_task)]
        local = torch.zeros((len(batches), self.num_tasks + 1), dtype=torch.float32)
        for i, b in enumerate(batches):
            local[i, :-1] = self.count_loss_terms(b)
            local[i, -1] = (b["task_ids"] >= 0).sum()
        if self.pin_memory:
            batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
            local = local.pin_memory()
        return StepBatches(step, batches, local, tasks=tasks)

    @property
    def micro_batches_per_task(self) -> int:
        """Meta-learning: forward/backward passes per task of an outer step (inner steps, + the fomaml query)."""
        return self.cfg.meta.inner_steps + (self.cfg.meta.method == "fomaml")

    @property
    def micro_batches_per_step(self) -> int:
        """Forward/backward passes per rank per optimizer step."""
        if self.meta_mode:
            return self.micro_batches_per_task * self.cfg.meta.tasks_per_step
        return self.grad_accum

    def meta_train_step(self, t0: float) -> StepResult:
        """One outer step (meta.method, megamt.gradients.meta): every micro-batch but a fomaml query
        is an inner update of this rank's partitions; batched Reptile ends each task's block with
        ``end_task()``; then the outer update. Reptile's waits for the step's closing all-reduce: a
        non-finite loss or displacement restores theta0 instead."""
        from megamt.gradients.meta import reptile_epsilon

        mcfg = self.cfg.meta
        fomaml = mcfg.method == "fomaml"
        following = self.step + 1 if self.step + 1 < self.tcfg.max_steps else None
        built = self.pipeline.take(self.step, self.next_micro_batches, next_step=following)
        data_wait_s = self.pipeline.wait_s
        counts = self.global_target_counts(built.local_counts)  # [micro-batches, T+1], ONE all-reduce
        T = self.num_tasks
        ones = torch.ones(T, dtype=torch.float32, device=self.device)
        loss_sum = torch.zeros(T, dtype=torch.float32, device=self.device)
        first = torch.zeros_like(loss_sum)  # per task: its blocks' first micro-batch means, summed
        last = torch.zeros_like(loss_sum)
        per_task = self.micro_batches_per_task
        batched = len(built.tasks) > 1
        self.meta.begin_outer()
        for i, batch in enumerate(built.micro_batches):
            query = fomaml and i % per_task == per_task - 1
            # the fomaml query is a boundary (the outer optimizer steps); an inner backward is one on ZeRO-1/2
            # (where the reduced gradient reaches the partition) and not on ZeRO-3 (it stays in the partition)
            self.engine.set_gradient_accumulation_boundary(query or self.meta.inner_boundary)
            count = counts[i, :-1]
            task_loss = self.forward_backward_step(batch, count, ones, ones / count.clamp_min(1.0))
            ls = task_loss.loss_sum.detach().float()
            loss_sum = loss_sum + ls
            share = ls / count.clamp_min(1.0)  # this rank's share of the micro-batch's global mean
            if i % per_task == 0:
                first = first + share
            if i % per_task == per_task - 1:
                last = last + share
            if not query:
                self.meta.inner_step(mcfg.inner_lr)
            if batched and i % per_task == per_task - 1:
                self.meta.end_task()  # its displacement kept, theta0 back for the next task
        extra = torch.cat([first, last, self.meta.displacement_sq().float().reshape(1).to(self.device)])
        grad_norm = None
        if fomaml:
            self.meta.restore(publish=False)  # the query gradient (at theta_k) is applied at theta0
            self.engine.step()  # publishes the weights, as every step does
            if not self.engine.was_step_applied():
                self.meta.publish()  # skipped: the model still holds theta_k
            grad_norm = self.engine.get_global_grad_norm()
        n = self.reduce_step_numbers(loss_sum, counts.sum(0), grad_norm, t0, data_wait_s, extra=extra)
        means = [s / max(c, 1.0) for s, c in zip(n["loss_sum"], n["count"])]
        present = [c > 0 for c in n["count"]]
        self.update_mixture(means, present)
        nonfinite = [self.task_names[i] for i in range(T) if present[i] and not math.isfinite(means[i])]
        displacement = math.sqrt(n["extra"][2 * T]) if n["extra"][2 * T] >= 0 else float("nan")
        if fomaml:
            applied, lr = self.engine.was_step_applied(), float(self.engine.get_lr()[0])
        else:
            lr = reptile_epsilon(mcfg.outer_lr, mcfg.outer_lr_schedule, self.step, self.tcfg.max_steps)
            applied = not nonfinite and math.isfinite(displacement)
            if applied:
                self.meta.reptile_outer(lr)
            else:
                self.meta.restore()
        self.check_finite(applied, nonfinite, n["grad_norm"])
        blocks = {t: built.tasks.count(t) for t in dict.fromkeys(built.tasks)}
        idx = {t: self.task_names.index(t) for t in blocks}
        return StepResult(
            step=self.step + 1, loss=sum(means[i] for i in range(T) if present[i]),
            task_loss={self.task_names[i]: means[i] for i in range(T) if present[i]},
            task_tokens={t: int(n["count"][i]) for i, t in enumerate(self.task_names) if t in self.train_tasks},
            tokens=int(n["tokens"]), grad_norm=n["grad_norm"], lr=lr, step_time_s=time.perf_counter() - t0,
            applied=applied and not nonfinite, nonfinite_tasks=nonfinite, stop_requested=n["stop"],
            step_time_s_min=min(n["step_time_s"]), step_time_s_max=max(n["step_time_s"]),
            data_wait_s_max=max(n["data_wait_s"]),
            meta={"tasks": list(built.tasks),
                  "inner_loss_before": {t: n["extra"][idx[t]] / b for t, b in blocks.items()},
                  "inner_loss_after": {t: n["extra"][T + idx[t]] / b for t, b in blocks.items()},
                  "displacement_norm": displacement, "outer_lr": lr})

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the engine's device without blocking the host."""
        if self.pin_memory and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def global_target_counts(self, local_counts: torch.Tensor) -> torch.Tensor:
        """Per-task target tokens of the step over all ranks, then the step's non-pad tokens:
        fp32 [T+1] on the device, ONE all-reduce, no host sync (read back in reduce_step_numbers)."""
        total = comm.zeros(tuple(local_counts.shape))
        total.copy_(local_counts, non_blocking=True)
        return comm.all_reduce(total)

    def count_loss_terms(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-task loss terms of a micro-batch from its labels alone (no forward)."""
        if self.model.family == "encoder":
            from megamt.heads import count_loss_terms

            return count_loss_terms(batch, self.num_tasks)
        return count_targets(batch["labels"], batch["task_ids"], self.num_tasks)

    def task_weights(self) -> torch.Tensor:
        """Per-task loss weights w_t of this step, from the balancer (gradients.loss_weighting);
        constant within the step, identical on every rank; a host tensor (the balancer's
        parameters live on the CPU)."""
        return self.balancer.current_weights().detach().float()

    def forward_backward_step(self, batch: dict[str, Any], global_count: torch.Tensor, weights: torch.Tensor,
                              grad_scale: torch.Tensor) -> TaskLoss:
        """Forward one micro-batch, backward its share of the step objective; returns its TaskLoss.
        ``global_count``, ``weights`` and ``grad_scale`` (= weights / N_t) are on the device."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["loss_grad_scale"] = grad_scale
        task_loss = self.engine(batch)
        if self.step + 1 in self._fault_steps:
            task_loss = poison_first_task(task_loss, global_count)
        loss = step_loss(task_loss, global_count, weights, self.world_size, self.grad_accum)
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
                n = int(comm.reduce_values([len(batches)], "max")[0])
                for i in range(n):
                    batch = batches[i] if i < len(batches) else self.padding_batch(batches)
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    with torch.no_grad():
                        tl = self.engine(batch)
                    loss_sum += tl.loss_sum.detach().float().cpu()
                    count += tl.count.detach().float().cpu()
        finally:
            self.engine.train()
        reduced = comm.all_reduce(comm.on_device(torch.cat([loss_sum, count]))).cpu()
        loss_sum, count = reduced[: self.num_tasks], reduced[self.num_tasks:]
        return {self.task_names[i]: float(loss_sum[i] / count[i]) for i in range(self.num_tasks) if count[i] > 0}

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
        # over ranks: a slow node shows as max >> min (every rank's own time, before the closing
        # all-reduce); a rank starved of batches as a large data wait
        scalars["perf/step_time_s_min"] = r.step_time_s_min
        scalars["perf/step_time_s_max"] = r.step_time_s_max
        scalars["perf/data_wait_s_max"] = r.data_wait_s_max
        scalars["perf/mfu"] = estimate_mfu(self.n_params, r.tokens / r.step_time_s / self.world_size)
        scalars["mem/peak_gib"] = peak_memory_gib()
        if not r.applied:
            scalars["train/skipped"] = 1.0
        if self.cfg.gradients.loss_weighting != "equal":
            for task, w in r.weights.items():
                scalars[f"loss_weight/{task}"] = w
        for task, n in (r.rep_grad_norms or {}).items():
            scalars[f"grad/rep_norm/{task}"] = n
        if r.meta is not None:
            # before = the outer step's first micro-batch at theta0; after = its last one (fomaml: the
            # query at the adapted theta_k; reptile: the last inner step's, at theta_(k-1))
            for task, v in r.meta["inner_loss_before"].items():
                scalars[f"meta/inner_loss/{task}/before"] = v
                scalars[f"meta/inner_loss/{task}/after"] = r.meta["inner_loss_after"][task]
            scalars["meta/displacement_norm"] = r.meta["displacement_norm"]
            scalars["meta/outer_lr"] = r.meta["outer_lr"]
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
        if r.affinity:
            scalars.update(r.affinity)
            self.metrics.writer.add_image("affinity/heatmap", self.affinity.heatmap(), r.step, dataformats="CHW")
        self.metrics.log_step(r.step, scalars)

    def eval_gathering(self):
        """The context every evaluation of the engine's module runs in (bounded_gathering with
        ``eval.max_live_parameters``)."""
        return bounded_gathering(self.engine, eval_zero_limits(self.ds_config, self.cfg.eval.max_live_parameters))

    def validate(self) -> dict[str, float]:
        """Per-task validation loss, and per-task metrics when ``eval.during_training``."""
        with self.eval_gathering():
            losses = self.evaluate_loss()
            self.log_eval(losses)
            results = self.evaluate_metrics() if self.cfg.eval.during_training else None
        if self.cfg.mixture.strategy == "dynamic" and hasattr(self.pipeline, "observe_eval"):
            # identical on every rank: the losses are all-reduced, the metrics broadcast
            self.pipeline.observe_eval(self.step, losses, results)
        if self.on_validation is not None and self.on_validation(self, losses, results):
            self.stopped_by_callback = True
        return losses

    def evaluate_metrics(self) -> dict[str, Any]:
        """megamt.eval on the engine's module itself (ZeRO-3: partitioned, one module gathered
        at a time, on this rank's device; the ranks in lockstep), examples split over the
        ranks; ``eval/<task>/<metric>`` from rank 0."""
        from megamt.eval.api import evaluate
        from megamt.eval.report import log_eval

        results = evaluate(self.engine.module, config=self.cfg,
                           out_dir=self.run_dir / "eval" / f"step_{self.step:08d}", progress=False)
        if self.rank == 0:
            log_eval(self.metrics.writer, self.step, results)
            self.metrics.print(f"eval metrics step {self.step}: " + "  ".join(
                f"{t}/{m}={v:.2f}" for t, r in results["tasks"].items() for m, v in r["metrics"].items()))
        self.engine.train()
        return results

    def evaluate_trained(self, tasks=None, **kwargs) -> dict[str, Any]:
        """megamt.eval's ``evaluate`` on the engine's module after training (the experiment
        runner, the transfer experiment): partitioned under ZeRO-3, with gathering bounded as
        in validation (``eval.max_live_parameters``); no full copy on any rank."""
        from megamt.eval.api import evaluate

        with self.eval_gathering():
            results = evaluate(self.engine.module, tasks, config=self.cfg, **kwargs)
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
                      "extra": {"consecutive_nonfinite": self.consecutive_nonfinite,
                                # this rank's inner-optimizer state (meta.inner_optimizer=adam)
                                "meta": self.meta.state_dict() if self.meta is not None else None,
                                # rank-independent: an elastic resume (new streams) keeps the rates
                                "mixture": self.mixture_state()}}
        files = {"megamt_config.yaml": self.cfg.to_yaml(), "ds_config.json": json_text(self.ds_config),
                 "derived.json": json_text(self.derived())}
        path = self.checkpoints.save(self.engine, self.step, rank_state, files)
        if self.rank == 0 and self.metrics:
            self.metrics.print(f"checkpoint: {path}")
        return path

    def mixture_state(self) -> dict | None:
        """The dynamic mixture's state (None without one)."""
        if not hasattr(getattr(self.pipeline, "mixture", None), "state_dict"):
            return None
        # from the pipeline's state (the prefetch snapshot), not the live mixture the build thread advances
        return (self.pipeline.state_dict() or {}).get("mixture") or None

    def maybe_resume(self) -> None:
        """Resume from the run directory's checkpoint (``latest``, or the newest complete
        ``step_N`` when ``latest`` is missing: a run never silently restarts over complete
        checkpoints), unless ``--no-resume``. Rank 0 decides, every rank follows. Then the data
        streams start reading their first windows in the background."""
        point = self.checkpoints.resume_point()
        if point is None:
            if self.resume is True:
                raise FileNotFoundError(f"--resume: no complete checkpoint under {self.checkpoints.dir} "
                                        f"(no `latest` file pointing to an existing folder, no complete step_N)")
        elif self.resume is False:
            if self.rank == 0:
                print(f"WARNING {self.checkpoints.dir} has checkpoint {point[0]}; starting fresh (--no-resume): new "
                      f"checkpoints replace it, and train_log.jsonl / TensorBoard start over at step 0 (the old "
                      f"log lines move to train_log.discarded.jsonl)", flush=True)
        else:
            tag, note = point
            if note and self.rank == 0:
                print(note, flush=True)
            state = self.checkpoints.load(self.engine, tag, elastic=self.tcfg.elastic_resume)
            self.step = int(state["step"])
            if state.get("elastic_from"):
                self.resume_elastic(tag, int(state["elastic_from"]))
                mixture = (state.get("extra") or {}).get("mixture")
                if mixture and hasattr(getattr(self.pipeline, "mixture", None), "load_state_dict"):
                    self.pipeline.mixture.load_state_dict(mixture)
            else:
                self.pipeline.load_state_dict(state["pipeline"])
                set_rng_state(state["rng"])
            if state.get("balancer") is not None:
                self.balancer.load_state_dict(state["balancer"])
            if self.surgery is not None and state.get("surgery") is not None:
                self.surgery.load_state_dict(state["surgery"])
            self.consecutive_nonfinite = int((state.get("extra") or {}).get("consecutive_nonfinite", 0))
            meta_state = (state.get("extra") or {}).get("meta")
            if self.meta is not None and meta_state is not None:
                if state.get("elastic_from"):
                    if self.rank == 0:
                        print("WARNING elastic resume: the inner optimizer's state of meta-learning is per-rank "
                              "(partitions); it restarts from zero", flush=True)
                else:
                    self.meta.load_state_dict(meta_state)
            if self.rank == 0:
                print(f"resumed from {self.checkpoints.dir / tag} at step {self.step}", flush=True)
        if hasattr(self.pipeline, "start_prefetch"):
            self.pipeline.start_prefetch()

    def resume_elastic(self, tag: str, old_world: int) -> None:
        """After loading a checkpoint of ``old_world`` ranks into this world: new data streams
        (the per-rank stream positions do not map onto other ranks), reshuffled with a seed
        offset by the step so they do not replay the run's first batches, and new RNG seeds."""
        seed = self.cfg.data.seed + self.step
        if self._own_pipeline:
            cfg = copy.deepcopy(self.cfg)
            cfg.data.seed = seed
            self.pipeline.close()
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
