"""What the example scripts share: the data they find, a tiny model, and set-up done once.

Every example runs the same way under any launcher (each rank runs the whole script):

    python examples/X.py                        # one process (a world of one)
    deepspeed --num_gpus 2 examples/X.py        # 2 ranks: CPU processes here, GPUs on a cluster

Rank 0 builds the tokenizer and the shards while the other ranks wait at a barrier; then
every rank builds the same config, trains its share, and evaluates its share of the
examples (megamt.eval gathers the predictions on rank 0).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the real samples (SST-2, RTE, SQuAD, CoNLL-2003, DialogSum) when this checkout has them
SHARED = Path(os.environ.get("MEGAMT_DATA", REPO.parent / "shared" / "data"))


def parser(description: str, out: str, steps: int) -> argparse.ArgumentParser:
    """The options every example has; defaults are small enough for 2 CPU cores."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out, help="folder for tokenizer, shards, run, export and eval (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=256, help="packed row length in tokens (default: %(default)s)")
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch per rank (default: %(default)s)")
    ap.add_argument("--train-examples", type=int, default=400, help="training examples read per task (default: %(default)s)")
    ap.add_argument("--eval-examples", type=int, default=40, help="examples evaluated per task (default: %(default)s)")
    ap.add_argument("--data", choices=["auto", "real", "demo"], default="auto",
                    help="real: the samples in $MEGAMT_DATA or ../shared/data; demo: the embedded corpus; "
                         "auto: real when present (default)")
    ap.add_argument("--model", default=None,
                    help="a local Hugging Face model folder (its tokenizer is used); default: a tiny Llama "
                         "built from a config with a tokenizer trained on the examples")
    ap.add_argument("--ds-config", default="zero3", help="zero3 | zero3_offload | zero2 | zero2_offload | a JSON path")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return ap


def use_real_data(choice: str, needed: list[str]) -> bool:
    """Whether to read the real samples (``needed``: their folders under SHARED)."""
    present = all((SHARED / d).exists() for d in needed)
    if choice == "real" and not present:
        sys.exit(f"--data real: {[str(SHARED / d) for d in needed]} not all found (set MEGAMT_DATA or use --data demo)")
    return choice == "real" or (choice == "auto" and present)


def demo_tasks(out: Path, names: list[str], n_train: int, n_val: int, write: bool = True) -> dict:
    """The embedded demo corpus' ``names`` tasks (written under ``out/demo`` when ``write``:
    rank 0 only; :func:`tokenizer_dir`'s barrier makes the others wait for it), paths absolute."""
    from megamt.data.synthetic import demo_spec, write_corpus

    corpus = out.resolve() / "demo" / "corpus"
    if write and not (corpus / "sentiment").is_dir():
        write_corpus(corpus, n_train=n_train, n_val=n_val)
    return {k: v for k, v in demo_spec(str(corpus.resolve())).items() if k in names}


def tiny_llama(vocab_size: int, seq_len: int) -> dict:
    """``model`` section: a 2-layer Llama built from a config (about 0.3 M parameters)."""
    return {"family": "causal_lm", "from_config": {
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": max(512, seq_len), "tie_word_embeddings": True}}


def start() -> tuple[int, int]:
    """Join the launcher's process group (a plain ``python`` process is a world of one)."""
    from megamt.trainer import setup_distributed

    rank, world, _ = setup_distributed(600)
    return rank, world


def tokenizer_dir(tasks: dict, args, rank: int) -> Path:
    """``--model``'s folder, else a tokenizer trained on ``tasks``' training examples (rank 0
    builds it once; ``tasks``: ``{name: TaskConfig}`` or the same as config dicts)."""
    from megamt import MultitaskConfig, comm
    from megamt.config import ModelConfig, config_from_dict
    from megamt.data.tokenize import spec_texts, train_tokenizer

    if args.model:
        return Path(args.model)
    out = Path(args.out).resolve() / "tokenizer"
    if rank == 0 and not (out / "tokenizer.json").is_file():
        model = {"from_config": {"model_type": "llama"}}   # any: only the tasks are read
        cfg = (config_from_dict({"tasks": tasks, "model": model}) if any(isinstance(t, dict) for t in tasks.values())
               else MultitaskConfig(tasks=tasks, model=ModelConfig(**model)))
        train_tokenizer(spec_texts(cfg, log=None), out, vocab_size=4000)   # = `megamt build-tokenizer`
    comm.barrier()
    return out


def model_section(args, tok_dir: Path, seq_len: int) -> dict:
    """The ``model`` section (``ModelConfig(**it)``): ``--model``, else the tiny Llama."""
    from megamt.data.tokenize import load_tokenizer

    return {"name_or_path": args.model} if args.model else tiny_llama(len(load_tokenizer(tok_dir)), seq_len)


def build_shards_once(cfg, rank: int) -> None:
    """``megamt build-shards`` on rank 0 into ``cfg.data.shards_dir`` (kept when already built)."""
    from megamt import comm
    from megamt.data.shards import build_shards

    shards = Path(cfg.data.shards_dir)
    if rank == 0 and not (shards / "manifest.json").is_file():
        build_shards(cfg, shards, cfg.data.tokenizer, progress=False)
    comm.barrier()


def export_and_load(run_dir: Path, export_dir: Path, rank: int):
    """``megamt export`` on rank 0, then ``MultitaskModel.from_pretrained`` on every rank."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from megamt import MultitaskModel, comm
    from megamt.export import export

    # the trainer told transformers that models are built under ZeRO-3 (zero.Init); models built
    # after training are plain ones: without this they would come out partitioned and empty
    unset_hf_deepspeed_config()
    if rank == 0:
        export(run_dir, export_dir)
    comm.barrier()
    return MultitaskModel.from_pretrained(export_dir)


def say(rank: int, text: str) -> None:
    """Print on rank 0 only (megamt.eval prints its per-task table there too)."""
    if rank == 0:
        print(f"\n{text}", flush=True)
