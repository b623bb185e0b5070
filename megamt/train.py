"""`megamt train CONFIG.yaml [section.key=value ...] [--resume | --no-resume]`

Run it under a launcher; the same command runs on every rank:

    deepspeed --num_gpus 2 --module megamt.train examples/demo.yaml train.max_steps=50
    python -m megamt.train examples/demo.yaml          # one process
    srun ... deepspeed --no_ssh --node_rank $SLURM_NODEID ... --module megamt.train ...   (slurm/train.sbatch)

A run directory with a checkpoint is resumed automatically (``--no-resume`` starts fresh).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megamt train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 data.seq_len=1024")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="resume from the run directory's latest checkpoint (error if none)")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="start fresh even if a checkpoint exists")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from megamt.config import ConfigError, load_config
    from megamt.trainer import MultitaskTrainer

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"megamt train: {e}", file=sys.stderr)
        return 2
    MultitaskTrainer(None, cfg, resume=args.resume).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
