"""`megamt train CONFIG.yaml [section.key=value ...] [--resume | --no-resume]`

Run it under a launcher; the same command runs on every rank:

    deepspeed --num_gpus 2 --module megamt.train examples/demo.yaml train.max_steps=50
    python -m megamt.train examples/demo.yaml          # one process
    srun ... deepspeed --no_ssh --node_rank $SLURM_NODEID ... --module megamt.train ...   (slurm/train.sbatch)

A run directory with a checkpoint is resumed automatically (``--no-resume`` starts fresh).

Errors, once and in words. Before any process group exists every rank checks the config,
that ``train.run_dir`` can be written, and that the shards and tokenizer belong together
(:func:`preflight`); a problem there is the same on every rank and is printed by the first
rank of each node alone, without a traceback (exit code 2). A rank that fails later prints
``megamt train: rank N: <error>`` to stderr at once (a traceback only for errors megamt does
not know); the other ranks then lose their connection to it and say so in one line each,
after it, instead of a gloo traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

EXIT_CONFIG = 2  # the run never started: config, run_dir or data problem
EXIT_FAILED = 1  # a rank failed during training

# Messages of a peer that died, as gloo / NCCL / the TCP store word them.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "Socket Timeout", "recvValue failed")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megamt train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (see examples/; every key: `megamt config reference`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 data.seq_len=1024")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="resume from the run directory's latest checkpoint (error if none)")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="start fresh even if a checkpoint exists")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_intermixed_args(argv)


def _env_rank(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def preflight(cfg) -> None:
    """What every rank would find wrong in the same way, checked before the process group:
    ``train.run_dir`` writable, a ds_config that ``meta.method`` can run on, the model config buildable, the shards' manifest present with
    every training task's train split, built with ``data.tokenizer``."""
    from megamt.data.shards import check_tokenizer, load_manifest, split_shards
    from megamt.model import hf_config, resolve_family
    from megamt.outputs import ensure_writable

    ensure_writable(cfg.train.run_dir, "train.run_dir",
                    "Choose a writable folder with enough space: train.run_dir=PATH on the command line")
    if cfg.meta.method != "none":  # meta-learning runs on ZeRO-1/2/3 partitions: the template's literal stage/offload
        from megamt.config import ConfigError
        from megamt.ds_config import load_template
        from megamt.trainer import meta_ds_problems

        problems = meta_ds_problems(load_template(cfg.train.ds_config)[0], cfg)
        if problems:
            raise ConfigError(problems)
    family = resolve_family(cfg.model, hf_config(cfg.model))
    if family == "encoder":
        from megamt.heads import resolve_head

        for name, task in cfg.tasks.items():
            resolve_head(name, task)
    manifest = load_manifest(cfg.data.shards_dir)
    if cfg.data.tokenizer:
        check_tokenizer(manifest, cfg.data.tokenizer, where=f"{cfg.data.shards_dir}/manifest.json")
    for task in cfg.train_task_names:
        split_shards(manifest, cfg.data.shards_dir, task, "train")


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors megamt raises on purpose, with a message that says what to do: one line, no traceback."""
    from megamt.config import ConfigError
    from megamt.data.errors import DataError
    from megamt.heads import HeadConfigError
    from megamt.outputs import OutputDirError
    from megamt.trainer import NonFiniteError

    return ConfigError, DataError, HeadConfigError, OutputDirError, NonFiniteError, FileNotFoundError


def same_on_every_rank(e: BaseException) -> bool:
    """Raised identically by every rank at the same step (computed from all-reduced values):
    rank 0 alone reports it. An exception class opts in with ``same_on_every_rank = True``."""
    from megamt.trainer import NonFiniteError

    return isinstance(e, NonFiniteError) or bool(getattr(type(e), "same_on_every_rank", False))


def is_peer_lost(e: BaseException) -> bool:
    """A collective failed because another rank is gone (its own error is the cause)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistNetworkError", ())) or any(s in text for s in PEER_LOST)


def peer_lost_reason(e: BaseException) -> str:
    """gloo's first sentence without its source location: ``Connection closed by peer [host]:port``."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:200]


def report(text: str) -> None:
    """One message on stderr, flushed before anything else happens (the launcher may kill
    this process as soon as another rank exits)."""
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from megamt.config import load_config

    rank, local_rank = _env_rank("RANK"), _env_rank("LOCAL_RANK")
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)
    except known_errors() as e:
        if local_rank == 0:  # the same on every rank: said once per node, no traceback
            report(f"megamt train: {e}")
        return EXIT_CONFIG
    from megamt.trainer import MultitaskTrainer

    try:
        MultitaskTrainer(None, cfg, resume=args.resume).train()
    except Exception as e:  # noqa: BLE001 -- every failure is reported, in words, then the rank exits
        if is_peer_lost(e):
            report(f"megamt train: rank {rank}: lost the connection to another rank, which failed first "
                   f"(its error is printed before this line): {peer_lost_reason(e)}")
        elif isinstance(e, known_errors()):
            if rank == 0 or not same_on_every_rank(e):
                report(f"megamt train: rank {rank}: {e}")
        else:
            report(f"megamt train: rank {rank} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return EXIT_FAILED
    from megamt import comm

    try:
        comm.leave()  # every rank together, so that no rank aborts at exit (see comm.leave)
    except Exception as e:  # noqa: BLE001 -- a peer that failed after its last step: said once, by it
        report(f"megamt train: rank {rank}: finished, but another rank did not: {peer_lost_reason(e)}")
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    from megamt import comm as _comm

    _comm.exit_process(main())  # a launched rank: see comm.exit_process
