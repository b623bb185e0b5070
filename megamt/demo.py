"""`megamt demo`: the whole path on a laptop, end to end, in a few minutes.

1. writes the embedded multitask corpus (6 tasks), its tokenizer and task spec (runs/demo/);
2. tokenizes it into per-task webdataset shards (runs/demo/shards/);
3. trains a tiny Llama (built from a config) with DeepSpeed ZeRO-3 on 2 CPU ranks through the
   real launcher: ``deepspeed --num_gpus 2 --module megamt.train runs/demo/demo.yaml``;
4. prints every task's validation loss at the start and the end, and where the TensorBoard
   logs, checkpoints and the command to export a Hugging Face folder are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

# Training settings of the demo (on top of the spec the corpus generator writes).
# 60 steps * 4 rows * 256 tokens * 2 ranks = 122,880 tokens; about 1 s per step on 2 cores.
DEMO_TRAIN = {
    "max_steps": 60,
    "micro_batch_size": 4,
    "grad_accum": 1,
    "lr": 0.003,
    "warmup_steps": 5,
    "min_lr_ratio": 0.1,
    "log_every": 10,
    "eval_every": 30,
    "eval_batches": 4,
    "save_every": 30,
    "keep_last": 2,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(num_ranks: int) -> list[str]:
    """The `deepspeed` launcher of this environment (its console script, else its module)."""
    script = Path(sys.executable).parent / "deepspeed"
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return launcher + ["--num_gpus", str(num_ranks), "--master_port", str(_free_port()), "--module", "megamt.train"]


def prepare(out: Path, *, n_train: int, n_val: int, seq_len: int, steps: int) -> Path:
    """Corpus, tokenizer, shards and the training config; returns the config path."""
    from megamt.config import load_config
    from megamt.data.shards import build_shards
    from megamt.data.synthetic import make_demo_assets

    t0 = time.time()
    assets = make_demo_assets(out, n_train=n_train, n_val=n_val, seq_len=seq_len)
    print(f"[demo] corpus + tokenizer: {assets.corpus}, {assets.tokenizer} ({time.time() - t0:.0f} s)", flush=True)
    t0 = time.time()
    build_shards(load_config(assets.spec), assets.shards, assets.tokenizer, progress=False)
    print(f"[demo] shards: {assets.shards} ({time.time() - t0:.0f} s)", flush=True)
    spec = yaml.safe_load(assets.spec.read_text())
    spec["train"] = {**DEMO_TRAIN, "max_steps": steps, "run_dir": str(out / "run"), "progress_bar": False}
    config = out / "demo.yaml"
    config.write_text("# megamt demo training config (written by `megamt demo`)\n" + yaml.safe_dump(spec, sort_keys=False))
    load_config(config)  # fail here, not in the ranks, on a bad config
    return config


def read_evals(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    out = []
    with open(run_dir / "train_log.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "eval" in rec:
                out.append((rec["step"], rec["eval"]))
    return out


def loss_table(start: dict[str, float], end: dict[str, float]) -> tuple[str, list[str]]:
    """The start/end table and the tasks whose loss did not clearly fall (by >= 10%)."""
    lines = [f"{'task':<12} {'start':>8} {'end':>8} {'change':>8}", "-" * 39]
    flat = []
    for task in start:
        s, e = start[task], end.get(task, float("nan"))
        lines.append(f"{task:<12} {s:>8.3f} {e:>8.3f} {100 * (e - s) / s:>7.1f}%")
        if not e <= 0.9 * s:
            flat.append(task)
    return "\n".join(lines), flat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    ap.add_argument("--steps", type=int, default=DEMO_TRAIN["max_steps"], help="optimizer steps")
    ap.add_argument("--ranks", type=int, default=2, help="ranks (CPU processes or GPUs)")
    ap.add_argument("--n-train", type=int, default=400, help="train examples per task")
    ap.add_argument("--n-val", type=int, default=50, help="validation examples per task")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    t_start = time.time()
    config = prepare(out, n_train=args.n_train, n_val=args.n_val, seq_len=args.seq_len, steps=args.steps)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    cmd = deepspeed_command(args.ranks) + [str(config)]
    print(f"[demo] training: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"[demo] training failed (exit code {rc}); see the output above", file=sys.stderr)
        return rc
    train_s = time.time() - t0
    evals = read_evals(run_dir)
    if len(evals) < 2:
        print(f"[demo] expected start and end validation losses in {run_dir / 'train_log.jsonl'}", file=sys.stderr)
        return 1
    (s0, start), (s1, end) = evals[0], evals[-1]
    table, flat = loss_table(start, end)
    print(f"\n[demo] validation loss per task (step {s0} -> step {s1}, ZeRO-3 on {args.ranks} ranks)\n{table}\n")
    print(f"[demo] training took {train_s:.0f} s; whole demo {time.time() - t_start:.0f} s")
    print(f"[demo] TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"[demo] checkpoints:  {run_dir / 'checkpoints'} (latest: "
          f"{(run_dir / 'checkpoints' / 'latest').read_text().strip()})")
    print(f"[demo] log:          {run_dir / 'train_log.jsonl'}")
    print(f"[demo] export:       megamt export {run_dir} {out / 'export'}")
    if flat:
        print(f"[demo] the loss of {', '.join(flat)} did not fall by 10%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
