"""The ``megamt`` console script: a thin dispatcher to each subcommand's module.

Each subcommand lives in its own module with a ``main(argv) -> int`` that owns its
argument parser, so ``megamt --help`` stays fast (nothing heavy is imported here).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo-corpus": ("megamt.data.synthetic", "write the embedded multitask demo corpus, its task spec and tokenizer"),
    "build-tokenizer": ("megamt.data.tokenize", "train a WordPiece/BPE tokenizer on a spec's training files"),
    "build-shards": ("megamt.data.shards", "tokenize a task spec into per-task webdataset shards + manifest.json"),
    "plan": ("megamt.plan", "per-GPU memory budget of a config (ZeRO states, activations, loss, surgery) and what to change"),
    "train": ("megamt.train", "train (run it under `deepspeed --num_gpus N -m megamt.train` or srun)"),
    "export": ("megamt.export", "write a Hugging Face model folder from a megamt checkpoint"),
    "convert-checkpoint": ("megamt.checkpoint", "a checkpoint's DeepSpeed universal checkpoint for elastic resume "
                                                "(N processes)"),
    "eval": ("megamt.eval.evaluate", "per-task metrics of a checkpoint or HF folder on the training spec (or an eval spec)"),
    "adapt": ("megamt.eval.adapt", "few-shot adaptation curves of a trained model on a task (K shots, S steps, seeds)"),
    "experiment": ("megamt.experiments.cli", "experiments that launch runs: `experiment run|pairs|groups|transfer`"),
    "hpo": ("megamt.experiments.hpo", "hyperparameter search with Optuna (pruned trials stop their run; resumable study)"),
    "report": ("megamt.experiments.report", "Markdown + PNG report of a finished run from its TensorBoard logs"),
    "config": ("megamt.config_reference", "every config key (type, default, meaning); `config show SPEC` resolves one"),
    "demo": ("megamt.demo", "the main job: corpus -> tokenizer -> shards -> 2-rank ZeRO-3 training -> report"),
}


def usage() -> str:
    lines = ["usage: megamt <command> [args...]", "", "commands:"]
    width = max(len(n) for n in SUBCOMMANDS)
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {text}")
    lines += ["", "`megamt <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from megamt import __version__

        print(f"megamt {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"megamt: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
