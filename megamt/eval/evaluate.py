"""``megamt eval MODEL SPEC [key=value ...]``: per-task metrics of a trained model.

MODEL: a folder written by ``megamt export`` / ``save_pretrained`` (Hugging Face files +
``megamt_config.yaml``), a run directory or a checkpoint folder.

SPEC is either of two YAML files:

1. The training spec, as is (``megamt demo-corpus`` writes one; the one you trained with):
   every task with an input for the split (``eval.split``, default validation) is
   evaluated on that input; the ``eval:`` section sets the rest (``eval.max_examples``,
   ``eval.max_new_tokens``, ``eval.batch_size``, ``eval.all_templates``, ``eval.tasks``,
   ``eval.metrics``; see ``megamt config reference``) and ``data.on_error`` the bad-input
   policy. Dotted overrides after the spec work as for training:
   ``megamt eval runs/hf spec.yaml eval.max_examples=100 eval.split=test``.

2. An eval spec (every key optional)::

    split: validation          # default split of every task
    max_examples: 200          # per task, the first ones
    max_new_tokens: 64         # bound on greedy generation
    batch_size: 8
    all_templates: false       # causal LMs: every fitting prompt template, mean ± std (--all-templates)
    on_error: raise            # bad examples (e.g. a label outside the task's labels): raise | skip
    tokenizer: path/to/tok     # default: the one saved with the model, else data.tokenizer
    supervised: sup/eval.json  # zero-shot tasks get the supervised score and the ratio
    tasks:                     # default: every task of the model's config with the split
      sst2: {metrics: [accuracy], template: cls_question}
      boolq_new:               # a task held out of training: a full task definition
        task_type: classification
        zero_shot: true
        inputs: {validation: {path: data/boolq.jsonl}}
        labels: ["no", "yes"]
        instruction: "Answer the question about the passage with yes or no."

   Its overrides are its own keys: ``max_examples=50 tasks.sst2.metrics=[accuracy]``.

An example is checked as ``megamt build-shards`` checks it: a label outside the task's
label set is an error naming file and line, or (``--on-error skip``) a counted skip,
reported per task (``skipped`` in eval.json). An encoder model evaluates a held-out
classification task with the trained head whose label set is the same (a new entailment
set on the NLI head).

Relative paths are resolved against the spec's folder. One process: the whole model on
the GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU. Several ranks: launch with
``torchrun --nproc_per_node N -m megamt.eval.evaluate ...`` (or the deepspeed launcher);
the model is built partitioned by ZeRO-3 (``zero.Init`` through transformers'
``HfDeepSpeedConfig``, then an optimizer-free DeepSpeed engine on each rank's device, with
the ZeRO settings of ``train.ds_config``), so no rank holds a full copy: every forward
gathers module by module (ZeRO-3 keeps what it will reuse soon, up to
``stage3_max_live_parameters``). Each rank predicts its share of the examples, the ranks in
lockstep; rank 0 writes ``OUT/eval.json``, ``OUT/eval.md`` and
``OUT/predictions/<task>.jsonl``. A run directory or checkpoint folder is read by rank 0
(DeepSpeed's fp32 gather of the ZeRO partitions, one copy on that rank's CPU) and copied
into the partitions parameter by parameter; an exported folder is read by every rank for
its own partitions only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

SPEC_KEYS = {"split", "max_examples", "max_new_tokens", "batch_size", "tokenizer", "supervised", "tasks",
             "all_templates", "on_error"}
# Sections that only a training spec (a megamt config) has; `tasks` is in both kinds.
TRAINING_SPEC_SECTIONS = {"model", "data", "mixture", "train", "gradients", "eval"}


def is_training_spec(raw: dict) -> bool:
    from megamt.config import ALIASES

    return bool(set(raw) & (TRAINING_SPEC_SECTIONS | set(ALIASES)))


def load_eval_spec(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The evaluation request of a spec file (either kind; see the module docstring) as
    the eval-spec mapping: unknown keys refused, relative paths resolved."""
    from megamt.config import apply_overrides, load_yaml
    from megamt.eval.api import EvalError

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: spec not found (the training spec, or an eval spec; see `megamt eval --help`)")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise EvalError(f"{path}: the top level of a spec must be a mapping")
    if is_training_spec(raw):
        return spec_from_training_config(path, overrides)
    raw = apply_overrides(raw, [o.removeprefix("eval.") for o in overrides or []])
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise EvalError(f"{path}: unknown eval spec key(s) {unknown}; known keys: {sorted(SPEC_KEYS)} (or give "
                        f"the training spec itself: a megamt config with tasks/model/data/... sections)")
    tasks = raw.get("tasks") or {}
    if isinstance(tasks, list):
        tasks = {name: {} for name in tasks}
    if not isinstance(tasks, dict):
        raise EvalError(f"{path}: tasks must be a mapping (name -> options) or a list of names")
    for name, entry in tasks.items():
        if entry is not None and not isinstance(entry, dict):
            raise EvalError(f"{path}: tasks.{name} must be a mapping, got {entry!r}")
        for inp in ((entry or {}).get("inputs") or {}).values():
            if isinstance(inp, dict) and isinstance(inp.get("path"), str) and inp.get("format") != "hf":
                p = Path(inp["path"])
                if not p.is_absolute():
                    inp["path"] = str((path.parent / p).resolve())
    raw["tasks"] = tasks or None
    for key in ("tokenizer", "supervised"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            raw[key] = str((path.parent / raw[key]).resolve())
    if raw.get("on_error") not in (None, "raise", "skip"):
        raise EvalError(f"{path}: on_error must be raise or skip, got {raw['on_error']!r}")
    return raw


def spec_from_training_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A training spec (a megamt config, validated with its overrides) as an eval request:
    its tasks with their own inputs (every task with the split, or ``eval.tasks``), the
    ``eval`` section's settings and ``data.on_error``."""
    from megamt.config import load_config

    cfg = load_config(path, overrides)
    ecfg = cfg.eval
    names = list(ecfg.tasks) or [n for n, t in cfg.tasks.items() if ecfg.split in t.inputs]
    tasks = {}
    for name in names:
        entry = dataclasses.asdict(cfg.tasks[name])
        if name in ecfg.metrics:
            entry["metrics"] = list(ecfg.metrics[name])
        tasks[name] = entry
    return {"tasks": tasks or None, "split": ecfg.split, "max_examples": ecfg.max_examples,
            "max_new_tokens": ecfg.max_new_tokens, "batch_size": ecfg.batch_size,
            "all_templates": ecfg.all_templates, "on_error": cfg.data.on_error}


def load_model_and_tokenizer(model_dir: str | Path, tokenizer: str | None = None, *, partitioned: bool = False):
    """The model and the tokenizer it was trained with, checked against each other.

    ``partitioned``: built under ZeRO-3 across the ranks (:func:`load_partitioned_model`;
    collective), else the whole model on this process's device."""
    from megamt.data.tokenize import load_tokenizer, vocab_hash
    from megamt.eval.api import EvalError, check_tokenizer_matches
    from megamt.model import MultitaskModel

    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise EvalError(f"{model_dir}: no such checkpoint or model folder")
    if partitioned:
        model = load_partitioned_model(model_dir)
    else:
        model = MultitaskModel.from_pretrained(model_dir).to(_local_device())
    saved = model_dir if (model_dir / "tokenizer.json").is_file() else None
    cfg_tok = model.config.data.tokenizer or None
    tok_path = tokenizer or (str(saved) if saved else cfg_tok)
    if not tok_path:
        raise EvalError(f"{model_dir}: no tokenizer saved with the model and none given (eval spec `tokenizer:`)")
    tok = load_tokenizer(tok_path)
    if saved is not None and tokenizer is not None:
        have, want = vocab_hash(tok), vocab_hash(load_tokenizer(saved))
        if have != want:
            raise EvalError(f"{tokenizer}: this tokenizer (vocab hash {have[:12]}…) is not the one saved with the "
                            f"checkpoint {model_dir} ({want[:12]}…): the checkpoint was trained with another "
                            f"tokenizer; drop `tokenizer:` from the eval spec to use the saved one")
    check_tokenizer_matches(tok, model, where=str(model_dir), manifest_dir=model.config.data.shards_dir)
    return model, tok


def _local_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def inference_ds_config(cfg) -> dict:
    """The DeepSpeed config of an evaluation engine: ``train.ds_config`` resolved as for
    training (precision, bucket and persistence sizes, parameter offload), ZeRO stage 3,
    without optimizer, scheduler or optimizer offload (transformers does the same for
    ``deepspeed_init(inference=True)``), and at most two prefetch buckets of parameters
    gathered at once and no reuse distance (``eval.max_live_parameters``,
    :func:`megamt.ds_config.eval_zero_limits`)."""
    from megamt import comm
    from megamt.ds_config import build_ds_config, eval_zero_limits, hidden_size_of
    from megamt.model import hf_config, resolve_dtype

    import torch

    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype(cfg.model)]
    ds = build_ds_config(cfg, comm.world_size(), hidden_size=hidden_size_of(hf_config(cfg.model)), dtype=dtype)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    zero.update(eval_zero_limits(ds, cfg.eval.max_live_parameters))
    return ds


def load_partitioned_model(model_dir: str | Path):
    """A MultitaskModel partitioned by ZeRO-3 over the ranks, wrapped by an optimizer-free
    DeepSpeed engine whose hooks gather each module's parameters when it runs (the engine
    stays reachable as ``model.eval_engine``), on the rank's device. Collective."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from megamt.checkpoint import find_checkpoint
    from megamt.config import load_config
    from megamt.eval.api import EvalError
    from megamt.model import CONFIG_FILE, MultitaskModel, _load_saved_config

    model_dir = Path(model_dir)
    checkpoint = None
    if (model_dir / "config.json").is_file():
        cfg = _load_saved_config(model_dir)
        cfg.model.name_or_path, cfg.model.from_config = str(model_dir), {}
    else:
        root, tag = find_checkpoint(model_dir)
        if root is None or not (root / tag / CONFIG_FILE).is_file():
            raise EvalError(f"{model_dir}: neither an exported model folder (config.json) nor a megamt "
                            f"checkpoint (a run directory, its checkpoints/ folder or a step_* folder)")
        cfg, checkpoint = load_config(root / tag / CONFIG_FILE), (root, tag)
    ds = inference_ds_config(cfg)
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 -- alive while transformers builds the backbone (zero.Init)
    try:
        model = MultitaskModel(cfg)
    finally:
        unset_hf_deepspeed_config()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    if checkpoint is not None:
        load_checkpoint_partitioned(engine.module, *checkpoint)
    # the engine owns the ZeRO-3 hooks: keep it alive with the module (outside nn.Module's
    # registry -- the engine is a Module holding this module)
    engine.module.__dict__["eval_engine"] = engine
    return engine.module.eval()


def load_checkpoint_partitioned(module, root: Path, tag: str) -> None:
    """Copy a megamt checkpoint's weights into ``module``'s ZeRO-3 partitions: rank 0 reads the
    fp32 state dict (``megamt.export.gather_fp32_state_dict``) and writes each parameter while
    it is gathered (``GatheredParameters(modifier_rank=0)``); the other ranks hold no copy."""
    import deepspeed

    from megamt import comm
    from megamt.export import gather_fp32_state_dict
    from megamt.model import _is_tied

    params = list(module.named_parameters())
    state = gather_fp32_state_dict(root, tag) if comm.rank() == 0 else {}
    missing = [n for n, _ in params if n not in state and not _is_tied(module, n)] if comm.rank() == 0 else []
    missing = comm.broadcast_object(missing)
    if missing:
        raise RuntimeError(f"{root / tag}: checkpoint weights do not match the model built from its config "
                           f"(missing: {missing[:5]})")
    for name, p in params:  # a tied weight is one parameter: written once, under its first name
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if comm.rank() == 0 and name in state:
                p.data.copy_(state[name].to(p.dtype))


def _init_distributed() -> bool:
    """Join the launcher's process group (several ranks); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch

    if torch.distributed.is_initialized():
        return False
    from megamt.trainer import setup_distributed

    setup_distributed(timeout_s=1800)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megamt eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="exported HF folder, run directory or checkpoint folder")
    ap.add_argument("spec", help="the training spec (a megamt config), or an eval spec: see above")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the spec, e.g. eval.max_examples=100")
    ap.add_argument("--out", default=None, help="output folder (default: MODEL/eval)")
    ap.add_argument("--split", default=None, help="the split to evaluate (default: the spec's, else validation)")
    ap.add_argument("--max-examples", type=int, default=None, help="per task, the first ones")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="bound on greedy generation")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--all-templates", action="store_true",
                    help="causal LMs: score every fitting prompt template; report each and mean ± std")
    ap.add_argument("--on-error", choices=["raise", "skip"], default=None,
                    help="bad examples (a label outside the task's label set ...): raise (default) or skip and "
                         "count them, as build-shards")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from megamt.config import ConfigError
    from megamt.data.errors import DataError
    from megamt.eval.api import EvalError, evaluate
    from megamt.eval.metrics import MetricError
    from megamt.heads import HeadConfigError
    from megamt.outputs import OutputDirError, ensure_writable

    owned = False
    try:
        spec = load_eval_spec(args.spec, args.overrides + ([f"eval.split={args.split}"] if args.split else []))
        out = Path(args.out) if args.out else Path(args.model) / "eval"
        if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the results
            ensure_writable(out, "--out", "Choose a writable output folder with --out DIR")
        owned = _init_distributed()
        from megamt import comm

        model, tok = load_model_and_tokenizer(args.model, spec.get("tokenizer"), partitioned=comm.world_size() > 1)
        results = evaluate(model, spec.get("tasks"), tokenizer=tok,
                           split=args.split or spec.get("split"),
                           max_examples=args.max_examples or spec.get("max_examples"),
                           max_new_tokens=args.max_new_tokens or spec.get("max_new_tokens"),
                           batch_size=args.batch_size or spec.get("batch_size"),
                           supervised=spec.get("supervised"), out_dir=out, progress=not args.no_progress,
                           all_templates=True if args.all_templates else spec.get("all_templates"),
                           on_error=args.on_error or spec.get("on_error") or "raise")
    except (EvalError, MetricError, DataError, ConfigError, HeadConfigError, FileNotFoundError, OutputDirError) as e:
        from megamt import comm

        if comm.rank() == 0:  # every rank meets the same bad input: say it once
            print(f"megamt eval: {e}", file=sys.stderr)
        if owned:
            comm.leave(barrier_first=False)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for name, entry in results["tasks"].items():
            if entry.get("skipped"):
                n = sum(entry["skipped"].values())
                print(f"megamt eval: {name}: skipped {n} example(s) {entry['skipped']} (--on-error skip); "
                      f"scored {entry.get('n_examples')}", file=sys.stderr)
        print(f"megamt eval: {out / 'eval.json'}, {out / 'eval.md'}")
    if owned:
        comm.leave()
    return 0


if __name__ == "__main__":
    from megamt import comm as _comm

    _comm.exit_process(main())  # a launched rank: see comm.exit_process
