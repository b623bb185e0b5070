"""Data-path benchmark: packing efficiency and reader+packer throughput on the real samples.

    python tools/bench_data.py [--data ../shared/data] [--out runs/bench_data] [--max-per-task N]

1. Builds a WordPiece tokenizer from the samples themselves (no hub) and shards for SST-2,
   RTE, SQuAD, CoNLL-2003 and DialogSum (build time reported).
2. Packer throughput: pre-tokenized examples (read from the shards once, in a seeded
   mixture order) → best-fit packer → packed batch tensors, on one core (affinity pinned,
   one torch thread); tokens/s counts non-pad tokens.
3. Packing efficiency (non-pad / total tokens) at seq_len 512 and 2048, beside the pad
   fraction of pad-to-longest batching of the same examples in the same order.
4. End-to-end: ``TrainPipeline.next_batch`` (shard reading + decoding + mixture + packing)
   from a cold start for as many batches as one pass over the data's tokens.

``--mode seq2seq`` (encoder-decoders): the same examples as prompt + EOS (encoder) and target
+ EOS (decoder), packed by ``Seq2SeqPacker`` into aligned encoder / decoder rows (default
512 / 128, ``--seq2seq-lens``): packing efficiency of *each side*, beside pad-to-longest
batching of both sides (what ``DataCollatorForSeq2Seq`` does), and the packer's throughput.

Prints a human summary, then one JSON line last.

Two more modes, each on its own (they build a small task of their own under ``--out``):

    python tools/bench_data.py --read-sim 8,64,512
    python tools/bench_data.py --slow-reader [--read-mbps 4] [--step-s 0.1] [--steps 150] [--startup-s 2]

``--read-sim``: bytes read per rank from a task of 3 shards (DialogSum train), simulated
ranks of worlds of 8, 64 and 512 in this process: each sampled rank takes one epoch of its
own examples from a training ``TaskStream`` (``data.shuffle_buffer`` 1000) while an
instrumented ``open`` in ``megamt.data.shards`` counts every byte read. The counter wraps
the module's ``open``, which every megamt version reads shards with, so the same script run
with ``PYTHONPATH=<an older checkout>`` measures the old code (the "before" numbers).

``--slow-reader``: a step loop (``TrainPipeline.next_batch`` then ``--step-s`` of simulated
device compute, a sleep that releases the GIL as a GPU step does) over two tasks whose
shard reads are throttled to ``--read-mbps``; with and without ``data.prefetch_windows``
side by side: how often and how long the loop waited on a shuffle-window fill.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np



def packed_rows(packer, items):
    """Every row the packer emits for ``items``: while feeding them, then while draining it."""
    for it in items:
        packer.add(it)
        if packer.full:
            yield packer.pop_row()
    while len(packer):
        yield packer.pop_row()

class CountingOpen:
    """The instrumented reader: ``open`` for megamt.data.shards that counts bytes read per
    file suffix and can throttle reads to ``mbps`` MB/s (a sleep, as a slow file system)."""

    def __init__(self, mbps: float = 0.0):
        import threading

        self.bytes: dict[str, int] = {}
        self.mbps = mbps
        self.lock = threading.Lock()

    def __call__(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        suffix = "".join(Path(path).suffixes[-2:]) if str(path).endswith(".idx.npy") else Path(path).suffix
        raw_read = f.read

        def read(n=-1):
            data = raw_read(n)
            with self.lock:
                self.bytes[suffix] = self.bytes.get(suffix, 0) + len(data)
            if self.mbps:
                time.sleep(len(data) / (self.mbps * 1e6))
            return data

        f.read = read
        return f


def dialogsum_task(data: Path, out: Path, shard_examples: int, tasks=("dialogsum",), cap=None):
    """A config of DialogSum (and SST-2) train shards with a tokenizer built from them
    (``cap``: at most that many examples per task, in shards of a third of it)."""
    from megamt.config import config_from_dict
    from megamt.data.formats import read_examples
    from megamt.data.shards import build_shards, load_manifest
    from megamt.data.synthetic import build_tokenizer

    spec = {"dialogsum": {"task_type": "summarization", "fields": {"document": "dialogue"},
                          "inputs": {"train": {"path": str(data / "dialogsum/dialogsum.train.jsonl")}}},
            "sst2": {"task_type": "classification", "fields": {"text": "sentence"},
                     "verbalizers": {"0": "negative", "1": "positive"},
                     "inputs": {"train": {"path": str(data / "sst2/train.tsv")}}}}
    if cap:
        for t in spec.values():
            t["inputs"]["train"]["max_examples"] = cap
        shard_examples = -(-cap // 3)
    raw = {"tasks": {t: spec[t] for t in tasks}, "model": {"from_config": {"model_type": "llama"}},
           "data": {"shards_dir": str(out / "shards"), "tokenizer": str(out / "tokenizer"), "seq_len": 512,
                    "shard_max_examples": shard_examples}, "train": {"micro_batch_size": 8}}
    cfg = config_from_dict(raw)
    if not (out / "shards" / "manifest.json").is_file():
        texts = [str(v) for name, tc in cfg.tasks.items() for ex in read_examples(name, tc, "train")
                 for v in ex.fields.values() if isinstance(v, str)]
        build_tokenizer(texts, out / "tokenizer", vocab_size=8000)
        build_shards(cfg, progress=False, log=None)
    return cfg, load_manifest(out / "shards")


def read_simulation(args) -> dict:
    """Bytes read per simulated rank (see the module docstring, ``--read-sim``)."""
    import subprocess

    import megamt
    import megamt.data.shards as shards_mod
    from megamt.data.shards import split_shards
    from megamt.data.streams import TaskStream

    cfg, manifest = dialogsum_task(Path(args.data), Path(args.out) / "read_sim", 1700, cap=args.max_per_task)
    shards = split_shards(manifest, cfg.data.shards_dir, "dialogsum", "train")
    task_bytes = sum(p.stat().st_size for p, _ in shards)
    src = Path(megamt.__file__).resolve().parents[1]
    rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "megamt"], capture_output=True,
                           text=True).stdout.strip()
    out = {"megamt": str(src), "rev": rev + ("+changes" if dirty else ""), "task": "dialogsum/train",
           "shards": len(shards), "examples": sum(n for _, n in shards), "task_bytes": task_bytes, "worlds": {}}
    for W in [int(w) for w in args.read_sim.split(",")]:
        rows = []
        for r in sorted({0, W // 3, W // 2, W - 1}):
            counter = CountingOpen()
            shards_mod.open = counter
            try:
                t0 = time.perf_counter()
                s = TaskStream(shards, r, W, infinite=True, seed=0, name="dialogsum", window=1000,
                               fields=("prompt_ids", "target_ids"))
                for _ in range(s.num_examples):
                    next(s)
                dt = time.perf_counter() - t0
            finally:
                del shards_mod.open
            rows.append({"rank": r, "examples": s.num_examples, "bytes": sum(counter.bytes.values()),
                         "index_bytes": counter.bytes.get(".idx.npy", 0), "seconds": round(dt, 4)})
        mx = max(x["bytes"] for x in rows)
        out["worlds"][str(W)] = {"ranks": rows, "max_bytes_per_rank": mx,
                                 "max_fraction_of_task": round(mx / task_bytes, 5),
                                 "ideal_fraction": round(1 / W, 5)}
        print(f"world {W:4d}: max {mx / 1e6:8.3f} MB per rank = {mx / task_bytes:.4f} of the task "
              f"(1/W = {1 / W:.4f}); ranks {[x['rank'] for x in rows]}, examples {[x['examples'] for x in rows]}")
    print(f"megamt at {out['megamt']} ({out['rev']}); task {task_bytes / 1e6:.1f} MB in {len(shards)} shards")
    return out


def slow_reader_bench(args) -> dict:
    """The step loop against a throttled reader, with and without background window reads."""
    import megamt.data.shards as shards_mod
    from megamt.data.pipeline import TrainPipeline

    cfg, manifest = dialogsum_task(Path(args.data), Path(args.out) / "slow_reader", 2000,
                                   tasks=("dialogsum", "sst2"), cap=args.max_per_task)
    out = {"read_mbps": args.read_mbps, "step_s": args.step_s, "steps": args.steps, "startup_s": args.startup_s,
           "shuffle_buffer": cfg.data.shuffle_buffer, "rows_per_batch": cfg.train.micro_batch_size,
           "seq_len": cfg.data.seq_len, "runs": {}}
    for prefetch in (False, True):
        cfg.data.prefetch_windows = prefetch
        shards_mod.open = CountingOpen(args.read_mbps)
        try:
            pipe = TrainPipeline(cfg, 0, 1, log=None)
            pipe.start_prefetch()
            time.sleep(args.startup_s)  # the trainer's start-up after building the pipeline (engine, resume)
            batch_s, waits_after_first = [], 0
            t_all = time.perf_counter()
            for step in range(args.steps):
                before = pipe.window_stats()["fill_waits"]
                t0 = time.perf_counter()
                pipe.next_batch()
                batch_s.append(time.perf_counter() - t0)
                if step > 0:
                    waits_after_first += pipe.window_stats()["fill_waits"] - before
                time.sleep(args.step_s)  # the device's share of the step (releases the GIL, as a GPU step does)
            wall = time.perf_counter() - t_all
            st = pipe.window_stats()
            pipe.close()
        finally:
            del shards_mod.open
        run = {"wall_s": round(wall, 2), "windows": st["fills"], "window_waits": st["fill_waits"],
               "window_waits_after_step_1": waits_after_first, "window_wait_s": round(st["fill_wait_s"], 3),
               "first_batch_s": round(batch_s[0], 3), "max_batch_s_after_step_1": round(max(batch_s[1:]), 4),
               "mean_batch_s_after_step_1": round(sum(batch_s[1:]) / len(batch_s[1:]), 4),
               "overhead_vs_compute": round(wall / (args.steps * args.step_s) - 1, 4) if args.step_s else None}
        out["runs"]["prefetch" if prefetch else "inline"] = run
        print(f"{'prefetch' if prefetch else 'inline  '}: {run['windows']} windows, the loop waited on "
              f"{run['window_waits']} ({run['window_waits_after_step_1']} after step 1), {run['window_wait_s']:.2f} s; "
              f"max next_batch after step 1 {run['max_batch_s_after_step_1'] * 1e3:.1f} ms; wall {run['wall_s']} s "
              f"for {args.steps} x {args.step_s} s of compute")
    return out


def seq2seq_packing(order: list, manifest: dict, args, reused: bool, t_tok: float, t_build) -> int:
    """``--mode seq2seq``: both sides' packing efficiency (see the module docstring)."""
    from megamt.data.packing import Seq2SeqPacker, collate_seq2seq_rows

    items = order
    enc = np.array([len(it.tokens) for it in items])
    dec = np.array([len(it.dec) for it in items])
    B = args.batch
    results = {"mode": "seq2seq", "machine": "2-core CPU, 24 GiB (one core pinned, torch threads=1)",
               "examples": len(items), "encoder_tokens": int(enc.sum()), "decoder_tokens": int(dec.sum()),
               "encoder_mean_len": round(float(enc.mean()), 1), "decoder_mean_len": round(float(dec.mean()), 1),
               "encoder_p99_len": int(np.percentile(enc, 99)), "decoder_p99_len": int(np.percentile(dec, 99)),
               "tokenizer_vocab": manifest["tokenizer"]["vocab_size"], "tokenizer_s": None if reused else round(t_tok, 2),
               "build_shards_s": t_build and round(t_build, 2), "lens": {}}
    for pair in args.seq2seq_lens.split(","):
        L, Ld = (int(x) for x in pair.split("/"))
        packer = Seq2SeqPacker(L, Ld, args.buffer, "truncate")
        rows, n_rows, nonpad_enc, nonpad_dec = [], 0, 0, 0
        t0 = time.perf_counter()
        for row in packed_rows(packer, items):
            rows.append(row)
            if len(rows) == B:
                b = collate_seq2seq_rows(rows, L, Ld, 0)
                nonpad_enc += int((b["segment_ids"] >= 0).sum())
                nonpad_dec += int((b["decoder_segment_ids"] >= 0).sum())
                n_rows += B
                rows = []
        dt = time.perf_counter() - t0
        if rows:
            b = collate_seq2seq_rows(rows, L, Ld, 0)
            nonpad_enc += int((b["segment_ids"] >= 0).sum())
            nonpad_dec += int((b["decoder_segment_ids"] >= 0).sum())
            n_rows += len(rows)
        ce, cd = np.minimum(enc, L), np.minimum(dec, Ld)
        padded = {}
        for bs in (B, 32):  # pad-to-longest on each side, B examples per batch, same order
            te = sum(int(ce[i:i + bs].max()) * len(ce[i:i + bs]) for i in range(0, len(ce), bs))
            td = sum(int(cd[i:i + bs].max()) * len(cd[i:i + bs]) for i in range(0, len(cd), bs))
            padded[f"pad_to_longest_b{bs}"] = {"encoder": round(ce.sum() / te, 4), "decoder": round(cd.sum() / td, 4)}
        results["lens"][pair] = {
            "encoder_efficiency": round(nonpad_enc / (n_rows * L), 4),
            "decoder_efficiency": round(nonpad_dec / (n_rows * Ld), 4), "rows": n_rows,
            "pack_tokens_per_s": round((nonpad_enc + nonpad_dec) / dt),
            "truncated": int(packer.stats["truncated"]), "truncated_target": int(packer.stats["truncated_target"]),
            **padded}
    for pair, r in results["lens"].items():
        pl = r[f"pad_to_longest_b{B}"]
        print(f"seq2seq {pair}: packing efficiency encoder {r['encoder_efficiency']:.4f} decoder "
              f"{r['decoder_efficiency']:.4f} (pad-to-longest b{B}: {pl['encoder']:.4f} / {pl['decoder']:.4f}), "
              f"packer {r['pack_tokens_per_s'] / 1e3:.0f}k tok/s, truncated {r['truncated']} prompts / "
              f"{r['truncated_target']} targets")
    print(f"{results['examples']} examples, encoder mean {results['encoder_mean_len']} (p99 "
          f"{results['encoder_p99_len']}), decoder mean {results['decoder_mean_len']} (p99 {results['decoder_p99_len']})")
    print(json.dumps(results))
    return 0


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(repo / ".." / "shared" / "data"))
    ap.add_argument("--out", default=str(repo / "runs" / "bench_data"))
    ap.add_argument("--max-per-task", type=int, default=None, help="cap examples per task (default: all)")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=8, help="rows per packed batch / examples per padded batch")
    ap.add_argument("--buffer", type=int, default=64, help="data.pack_buffer")
    ap.add_argument("--reuse", action="store_true", help="reuse tokenizer and shards already in --out")
    ap.add_argument("--read-sim", metavar="WORLDS", help="only: bytes read per simulated rank, e.g. 8,64,512")
    ap.add_argument("--slow-reader", action="store_true", help="only: the step loop against a throttled reader")
    ap.add_argument("--read-mbps", type=float, default=4.0, help="--slow-reader: shard read rate (MB/s)")
    ap.add_argument("--step-s", type=float, default=0.1, help="--slow-reader: simulated compute per step (s)")
    ap.add_argument("--steps", type=int, default=150, help="--slow-reader: steps per run")
    ap.add_argument("--startup-s", type=float, default=2.0, help="--slow-reader: time between building the "
                    "pipeline and the first step (the trainer's engine set-up)")

    ap.add_argument("--mode", choices=["causal", "seq2seq"], default="causal",
                    help="causal: one sequence per example; seq2seq: encoder and decoder rows")
    ap.add_argument("--seq2seq-lens", default="512/128,1024/256",
                    help="seq2seq mode: encoder/decoder row lengths to measure")
    args = ap.parse_args(argv)
    if args.read_sim or args.slow_reader:
        result = read_simulation(args) if args.read_sim else slow_reader_bench(args)
        print(json.dumps(result))
        return 0

    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass
    import torch

    torch.set_num_threads(1)
    from megamt.config import config_from_dict
    from megamt.data.formats import read_examples
    from megamt.data.packing import Packer, causal_item, collate_rows, seq2seq_item
    from megamt.data.pipeline import TrainPipeline
    from megamt.data.shards import build_shards, read_shard, split_shards
    from megamt.data.synthetic import build_tokenizer

    data = Path(args.data).resolve()
    if not data.is_dir():
        raise SystemExit(f"{data}: real samples not found (pass --data)")
    out = Path(args.out)
    cap = {"max_examples": args.max_per_task} if args.max_per_task else {}
    tasks = {
        "sst2": {"task_type": "classification", "fields": {"text": "sentence"},
                 "verbalizers": {"0": "negative", "1": "positive"},
                 "inputs": {"train": {"path": str(data / "sst2/train.tsv"), **cap}}},
        "rte": {"task_type": "classification", "fields": {"text": "sentence1", "text_pair": "sentence2"},
                "inputs": {"train": {"path": str(data / "rte/train.tsv"), **cap}}},
        "squad": {"task_type": "extractive_qa", "inputs": {"train": {"path": str(data / "squad_v1.1/dev-v1.1.json"), **cap}}},
        "conll": {"task_type": "ner", "inputs": {"train": {"path": str(data / "conll2003/eng.train"), "format": "conll", **cap}}},
        "dialogsum": {"task_type": "summarization", "fields": {"document": "dialogue"},
                      "inputs": {"train": {"path": str(data / "dialogsum/dialogsum.train.jsonl"), **cap}}},
    }
    raw = {"tasks": tasks, "model": {"from_config": {"model_type": "llama"}},
           "data": {"shards_dir": str(out / "shards"), "tokenizer": str(out / "tokenizer"), "seq_len": 2048,
                    "pack_buffer": args.buffer, "shard_max_examples": 2000},
           "train": {"micro_batch_size": args.batch}, "mixture": {"strategy": "proportional"}}
    cfg = config_from_dict(raw)

    t0 = time.perf_counter()
    if not (args.reuse and (out / "tokenizer" / "tokenizer.json").is_file()):
        texts = []
        for name, tc in cfg.tasks.items():
            for ex in read_examples(name, tc, "train"):
                texts += [v if isinstance(v, str) else " ".join(map(str, v)) if isinstance(v, list) and v and
                          isinstance(v[0], str) else str(v) for v in ex.fields.values()]
        build_tokenizer(texts, out / "tokenizer", vocab_size=args.vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    reused = args.reuse and (out / "shards" / "manifest.json").is_file()
    if reused:
        from megamt.data.shards import load_manifest

        manifest = load_manifest(out / "shards")
    else:
        manifest = build_shards(cfg, progress=False, log=None)
    t_build = None if reused else time.perf_counter() - t0
    n_examples = sum(s["examples"] for t in manifest["tasks"].values() for s in t["splits"].values())

    # pre-tokenized examples in a seeded, size-proportional mixture order
    per_task = []
    t0 = time.perf_counter()
    eos = int(manifest["tokenizer"]["eos_id"])
    make = (lambda s, t: seq2seq_item(s, t, eos)) if args.mode == "seq2seq" else causal_item
    for tid, name in enumerate(cfg.tasks):
        items = [make(s, tid) for p, n in split_shards(manifest, out / "shards", name, "train")
                 for s in read_shard(p, n)]
        per_task.append(items)
    t_read = time.perf_counter() - t0
    order = [it for items in per_task for it in items]
    random.Random(0).shuffle(order)
    if args.mode == "seq2seq":
        return seq2seq_packing(order, manifest, args, reused, t_tok, t_build)
    n_tokens = sum(len(it) for it in order)
    lengths = np.array([len(it) for it in order])

    results = {"machine": "2-core CPU, 24 GiB (one core pinned, torch threads=1)", "examples": len(order),
               "tokens": int(n_tokens), "mean_len": round(float(lengths.mean()), 1),
               "p99_len": int(np.percentile(lengths, 99)), "max_len": int(lengths.max()),
               "tokenizer_vocab": manifest["tokenizer"]["vocab_size"], "tokenizer_s": None if reused else round(t_tok, 2),
               "build_shards_s": t_build and round(t_build, 2),
               "build_examples_per_s": t_build and round(n_examples / t_build),
               "read_shards_all_fields_examples_per_s": round(len(order) / t_read), "seq": {}}
    B = args.batch
    for L in (512, 2048):
        packer = Packer(L, args.buffer, "truncate")
        rows, batches = [], 0
        nonpad = 0
        t0 = time.perf_counter()
        for row in packed_rows(packer, order):
            rows.append(row)
            if len(rows) == B:
                b = collate_rows(rows, L, 0)
                nonpad += int((b["segment_ids"] >= 0).sum())
                batches += 1
                rows = []
        dt = time.perf_counter() - t0
        if rows:  # the final partial batch: efficiency over full rows only
            b = collate_rows(rows, L, 0)
            nonpad += int((b["segment_ids"] >= 0).sum())
        total_rows = batches * B + len(rows)
        eff = nonpad / (total_rows * L)
        # pad-to-longest batching of the same examples, same order, B examples per batch
        clipped = np.minimum(lengths, L)
        pads = []
        for bs in (B, 32):
            tot = sum(int(clipped[i:i + bs].max()) * len(clipped[i:i + bs]) for i in range(0, len(clipped), bs))
            pads.append(round(1 - clipped.sum() / tot, 4))
        results["seq"][str(L)] = {"packing_efficiency": round(eff, 4), "pack_tokens_per_s": round(nonpad / dt),
                                  "rows": total_rows, "truncated": int(packer.stats["truncated"]),
                                  f"pad_to_longest_pad_fraction_b{B}": pads[0],
                                  "pad_to_longest_pad_fraction_b32": pads[1]}

    # end to end from a cold start: shards -> streams -> mixture -> packer -> batch tensors,
    # for one pass worth of tokens (every shard window gets read)
    for L in (512, 2048):
        cfg.data.seq_len = L
        n_batches = max(1, n_tokens // (B * L))
        pipe = TrainPipeline(cfg, 0, 1, log=None)  # reads the manifest and checks the tokenizer; no shard yet
        t0 = time.perf_counter()
        tok = 0
        for _ in range(n_batches):
            b = pipe.next_batch()
            tok += int((b["segment_ids"] >= 0).sum())
        dt = time.perf_counter() - t0
        results["seq"][str(L)]["e2e_tokens_per_s"] = round(tok / dt)
        results["seq"][str(L)]["e2e_packing_efficiency"] = round(tok / (n_batches * B * L), 4)

    for L, r in results["seq"].items():
        print(f"seq_len {L}: packing efficiency {r['packing_efficiency']:.4f} "
              f"(pad-to-longest b{B}: {1 - r[f'pad_to_longest_pad_fraction_b{B}']:.4f} non-pad), "
              f"packer {r['pack_tokens_per_s'] / 1e3:.0f}k tok/s, end-to-end {r['e2e_tokens_per_s'] / 1e3:.0f}k tok/s, "
              f"truncated {r['truncated']}")
    print(f"{results['examples']} examples, {results['tokens']} tokens (mean {results['mean_len']}, "
          f"p99 {results['p99_len']}, max {results['max_len']}); build-shards {results['build_shards_s']}s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
