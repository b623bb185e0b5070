"""Experiment specs: typed YAML files that name a base training config and what to vary.

Read with the config tree's own checks (``megamt.config.build_section``): unknown keys and
wrong types are errors naming the dotted key, all reported together. Paths in a spec are
relative to the spec file. Every spec shares the launch fields (:class:`LaunchSpec`)::

    base: ../train.yaml            # the megamt training config every run starts from
    overrides: [train.max_steps=200, eval.max_examples=200]   # for every run (dotted, as on the CLI)
    launch: {launcher: deepspeed, num_gpus: 8, timeout_s: 0}
    slurm: {sbatch_args: [--partition=gpu, --nodes=1, --gpus-per-node=8, --time=04:00:00]}
    out: runs/my_experiment

``megamt experiment run`` adds ``runs:`` (named override lists) and/or ``grid:`` (dotted
key -> values, one run per combination); ``megamt experiment pairs`` adds ``tasks:`` and
``steps_per_task:``; ``megamt hpo`` adds ``hpo:`` (:class:`HpoSection`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from megamt.config import ConfigError, build_section, load_config, load_yaml

LAUNCHERS = ("deepspeed", "python", "inprocess")


@dataclass
class LaunchSpec:
    """How each run is started."""

    launcher: Literal["deepspeed", "python", "inprocess"] = "deepspeed"
    """deepspeed: ``deepspeed --num_gpus N --module megamt.experiments.worker RUN_DIR`` per run;
    python: one process per run (a world of one); inprocess: in the experiment's own process
    (tests). ``--slurm`` on the command line submits sbatch jobs instead."""
    num_gpus: int = 2
    """Ranks per run on this node (GPUs; CPU ranks on a machine without GPUs)."""
    timeout_s: int = 0
    """Kill a run (its whole process tree) after this many seconds; 0 = no limit. A killed
    run is recorded as failed; its checkpoints stay, so a re-run resumes it."""
    progress_every_s: float = 30.0
    """A progress line per running run at most this often (steps, loss, ETA)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every run (e.g. NCCL settings)."""

    def problems(self, key: str) -> list[str]:
        out = []
        if self.num_gpus < 1:
            out.append(f"{key}.num_gpus: must be >= 1, got {self.num_gpus}")
        if self.timeout_s < 0:
            out.append(f"{key}.timeout_s: must be >= 0")
        if self.progress_every_s <= 0:
            out.append(f"{key}.progress_every_s: must be > 0")
        return out


@dataclass
class SlurmSpec:
    """``--slurm``: every unfinished run becomes one task of a SLURM job array."""

    script: Optional[str] = None
    """The batch script each array task runs with the run's folder as its argument (relative
    to the spec); default: ``slurm/train.sbatch`` of this checkout, run with
    ``MEGAMT_MODULE=megamt.experiments.worker`` (signal forwarding, requeue and resume as for training)."""
    sbatch_args: list[str] = field(default_factory=list)
    """sbatch options for the array, e.g. ``[--partition=gpu, --nodes=2, --gpus-per-node=8, --time=04:00:00]``."""
    max_parallel: int = 0
    """At most this many array tasks at once (``--array=0-N%K``); 0 = SLURM's limit."""
    wait: bool = True
    """Block until the array finishes (``sbatch --wait``), then write the results table;
    false: submit and return (``megamt experiment run SPEC --collect`` writes the table later)."""


@dataclass
class NamedRun:
    """One entry of ``runs:``."""

    name: str = ""
    """Folder name under ``OUT/runs`` (default: made from the overrides)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides of this run (after the spec's common ones)."""


@dataclass
class ExperimentSpec:
    """``megamt experiment run``: a base config plus a list and/or a grid of overrides."""

    base: str = ""
    """The training config (YAML), relative to the spec file."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for every run."""
    runs: list[NamedRun] = field(default_factory=list)
    """Named override lists, one run each (times every grid point when ``grid`` is set too)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted key -> values: one run per combination (key order as written)."""
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    out: str = "experiment_out"
    """Output folder (relative to the spec file); ``--out`` wins."""


@dataclass
class PairsSpec:
    """``megamt experiment pairs``: every task alone and every pair of tasks, the same budget per task."""

    base: str = ""
    """The multitask training config (YAML), relative to the spec file."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for every run."""
    tasks: list[str] = field(default_factory=list)
    """The tasks to pair (default: every training task of base)."""
    steps_per_task: int = 50
    """Optimizer steps per task: single-task runs train this many, pairs twice as many."""
    affinity_every: int = 0
    """Also train one run on all the tasks that measures the TAG affinity every N steps
    (``gradients.affinity_every``), for steps_per_task * T steps, and compare it with the
    matrix (Spearman); with 2 tasks the pair run is that run. 0 = no affinity."""
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    out: str = "pairs_out"
    """Output folder (relative to the spec file); ``--out`` wins."""


@dataclass
class HpoParam:
    """One dimension of the search space (``hpo.space.<dotted.config.key>``)."""

    type: Literal["float", "int", "categorical"] = "float"
    low: Optional[float] = None
    """float / int: lower bound (inclusive)."""
    high: Optional[float] = None
    """float / int: upper bound (inclusive)."""
    log: bool = False
    """float / int: sample on a log scale."""
    step: Optional[float] = None
    """float / int: discretisation step (not with log)."""
    choices: list[Any] = field(default_factory=list)
    """categorical: the values (numbers, strings, booleans)."""

    def problems(self, key: str) -> list[str]:
        out = []
        if self.type == "categorical":
            if not self.choices:
                out.append(f"{key}.choices: a categorical parameter needs at least one choice")
            return out
        if self.low is None or self.high is None:
            out.append(f"{key}: a {self.type} parameter needs low and high")
            return out
        if self.low > self.high:
            out.append(f"{key}: low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            out.append(f"{key}.low: must be > 0 with log: true")
        if self.log and self.step is not None:
            out.append(f"{key}: step and log: true cannot be combined")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            out.append(f"{key}: an int parameter needs integer low/high")
        return out

    def values_to_check(self) -> list[Any]:
        """Values that must all make a valid config (the bounds, every choice)."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass
class HpoObjective:
    """What a trial is scored by, at every validation (for the pruner) and at the end."""

    metric: str = "primary"
    """primary (each task's primary metric: accuracy, SQuAD F1, entity F1, ROUGE-L; needs
    ``eval.during_training`` for the per-validation reports), loss (the per-task
    validation loss), or a metric name every chosen task reports (e.g. macro_f1)."""
    tasks: list[str] = field(default_factory=list)
    """Tasks it is computed over (default: every training task)."""
    reduce: Literal["mean", "worst"] = "mean"
    """mean over the tasks, or the worst task (min of a metric, max of a loss)."""
    direction: Optional[Literal["maximize", "minimize"]] = None
    """Default: minimize for loss, maximize for metrics."""

    def resolved_direction(self) -> str:
        return self.direction or ("minimize" if self.metric == "loss" else "maximize")


@dataclass
class HpoSection:
    """``hpo:`` of an HPO spec."""

    space: dict[str, HpoParam] = field(default_factory=dict)
    """Dotted config key -> its distribution, e.g. ``train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}``,
    ``gradients.method: {type: categorical, choices: [none, pcgrad]}``, ``model.lora.r: {type: int, low: 4, high: 64, log: true}``."""
    objective: HpoObjective = field(default_factory=HpoObjective)
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Optuna's MedianPruner, HyperbandPruner, or none. Reports come at every validation
    (``train.eval_every``); a pruned trial's run stops after that validation."""
    pruner_startup_trials: int = 2
    """median: trials that are never pruned (the median needs a history)."""
    pruner_warmup_steps: int = 0
    """median: no pruning at validations before this optimizer step."""
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    """Sampler seed."""
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    """Parameter sets to try first (``{dotted.key: value}``, a subset of the space), e.g. the current default."""

    def problems(self, key: str) -> list[str]:
        out = []
        if not self.space:
            out.append(f"{key}.space: empty search space")
        for k, p in self.space.items():
            out += p.problems(f"{key}.space.{k}")
        if self.pruner_startup_trials < 0 or self.pruner_warmup_steps < 0:
            out.append(f"{key}: pruner_startup_trials and pruner_warmup_steps must be >= 0")
        for i, params in enumerate(self.enqueue):
            for k in params:
                if k not in self.space:
                    out.append(f"{key}.enqueue.{i}.{k}: not a key of hpo.space")
        return out


@dataclass
class HpoSpec:
    """``megamt hpo``: the base config, the search space and objective, how trials launch."""

    base: str = ""
    """The training config (YAML), relative to the spec file."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for every trial (e.g. ``train.eval_every=20``: the pruner's report cadence)."""
    hpo: HpoSection = field(default_factory=HpoSection)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    out: str = "hpo_out"
    """Output folder (relative to the spec file): trials/, best.yaml, trials.csv/md, plots; ``--out`` wins."""


# --------------------------------------------------------------------------- loading


def load_spec(cls, path: str | Path, out: str | None = None):
    """Read and check a spec of type ``cls``; ``base`` and ``out`` become absolute paths.
    Raises :class:`ConfigError` naming every problem (the base config's included)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError([f"{path}: spec not found"])
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    problems: list[str] = []
    spec = build_section(cls, raw, "", problems)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    if not spec.base:
        problems.append(f"{path}: base (the training config) is required")
    elif not (path.parent / spec.base).is_file():
        problems.append(f"{path}: base: {path.parent / spec.base} not found")
    launch = getattr(spec, "launch", None)
    if launch is not None:
        problems += [f"{path}: {p}" for p in launch.problems("launch")]
    if isinstance(spec, HpoSpec):
        problems += [f"{path}: {p}" for p in spec.hpo.problems("hpo")]
    if isinstance(spec, PairsSpec) and spec.steps_per_task < 1:
        problems.append(f"{path}: steps_per_task must be >= 1")
    if isinstance(spec, ExperimentSpec):
        for k, values in spec.grid.items():
            if not values:
                problems.append(f"{path}: grid.{k}: needs at least one value")
    if problems:
        raise ConfigError(problems)
    spec.base = str((path.parent / spec.base).resolve())
    spec.out = str(Path(out).resolve() if out else (path.parent / spec.out).resolve())
    slurm = getattr(spec, "slurm", None)
    if slurm is not None and slurm.script:
        slurm.script = str((path.parent / slurm.script).resolve())
    spec.spec_path = str(path)
    return spec


def base_config(spec, extra: list[str] | None = None):
    """The base training config with the spec's overrides (and ``extra``), validated."""
    return load_config(spec.base, list(spec.overrides) + list(extra or []))


def override_text(key: str, value: Any) -> str:
    """``key=value`` with the value written so that the YAML parser of overrides reads it back."""
    import yaml

    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def grid_points(grid: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of the grid as a list of overrides (first key varies slowest)."""
    keys = list(grid)
    return [[override_text(k, v) for k, v in zip(keys, combo)] for combo in itertools.product(*(grid[k] for k in keys))]


def run_name(overrides: list[str]) -> str:
    """A folder name from overrides: the last part of each key and its value, ``lr=0.001_temperature=2``."""
    if not overrides:
        return "base"
    parts = []
    for o in overrides:
        key, _, value = o.partition("=")
        parts.append(f"{key.split('.')[-1]}={value}")
    return re.sub(r"[^A-Za-z0-9=._+-]+", "-", "_".join(parts))[:120]
