"""Background batch building: step time with the next step's micro-batches built in a thread
(``train.prefetch=true``) against building them inside the step, with a slowed pipeline.

    python tools/bench_prefetch.py [--steps 6] [--rounds 2] [--delay-ms 0 40 80] [--out runs/bench_prefetch]

One process (a world of one, ZeRO-3), the demo corpus' shards and tiny Llama (``megamt.demo``),
the real ``TrainPipeline`` wrapped so that every ``next_batch`` first sleeps ``delay`` -- a
stand-in for a slow shared file system or object store (sleeping releases the GIL as I/O
does). Per (delay, prefetch) the mean step time and mean wait for batches over ``--steps``
steps, configurations interleaved round by round on the same trainer (the machine's drift
hits them alike). The expected shape: without prefetching a step costs compute + build; with
it, max(compute, build). Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


class SlowPipeline:
    """``TrainPipeline`` with ``delay_s`` of waiting before every micro-batch."""

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner, self.delay_s = inner, delay_s

    def next_batch(self, task=None):
        time.sleep(self.delay_s)
        return self.inner.next_batch() if task is None else self.inner.next_batch(task=task)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(repo / "runs" / "bench_prefetch"))
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 40.0, 80.0], help="sleep per micro-batch")
    ap.add_argument("--rows", type=int, default=4, help="train.micro_batch_size")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    os.environ.setdefault("MEGAMT_STRICT_COLLECTIVES", "1")

    from megamt.config import load_config
    from megamt.demo import prepare
    from megamt.trainer import MultitaskTrainer

    out = Path(args.out)
    config = out / "demo.yaml"
    if not config.is_file():
        prepare(out, n_train=400, n_val=24, seq_len=args.seq_len, steps=1000)
    cfg = load_config(config, [f"train.run_dir={out / 'run'}", f"train.micro_batch_size={args.rows}",
                               f"train.grad_accum={args.grad_accum}", "train.max_steps=100000",
                               "train.progress_bar=false", "train.eval_at_start=false"])
    trainer = MultitaskTrainer(None, cfg, resume=False)
    slow = SlowPipeline(trainer.pipeline.inner)
    trainer.pipeline.inner = slow
    for _ in range(2):  # warm-up: DeepSpeed's first steps allocate
        trainer.train_step()
        trainer.step += 1

    # the build alone, in the main thread (what the step waits for without prefetching)
    results: dict[tuple[float, bool], dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for delay in args.delay_ms:
            for prefetch in (False, True):
                slow.delay_s = delay / 1000
                trainer.pipeline.enabled = prefetch
                trainer.train_step()  # settle: the first step after a switch takes what was prefetched
                trainer.step += 1
                r = results.setdefault((delay, prefetch), {"step": [], "wait": []})
                for _ in range(args.steps):
                    res = trainer.train_step()
                    trainer.step += 1
                    r["step"].append(res.step_time_s)
                    r["wait"].append(res.data_wait_s_max)
    builds = []
    trainer.pipeline.close()
    slow.delay_s = 0.0
    for s in range(args.steps):
        t0 = time.perf_counter()
        trainer.next_micro_batches(slow, trainer.step + s)
        builds.append(time.perf_counter() - t0)
    build_s = statistics.median(builds)

    rows = []
    print(f"{'delay/batch':>12} {'batches/step':>13} {'prefetch':>9} {'step s':>8} {'wait s':>8} {'speed-up':>9}")
    for delay in args.delay_ms:
        off = statistics.fmean(results[(delay, False)]["step"])
        for prefetch in (False, True):
            r = results[(delay, prefetch)]
            step, wait = statistics.fmean(r["step"]), statistics.fmean(r["wait"])
            rows.append({"delay_ms": delay, "prefetch": prefetch, "step_s": step, "wait_s": wait,
                         "speedup_vs_off": off / step})
            print(f"{delay:>10.0f}ms {args.grad_accum:>13} {str(prefetch):>9} {step:>8.3f} {wait:>8.3f} "
                  f"{off / step:>8.2f}x")
    print(f"build of one step without delay (main thread, median of {args.steps}): {build_s:.3f} s")
    print(json.dumps({"rows": rows, "build_s": build_s, "steps": args.steps, "rounds": args.rounds,
                      "micro_batch_size": args.rows, "grad_accum": args.grad_accum, "seq_len": args.seq_len,
                      "threads": __import__("torch").get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
