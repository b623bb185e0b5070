"""Peak memory per rank of evaluation: a full copy of the model on every rank vs evaluation
through the ZeRO-3 partitioned model (megamt.eval), on a ~110M-parameter Llama.

Four launches of ``deepspeed --num_gpus 2`` (CPU ranks here), one per mode. Each rank samples
every 5 ms, from a thread: its private resident memory (``RssAnon``: tensors and allocator
arenas -- what a full copy costs), its whole RSS (plus mapped file pages: a safetensors
checkpoint read through mmap; plus DeepSpeed's shared-memory all-reduce buffer), and the
number of parameter elements present in full at that moment (a ZeRO-3 parameter only while
gathered; a plain model: all); plus the kernel's lifetime peak ``ru_maxrss``. Modes:

- ``train-copy``: a training engine (ZeRO-3, AdamW, as the trainer builds it) after one
  training step (``train_one_step``: a run validates after training steps), then what
  ``evaluate_metrics`` did before: ``gather_plain_copy`` (all parameters gathered, a CPU
  copy on every rank) and evaluation of that copy;
- ``train-partitioned``: the same engine, evaluation of ``engine.module`` itself, as the
  trainer's validation runs it (``bounded_gathering``: ``eval_zero_limits``);
- ``cli-full``: what ``megamt eval`` did under a launcher: every rank loads the whole
  exported model;
- ``cli-partitioned``: ``megamt eval``'s loader now (``load_partitioned_model``: zero.Init,
  an optimizer-free ZeRO-3 engine, ``inference_ds_config``).

``--unbounded``: the partitioned modes with the training template's
``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` (1e9), as before the bound
(``eval.max_live_parameters=-1``).

The same examples in every mode (sentiment by rank classification, QA by greedy
generation); the paired modes must agree on every metric (checked).

    python tools/bench_eval_memory.py [--out runs/bench_eval_memory] [--examples 8]

Prints a markdown table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
MODES = ("train-copy", "train-partitioned", "cli-full", "cli-partitioned")
# ~110M parameters: 12 layers of 768 (85M) + a tied 32000-token embedding (24.6M)
MODEL = ("model.from_config={model_type: llama, vocab_size: 32000, hidden_size: 768, intermediate_size: 2048, "
         "num_hidden_layers: 12, num_attention_heads: 12, num_key_value_heads: 12, max_position_embeddings: 256, "
         "tie_word_embeddings: true}")


def memory() -> dict[str, int]:
    """This process's resident memory in bytes: ``rss`` and its parts ``anon`` (private
    memory: tensors, allocator arenas), ``file`` (mapped file pages, e.g. a safetensors
    checkpoint read through mmap; clean, shared with the page cache) and ``shmem``
    (shared memory: DeepSpeed's CPU all-reduce buffer)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in fields:
                out[fields[key]] = int(line.split()[1]) * 1024
    return out


class PeakMemory:
    """The largest value of each :func:`memory` field while active (a sampling thread), and
    the largest number of parameter elements gathered at once (ZeRO-3 parameters whose full
    data is present; a plain model: all of them)."""

    def __init__(self, params=(), period_s: float = 0.005):
        self.params, self.period_s, self._stop = list(params), period_s, threading.Event()
        self.peak: dict[str, int] = {}
        self.gathered = 0

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        for k, v in memory().items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        self.gathered = max(self.gathered, sum(p.numel() for p in self.params))  # ZeRO-3: 0 unless gathered

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


# ----------------------------------------------------------------------------- one rank


def train_one_step(engine, cfg, rows: int = 2, seq_len: int = 128) -> None:
    """One optimizer step on random packed rows (the trainer's loss), as a run has done before
    it validates: ZeRO-3's parameter coordinator then holds a forward + backward trace."""
    import numpy as np
    import torch

    from megamt.data.packing import Packer, PackItem, collate_rows
    from megamt.losses import count_targets, step_loss

    rng = np.random.default_rng(0)
    packer = Packer(seq_len, buffer_size=64)
    while len(packer) < 32:
        packer.add(PackItem(rng.integers(5, 1000, int(rng.integers(8, 40))), int(rng.integers(0, len(cfg.tasks))),
                            n_prompt=4))
    batch = collate_rows([packer.pop_row() for _ in range(rows)], seq_len, 0)
    n = count_targets(torch.as_tensor(batch["labels"]), torch.as_tensor(batch["task_ids"]), len(cfg.tasks))
    out = engine(batch)
    engine.backward(step_loss(out, n, torch.ones(len(cfg.tasks)), engine.world_size, 1))
    engine.step()


def rank_main(mode: str, work: Path, examples: int, unbounded: bool = False) -> None:
    import torch

    if unbounded:  # the training template's limit everywhere, as before the bound
        import megamt.ds_config

        megamt.ds_config.eval_zero_limits = lambda ds, max_live=0: {}

    from megamt import comm
    from megamt.config import load_config
    from megamt.eval.api import evaluate, gather_plain_copy
    from megamt.trainer import setup_distributed

    setup_distributed(3600)
    cfg = load_config(work / "demo" / "spec.yaml", ["model.fused_loss=false", MODEL])
    tasks = {"sentiment": {}, "qa": {}}
    opts = dict(max_examples=examples, max_new_tokens=8, batch_size=8, progress=False, write_predictions=False)
    keep = []
    import contextlib

    bound = contextlib.nullcontext()
    with PeakMemory() as build:
        if mode.startswith("train"):
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            from megamt.ds_config import build_ds_config
            from megamt.model import MultitaskModel

            ds = build_ds_config(cfg, comm.world_size(), hidden_size=768)
            keep.append(HfDeepSpeedConfig(ds))
            torch.manual_seed(0)
            model = MultitaskModel(cfg)
            unset_hf_deepspeed_config()
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
            train_one_step(engine, cfg)  # evaluation during training follows a training trace
            model = engine.module
            if mode == "train-partitioned" and not unbounded:  # as the trainer validates: bounded
                from megamt.ds_config import eval_zero_limits
                from megamt.trainer import bounded_gathering

                bound = bounded_gathering(engine, eval_zero_limits(ds))
        elif mode == "cli-full":
            from megamt.model import MultitaskModel

            model = MultitaskModel.from_pretrained(work / "hf").eval()
        else:
            from megamt.eval.evaluate import load_partitioned_model

            model = load_partitioned_model(work / "hf")
    comm.barrier()
    before = memory()
    t0 = time.perf_counter()
    with PeakMemory(model.parameters()) as during, bound:
        if mode == "train-copy":
            copy = gather_plain_copy(model, cfg)
            during.params += list(copy.parameters())
            model = copy
        results = evaluate(model, tasks, config=cfg, **opts)
    seconds = time.perf_counter() - t0
    mine = {"rank": comm.rank(), "after_build_mib": {k: v / 2**20 for k, v in before.items()},
            "peak_build_mib": {k: v / 2**20 for k, v in build.peak.items()},
            "peak_eval_mib": {k: v / 2**20 for k, v in during.peak.items()},
            "peak_gathered_params": during.gathered,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "eval_s": seconds}
    parts = comm.all_gather_objects(mine)
    if comm.rank() == 0:
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        (work / f"{mode}.json").write_text(json.dumps({
            "mode": mode, "parameters": n_params, "ranks": parts,
            "metrics": {t: e["metrics"] for t, e in results["tasks"].items()}}))
    comm.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- the driver


def prepare(work: Path) -> None:
    """Demo corpus + tokenizer and the exported ~110M model (one initialisation for all modes)."""
    import torch

    from megamt.config import load_config
    from megamt.data.synthetic import make_demo_assets
    from megamt.model import MultitaskModel

    if not (work / "hf" / "config.json").is_file():
        demo = make_demo_assets(work / "demo", n_train=8, n_val=40, seq_len=128)
        cfg = load_config(demo.spec, ["model.fused_loss=false", MODEL])
        torch.manual_seed(0)
        MultitaskModel(cfg).save_pretrained(work / "hf", tokenizer_dir=str(demo.tokenizer))


def launch(mode: str, work: Path, examples: int, port: int, unbounded: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), __file__, "--rank-mode", mode,
           "--out", str(work), "--examples", str(examples)] + (["--unbounded"] if unbounded else [])
    log = work / f"{mode}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{mode} failed (exit {rc}); see {log}")
    return json.loads((work / f"{mode}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_eval_memory")
    ap.add_argument("--examples", type=int, default=8, help="examples per task")
    ap.add_argument("--port", type=int, default=29731)
    ap.add_argument("--unbounded", action="store_true",
                    help="partitioned modes with the template's ZeRO-3 limits (1e9, as before the bound)")
    ap.add_argument("--rank-mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    args = ap.parse_args()
    work = Path(args.out).resolve()
    if args.rank_mode:
        rank_main(args.rank_mode, work, args.examples, args.unbounded)
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    res = {mode: launch(mode, work, args.examples, args.port + i, args.unbounded) for i, mode in enumerate(MODES)}
    for a, b in (("train-copy", "train-partitioned"), ("cli-full", "cli-partitioned")):
        if res[a]["metrics"] != res[b]["metrics"]:
            raise SystemExit(f"{a} and {b} disagree: {res[a]['metrics']} vs {res[b]['metrics']}")
    n = res["cli-full"]["parameters"]
    print(f"parameters: {n:,} (fp32: {n * 4 / 2**20:.0f} MiB)")
    print("| mode | rank | anon after build | anon peak in eval | RSS peak in eval (file pages) | lifetime max RSS "
          "| most parameters gathered at once | eval s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        for r in res[mode]["ranks"]:
            a, e = r["after_build_mib"], r["peak_eval_mib"]
            print(f"| {mode} | {r['rank']} | {a['anon']:.0f} | {e['anon']:.0f} | {e['rss']:.0f} ({e['file']:.0f}) "
                  f"| {r['ru_maxrss_mib']:.0f} | {r['peak_gathered_params'] / n:.0%} | {r['eval_s']:.1f} |")
    print(json.dumps({m: {"ranks": r["ranks"], "metrics": r["metrics"]} for m, r in res.items()}))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
