"""``megamt adapt MODEL_DIR SPEC --task NAME --shots K [K ...] [--steps S]``: few-shot adaptation curves.

Fine-tunes a trained model (or a fresh LoRA on it, ``--lora``) on K examples of one task of SPEC,
evaluates it after each of S steps on the task's evaluation split, and repeats over seeds (each
seed draws its own K examples). One step = one AdamW update on all K examples (full batch: the
K-shot set packed into rows, gradient accumulated over its micro-batches; the loss is the mean
over the K examples' loss terms), so the curve measures how fast the starting weights adapt, not
how the examples were batched. Writes ``OUT/adapt.json`` (metric per step for every K and seed,
mean and std over seeds) and ``OUT/adapt.png`` (metric vs steps per K; metric after S steps vs K).

MODEL_DIR: a folder written by ``megamt export`` / ``save_pretrained`` (its megamt config says
how it was built). SPEC: a task spec YAML (``tasks:`` with the task's ``train`` split for the
shots and an evaluation split); ``section.key=value`` overrides apply to it (e.g.
``eval.max_examples=200``). Python: ``model.adapt(spec_or_config, task=..., shots=[8, 32])``.

Runs in one process on the model's device (no DeepSpeed: K-shot sets are small; a model that
needs ZeRO-3 to fit is out of scope here).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from megamt.config import ConfigError, MultitaskConfig, load_config


class AdaptError(ValueError):
    """A bad adapt request (task, shots, steps, model folder); the message names the key."""


def adapt(model, spec: MultitaskConfig | str | Path, task: str, *, shots: Sequence[int] = (8,), steps: int = 10,
          seeds: Sequence[int] = (0, 1, 2), lr: float = 1e-4, lora: bool = False, split: str | None = None,
          max_examples: int | None = None, micro_batch_rows: int = 8, out_dir: str | Path | None = None,
          overrides: Sequence[str] = (), tokenizer=None, log=print) -> dict[str, Any]:
    """Adaptation curves of ``model`` (a MultitaskModel) on ``task`` of ``spec``; see the module docstring.

    Returns the report written to ``out_dir/adapt.json`` (when given): ``{"task", "metric",
    "curves": {K: {"steps", "mean", "std", "per_seed": {seed: [...]}}}, ...}``; step 0 is the
    model before adaptation (the same for every K and seed).
    """
    cfg = copy.deepcopy(spec) if isinstance(spec, MultitaskConfig) else load_config(spec, list(overrides))
    task_cfg, metric_names = check_request(cfg, task, shots, steps, seeds, lr)
    task_cfg.zero_shot = False  # trained now: evaluated with its own head, not another task's
    split = split or cfg.eval.split
    if split not in task_cfg.inputs:
        raise AdaptError(f"tasks.{task}.inputs: no {split!r} split to evaluate on (splits: {sorted(task_cfg.inputs)}); "
                         f"add one or pass --split")
    if "train" not in task_cfg.inputs:
        raise AdaptError(f"tasks.{task}.inputs: no 'train' split to draw the shots from")
    from megamt.data.formats import read_examples, resolve_labels

    labels = resolve_labels(task, task_cfg)
    pool = list(read_examples(task, task_cfg, "train", labels=labels))
    if max(shots) > len(pool):
        raise AdaptError(f"--shots {max(shots)}: task {task!r} has only {len(pool)} training examples "
                         f"({task_cfg.inputs['train'].path}); use at most {len(pool)} shots")
    base, fresh_heads = adaptation_model(model, cfg, lora, task=task)
    tok = tokenizer if tokenizer is not None else _tokenizer(model, cfg)
    max_examples = max_examples if max_examples is not None else cfg.eval.max_examples

    def score(m) -> float:
        from megamt.eval.api import evaluate

        res = evaluate(m, [task], config=cfg, tokenizer=tok, split=split, max_examples=max_examples, progress=False)
        metrics = res["tasks"][task]["metrics"]
        return float(metrics[next(n for n in metric_names if n in metrics)])

    t0 = time.time()
    start = score(base)
    curves: dict[str, Any] = {}
    for k in shots:
        per_seed = {}
        for seed in seeds:
            rng = random.Random(f"adapt:{task}:{seed}")
            chosen = rng.sample(pool, k)
            batches = shot_batches(chosen, cfg, task, tok, labels, micro_batch_rows)
            m = copy.deepcopy(base)
            values = [start]
            for _ in fine_tune(m, batches, steps, lr, cfg.tasks, task):
                values.append(score(m))
            per_seed[str(seed)] = values
            log(f"adapt {task} K={k} seed={seed}: " + " ".join(f"{v:.1f}" for v in values))
        rows = list(zip(*per_seed.values()))
        curves[str(k)] = {"steps": list(range(steps + 1)), "per_seed": per_seed,
                          "mean": [statistics.fmean(r) for r in rows],
                          "std": [statistics.pstdev(r) if len(r) > 1 else 0.0 for r in rows]}
    report = {"task": task, "task_type": task_cfg.task_type, "metric": metric_names[0], "split": split,
              "shots": list(shots), "steps": steps, "seeds": list(seeds), "lr": lr, "lora": lora,
              "max_examples": max_examples, "train_pool": len(pool),
              "fresh_heads": fresh_heads, "seconds": round(time.time() - t0, 1),
              "curves": curves}
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def check_request(cfg: MultitaskConfig, task: str, shots: Sequence[int], steps: int, seeds: Sequence[int],
                  lr: float) -> tuple[Any, tuple[str, ...]]:
    """Every problem of an adapt request, raised together; returns (task config, its metric names)."""
    from megamt.eval.metrics import METRICS_BY_TYPE

    problems = []
    task_cfg = cfg.tasks.get(task)
    metric_names: tuple[str, ...] = ()
    if task_cfg is None:
        problems.append(f"--task {task}: not a task of the spec (tasks: {list(cfg.tasks)})")
    else:
        metric_names = METRICS_BY_TYPE.get(task_cfg.task_type, ())
        if not metric_names:
            problems.append(f"tasks.{task}.task_type={task_cfg.task_type}: this task type has no evaluation "
                            f"(types with metrics: {sorted(METRICS_BY_TYPE)}), so there is no curve to draw")
    if not shots or any(k < 1 for k in shots):
        problems.append(f"--shots {list(shots)}: give one or more numbers >= 1")
    if steps < 1:
        problems.append(f"--steps {steps}: must be >= 1")
    if not seeds:
        problems.append("--seeds: give at least one seed")
    if not (lr > 0 and math.isfinite(lr)):
        problems.append(f"--lr {lr}: must be a finite number > 0")
    if problems:
        raise AdaptError("; ".join(problems))
    return task_cfg, metric_names


def adaptation_model(model, cfg: MultitaskConfig, lora: bool, task: str | None = None) -> tuple[Any, list[str]]:
    """A plain (unpartitioned) MultitaskModel for ``cfg``'s tasks with ``model``'s weights: the backbone
    and the heads of tasks both know; a task new to the model gets a fresh head. ``lora``: a fresh
    LoRA adapter (``model.lora`` settings of ``cfg``) on top, the rest frozen. Returns the model
    and the tasks whose head is new. ``task``: the task adaptation trains, so its head -- new or
    not -- counts as trained for evaluation (at step 0 a new head is its random initialisation:
    the chance-level start of the curve)."""
    from megamt.model import MultitaskModel

    new_cfg = copy.deepcopy(cfg)
    new_cfg.model = copy.deepcopy(model.config.model)
    new_cfg.model.lora.enabled = False
    new_cfg.model.gradient_checkpointing = False
    new = MultitaskModel(new_cfg)
    source = model.state_dict()
    target = new.state_dict()
    shared = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k not in shared]
    new.load_state_dict(shared, strict=False)
    fresh = sorted({k.split(".")[2] for k in missing if k.startswith("backbone.heads.")})
    backbone_missing = [k for k in missing if not k.startswith("backbone.heads.")]
    if backbone_missing:
        raise AdaptError(f"the model's weights do not fit the spec's model ({len(backbone_missing)} backbone tensors "
                         f"missing, e.g. {backbone_missing[0]}); adapt a model folder written by megamt export")
    if task is not None and hasattr(new.backbone, "untrained_heads"):  # encoders (megamt.heads)
        new.backbone.untrained_heads = [h for h in new.backbone.untrained_heads if h != task]
    if lora:
        from megamt.adapters import apply_lora

        lcfg = copy.deepcopy(cfg.model.lora)
        lcfg.enabled = True
        new.backbone = apply_lora(new.backbone, lcfg)
    new.to(next(model.parameters()).device)
    return new, fresh


def shot_batches(examples: list, cfg: MultitaskConfig, task: str, tok, labels, rows: int) -> list[dict[str, Any]]:
    """The K examples rendered, tokenized and packed (data.seq_len rows, ``rows`` per micro-batch)."""
    from megamt.data.packing import Packer, causal_item, collate_rows, encoder_item
    from megamt.data.pipeline import resolve_objective
    from megamt.data.templates import example_rng, render
    from megamt.data.tokenize import encode_examples

    task_cfg = cfg.tasks[task]
    objective = resolve_objective(cfg)
    rendered = []
    for ex in examples:
        prompt, target, template = render(ex, task_cfg, example_rng(cfg.data.seed, ex), labels)
        rendered.append((ex, prompt, target, template))
    samples = encode_examples(rendered, tok, labels)
    bad = [s for s in samples if not isinstance(s, dict)]
    if bad:
        raise AdaptError(f"task {task!r}: {len(bad)} of the shots cannot be encoded, e.g. {bad[0]}")
    make = encoder_item if objective == "encoder" else causal_item
    task_id = list(cfg.tasks).index(task)
    packer = Packer(cfg.data.seq_len, buffer_size=len(samples) + 1, overlong=cfg.data.overlong,
                    qa_doc_stride=cfg.data.doc_stride())
    for s in samples:
        packer.add(make({k.split(".")[0]: v for k, v in s.items()}, task_id))
    packed = []
    while len(packer):
        packed.append(packer.pop_row())
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return [collate_rows(packed[i:i + rows], cfg.data.seq_len, pad, objective) for i in range(0, len(packed), rows)]


def fine_tune(model, batches: list[dict[str, Any]], steps: int, lr: float, tasks, task: str):
    """Full-batch AdamW steps on the shots; yields after each step (the caller evaluates)."""
    from megamt.heads import count_loss_terms
    from megamt.losses import count_targets

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    T = len(tasks)
    k = list(tasks).index(task)
    count = sum(float((count_loss_terms(b, T) if model.family == "encoder" else
                       count_targets(b["labels"], b["task_ids"], T))[k]) for b in batches)
    if count == 0:
        raise AdaptError(f"task {task!r}: the shots have no loss term (all cut by data.seq_len?)")
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for b in batches:
            b = {key: v.to(device) if torch.is_tensor(v) else v for key, v in b.items()}
            (model(b).loss_sum[k] / count).backward()
        opt.step()
        yield


def _tokenizer(model, cfg: MultitaskConfig):
    from megamt.data.tokenize import load_tokenizer

    for where in (cfg.data.tokenizer, model.config.data.tokenizer, model.config.model.name_or_path):
        if where and Path(where).is_dir() and any(Path(where).glob("tokenizer*")):
            return load_tokenizer(where)
    raise AdaptError("no tokenizer: set data.tokenizer in the spec (or export the model with its tokenizer)")


def write_report(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapt.json").write_text(json.dumps(report, indent=1))
    return [out / "adapt.json", plot_curves(report, out / "adapt.png")]


def plot_curves(report: dict, path: Path) -> Path:
    """Metric vs steps (one line per K, band = ±1 std over seeds) and metric after the last step vs K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    ks = [int(k) for k in report["curves"]]
    for k in ks:
        c = report["curves"][str(k)]
        lo = [m - s for m, s in zip(c["mean"], c["std"])]
        hi = [m + s for m, s in zip(c["mean"], c["std"])]
        a.plot(c["steps"], c["mean"], marker="o", label=f"K={k}")
        a.fill_between(c["steps"], lo, hi, alpha=0.2)
    a.set_xlabel("adaptation steps")
    a.set_ylabel(report["metric"])
    a.set_title(f"{report['task']}: {report['metric']} vs steps")
    a.legend()
    final = [report["curves"][str(k)]["mean"][-1] for k in ks]
    err = [report["curves"][str(k)]["std"][-1] for k in ks]
    b.errorbar(ks, final, yerr=err, marker="o", capsize=3)
    b.set_xscale("log", base=2)
    b.set_xlabel("shots K")
    b.set_title(f"after {report['steps']} steps (mean ± std, {len(report['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megamt adapt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a folder written by megamt export / save_pretrained")
    p.add_argument("spec", help="task spec YAML with the task to adapt to (train split = the shots' pool)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the spec, e.g. eval.max_examples=200")
    p.add_argument("--task", required=True, help="the task of SPEC to adapt to")
    p.add_argument("--shots", type=int, nargs="+", default=[8], help="K: examples per adaptation (several: a curve)")
    p.add_argument("--steps", type=int, default=10, help="S: optimizer steps, evaluated after each")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one draw of the K examples per seed")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora", action="store_true", help="train a fresh LoRA adapter (model.lora.*) instead of all weights")
    p.add_argument("--split", default=None, help="evaluation split (default eval.split)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluation examples (default eval.max_examples)")
    p.add_argument("--out", default=None, help="output folder (default MODEL_DIR/adapt/<task>)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from megamt.model import MultitaskModel

    try:
        cfg = load_config(args.spec, args.overrides)
        check_request(cfg, args.task, args.shots, args.steps, args.seeds, args.lr)
        if not (Path(args.model_dir) / "config.json").is_file():
            raise AdaptError(f"{args.model_dir}: not a model folder (no config.json); export a run with "
                             f"`megamt export RUN_DIR OUT` first")
        model = MultitaskModel.from_pretrained(args.model_dir)
        out = Path(args.out) if args.out else Path(args.model_dir) / "adapt" / args.task
        report = adapt(model, cfg, args.task, shots=args.shots, steps=args.steps, seeds=args.seeds, lr=args.lr,
                       lora=args.lora, split=args.split, max_examples=args.max_examples, out_dir=out)
    except (AdaptError, ConfigError) as e:
        print(f"megamt adapt: {e}", file=sys.stderr)
        return 2
    last = {k: f"{c['mean'][-1]:.2f} ± {c['std'][-1]:.2f}" for k, c in report["curves"].items()}
    print(f"adapt {args.task} ({report['metric']} after {args.steps} steps, by K): {last}; wrote {out}/adapt.json, "
          f"{out}/adapt.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
