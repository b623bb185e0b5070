"""DeepSpeed configs: templates with "auto", filled from megamt's config in one function.

The templates in ``ds_configs/`` (package ``megamt.ds_configs``) write *engine choices*
literally (ZeRO stage, offload, overlap_comm ...). Everything megamt's config already
knows (batch sizes, accumulation, clipping, optimizer and scheduler values, precision,
bucket sizes) is ``"auto"`` and filled by :func:`resolve_ds_config`. A value written
literally that disagrees with megamt's config is not silently overridden: all such
mismatches are collected and raised together (the transformers integration's rule), so
that nothing is configured twice with two answers.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
from pathlib import Path
from typing import Any

import torch

from megamt.config import MultitaskConfig

TEMPLATES = ("zero3", "zero3_offload", "zero2", "zero2_offload")
AUTO = "auto"

# megamt's lr_schedule -> DeepSpeed scheduler type
SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


class DsConfigError(ValueError):
    """ds_config problems (mismatches with megamt's config, unfilled "auto"), all at once."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"ds_config {source} disagrees with megamt's config (change one of them; "
                         f"or write \"auto\" in the ds_config to take megamt's value):\n  - "
                         + "\n  - ".join(self.problems))


def load_template(name_or_path: str) -> tuple[dict, str]:
    """A template by name (zero3, zero3_offload, zero2, zero2_offload) or a JSON path -> (dict, source name)."""
    if name_or_path in TEMPLATES:
        res = importlib.resources.files("megamt.ds_configs").joinpath(f"{name_or_path}.json")
        return json.loads(res.read_text()), f"{name_or_path}.json"
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"train.ds_config: {name_or_path!r} is neither a template {TEMPLATES} "
                                f"nor an existing JSON file")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise DsConfigError(str(path), [f"not valid JSON: {e}"]) from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _Filler:
    """Fills one node's "auto" values and records disagreements with megamt's values."""

    def __init__(self, ds: dict):
        self.ds = ds
        self.problems: list[str] = []

    def fill(self, dotted: str, value: Any, source: str, *, create: bool = False) -> None:
        *parents, key = dotted.split(".")
        node = self.ds
        for p in parents:
            if not isinstance(node.get(p), dict):
                if not create:
                    return
                node[p] = {}
            node = node[p]
        if key not in node:
            if create:
                node[key] = value
            return
        have = node[key]
        if have == AUTO:
            node[key] = value
        elif not _same(have, value):
            self.problems.append(f"{dotted} = {have!r} in the ds_config, but {source} gives {value!r}")


def hidden_size_of(hf_config) -> int | None:
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    return None


def resolve_ds_config(template: dict, cfg: MultitaskConfig, world_size: int, *, grad_accum: int | None = None,
                      hidden_size: int | None = None, dtype: str = "fp32", source: str = "ds_config") -> dict:
    """Fill every "auto" of ``template`` from ``cfg``; raise :class:`DsConfigError` listing
    every literal value that disagrees with megamt's config and every "auto" left unfilled.

    ``grad_accum``: micro-batches per optimizer step (default ``train.grad_accum``; gradient
    methods pass one per task). ``dtype``: the resolved model dtype (fp32 | bf16 | fp16).
    """
    t = cfg.train
    gas = int(grad_accum if grad_accum is not None else t.grad_accum)
    ds = copy.deepcopy(template)
    f = _Filler(ds)
    f.fill("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", create=True)
    f.fill("gradient_accumulation_steps", gas, "train.grad_accum" if grad_accum is None else
           "the gradient method (one micro-batch per task)", create=True)
    f.fill("train_batch_size", t.micro_batch_size * gas * world_size,
           f"train.micro_batch_size * accumulation * world_size ({t.micro_batch_size}*{gas}*{world_size})", create=True)
    f.fill("gradient_clipping", t.grad_clip, "train.grad_clip", create=True)
    f.fill("bf16.enabled", dtype == "bf16", f"model.dtype (resolved: {dtype})")
    f.fill("fp16.enabled", dtype == "fp16", f"model.dtype (resolved: {dtype})")
    if dtype == "bf16" and "bf16" not in ds:
        ds["bf16"] = {"enabled": True}
    # Gradients are reduced (ZeRO-3: reduce-scattered) in this dtype, then accumulated in the
    # model's: DeepSpeed 0.19's ZeRO-3 (__avg_scatter_grads) and ZeRO-1/2 read the engine's
    # communication_data_type, which defaults to the model dtype. bf16 sums over hundreds of
    # ranks keep 8 bits of mantissa; fp32 costs twice the gradient traffic.
    f.fill("communication_data_type", "fp32" if t.grad_comm_dtype == "fp32" else dtype,
           f"train.grad_comm_dtype={t.grad_comm_dtype} (model dtype {dtype})", create=True)

    if dtype == "bf16" and zero_stage(ds) == 3 and surgery_measures(cfg):
        # ZeRO-3 accumulates the micro-batches' gradient partitions in the model dtype unless
        # told otherwise, and gradient surgery reads each task's gradient as a difference of
        # those running sums: in bf16 a task 100x smaller than the sum loses ~17 % of itself.
        # fp32 accumulation (DeepSpeed 0.19.8: stage3's grad_partitions_flat_buffer dtype)
        # keeps the differences exact to fp32; it costs 2 more bytes per local gradient element.
        f.fill("data_types.grad_accum_dtype", "fp32",
               "gradient surgery under ZeRO-3 in bf16 (gradients.method / gradients.monitor_every)", create=True)

    if "optimizer" in ds:
        f.fill("optimizer.type", "AdamW", "megamt's default optimizer")
        opt_params = ds["optimizer"].setdefault("params", {})
        if opt_params == AUTO:
            ds["optimizer"]["params"] = opt_params = {"lr": AUTO, "betas": AUTO, "eps": 1e-8, "weight_decay": AUTO}
        f.fill("optimizer.params.lr", t.lr, "train.lr", create=True)
        f.fill("optimizer.params.betas", list(t.betas), "train.betas", create=True)
        f.fill("optimizer.params.weight_decay", t.weight_decay, "train.weight_decay", create=True)
        zero_cfg = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
        if not torch.cuda.is_available() and "offload_optimizer" not in zero_cfg:
            # CPU ranks: torch's AdamW instead of DeepSpeed's JIT-compiled fused op (minutes of
            # C++ build on every fresh environment, no speed-up at these sizes); a literal
            # `torch_adam` in the template wins
            opt_params.setdefault("torch_adam", True)

    if "scheduler" in ds:
        f.fill("scheduler.type", SCHEDULERS[t.lr_schedule], f"train.lr_schedule={t.lr_schedule}")
        kind = ds["scheduler"]["type"]
        if ds["scheduler"].get("params", AUTO) == AUTO:
            ds["scheduler"]["params"] = {}
        # DeepSpeed's schedulers need >= 1 warm-up step (they use max(2, n) internally).
        warmup = max(1, t.warmup_steps)
        sched = {"warmup_num_steps": (warmup, "train.warmup_steps")}
        if kind == "WarmupCosineLR":
            sched.update(total_num_steps=(t.max_steps, "train.max_steps"), warmup_min_ratio=(0.0, "megamt (warm-up from 0)"),
                         cos_min_ratio=(t.min_lr_ratio, "train.min_lr_ratio"), warmup_type=("linear", "megamt"))
        elif kind == "WarmupDecayLR":
            sched.update(total_num_steps=(t.max_steps, "train.max_steps"), warmup_min_lr=(0.0, "megamt"),
                         warmup_max_lr=(t.lr, "train.lr"), warmup_type=("linear", "megamt"))
        elif kind == "WarmupLR":
            sched.update(warmup_min_lr=(0.0, "megamt"), warmup_max_lr=(t.lr, "train.lr"), warmup_type=("linear", "megamt"))
        for key, (value, src) in sched.items():
            f.fill(f"scheduler.params.{key}", value, src, create=True)

    h = hidden_size or 0
    zero = ds.get("zero_optimization", {})
    if isinstance(zero, dict):
        # the transformers integration's sizing: buckets ~ hidden^2, persistence ~ 10 * hidden
        big = h * h if h else int(5e8)
        f.fill("zero_optimization.reduce_bucket_size", big, f"hidden_size^2 ({h}^2)")
        f.fill("zero_optimization.allgather_bucket_size", big, f"hidden_size^2 ({h}^2)")
        f.fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * big), f"0.9 * hidden_size^2 ({h})")
        f.fill("zero_optimization.stage3_param_persistence_threshold", 10 * h if h else int(1e5),
               f"10 * hidden_size ({h})")

    for path in _find_auto(ds):
        f.problems.append(f"{path} = \"auto\" but megamt has no value for it: write it literally")
    if f.problems:
        raise DsConfigError(source, f.problems)
    return ds


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if node == AUTO:
        return [prefix]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{prefix}.{k}" if prefix else k)]
    return []


def surgery_measures(cfg: MultitaskConfig) -> bool:
    """Whether the run measures per-task gradients (megamt.gradients.GradientSurgery) on some steps."""
    return cfg.gradients.method != "none" or bool(cfg.gradients.monitor_every)


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


DEEPSPEED_PREFETCH_BUCKET = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size


def eval_zero_limits(ds: dict, max_live: int = 0) -> dict[str, int]:
    """ZeRO-3's limits for evaluation (``eval.max_live_parameters`` = ``max_live``): 0 ->
    ``stage3_max_live_parameters`` = two prefetch buckets (the module running plus the next one
    being fetched) and ``stage3_max_reuse_distance`` = 0; N > 0 -> N and 0; -1 -> ``{}`` (the
    ds_config's own limits).

    Training templates (and DeepSpeed's defaults) allow 1e9 of both. In evaluation's
    forward-only passes (scores, token-by-token generation) that lets prefetched parameters
    pile up, and -- with the training engine, whose recorded trace continues into a backward
    pass that evaluation never runs -- keeps every parameter gathered until the next training
    step. Measured on a 110M-parameter model after a training step: 100 % gathered at once per
    rank during evaluation (61 % for `megamt eval`'s engine), against 22 % (its largest single
    parameter, the tied embedding) with the bound (BENCHMARKS.md, "Evaluation memory"); at 70B
    the difference is the whole model per GPU."""
    if max_live < 0:
        return {}
    zero = ds.get("zero_optimization") or {}

    def number(key: str, default: float) -> int:
        v = zero.get(key, default)
        return int(float(v)) if not isinstance(v, str) else int(default)  # "auto": not resolved

    bound = max_live or 2 * number("stage3_prefetch_bucket_size", DEEPSPEED_PREFETCH_BUCKET)
    return {"stage3_max_live_parameters": max(1, min(number("stage3_max_live_parameters", 1e9), bound)),
            "stage3_max_reuse_distance": 0}


def build_ds_config(cfg: MultitaskConfig, world_size: int, *, grad_accum: int | None = None,
                    hidden_size: int | None = None, dtype: str = "fp32") -> dict:
    """Load ``train.ds_config`` and resolve it (the one entry the trainer calls)."""
    template, source = load_template(cfg.train.ds_config)
    return resolve_ds_config(template, cfg, world_size, grad_accum=grad_accum, hidden_size=hidden_size,
                             dtype=dtype, source=source)
