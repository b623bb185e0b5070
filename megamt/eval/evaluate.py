"""``megamt eval CHECKPOINT_OR_HF_DIR EVAL_SPEC``: per-task metrics of a trained model.

CHECKPOINT_OR_HF_DIR: a folder written by ``megamt export`` / ``save_pretrained`` (Hugging
Face files + ``megamt_config.yaml``), a run directory or a checkpoint folder.

EVAL_SPEC (YAML; every key optional)::

    split: validation          # default split of every task
    max_examples: 200          # per task, the first ones
    max_new_tokens: 64         # bound on greedy generation
    batch_size: 8
    all_templates: false       # causal LMs: every fitting prompt template, mean ± std (--all-templates)
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

Relative paths are resolved against the spec's folder. Several ranks: launch with
``torchrun --nproc_per_node N -m megamt.eval.evaluate ...`` (or the deepspeed launcher);
every rank loads a plain copy of the weights and predicts its share of the examples, rank
0 writes ``OUT/eval.json``, ``OUT/eval.md`` and ``OUT/predictions/<task>.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SPEC_KEYS = {"split", "max_examples", "max_new_tokens", "batch_size", "tokenizer", "supervised", "tasks",
             "all_templates"}


def load_eval_spec(path: str | Path) -> dict:
    """The eval spec as a mapping, unknown keys refused, relative paths resolved."""
    from megamt.config import load_yaml
    from megamt.eval.api import EvalError

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: eval spec not found")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise EvalError(f"{path}: the top level of an eval spec must be a mapping")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise EvalError(f"{path}: unknown eval spec key(s) {unknown}; known keys: {sorted(SPEC_KEYS)}")
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
    return raw


def load_model_and_tokenizer(model_dir: str | Path, tokenizer: str | None = None):
    """The model (a plain copy) and the tokenizer it was trained with, checked against each other."""
    from megamt.data.tokenize import load_tokenizer, vocab_hash
    from megamt.eval.api import EvalError, check_tokenizer_matches
    from megamt.model import MultitaskModel

    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise EvalError(f"{model_dir}: no such checkpoint or model folder")
    model = MultitaskModel.from_pretrained(model_dir)
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


def _init_distributed() -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="exported HF folder, run directory or checkpoint folder")
    ap.add_argument("spec", help="eval spec YAML (see `megamt eval --help`)")
    ap.add_argument("--out", default=None, help="output folder (default: MODEL/eval)")
    ap.add_argument("--split", default=None)
    ap.add_argument("--max-examples", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--all-templates", action="store_true",
                    help="causal LMs: score every fitting prompt template; report each and mean ± std")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from megamt.config import ConfigError
    from megamt.data.errors import DataError
    from megamt.eval.api import EvalError, evaluate
    from megamt.eval.metrics import MetricError
    from megamt.heads import HeadConfigError

    try:
        spec = load_eval_spec(args.spec)
        _init_distributed()
        model, tok = load_model_and_tokenizer(args.model, spec.get("tokenizer"))
        out = Path(args.out) if args.out else Path(args.model) / "eval"
        evaluate(model, spec.get("tasks"), tokenizer=tok,
                 split=args.split or spec.get("split"),
                 max_examples=args.max_examples or spec.get("max_examples"),
                 max_new_tokens=args.max_new_tokens or spec.get("max_new_tokens"),
                 batch_size=args.batch_size or spec.get("batch_size"),
                 supervised=spec.get("supervised"), out_dir=out, progress=not args.no_progress,
                 all_templates=True if args.all_templates else spec.get("all_templates"))
    except (EvalError, MetricError, DataError, ConfigError, HeadConfigError, FileNotFoundError) as e:
        print(f"megamt eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
