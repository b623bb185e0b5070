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

Prints a human summary, then one JSON line last.
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
    args = ap.parse_args(argv)

    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass
    import torch

    torch.set_num_threads(1)
    from megamt.config import config_from_dict
    from megamt.data.formats import read_examples
    from megamt.data.packing import Packer, causal_item, collate_rows
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
    for tid, name in enumerate(cfg.tasks):
        items = [causal_item(s, tid) for p, n in split_shards(manifest, out / "shards", name, "train")
                 for s in read_shard(p, n)]
        per_task.append(items)
    t_read = time.perf_counter() - t0
    order = [it for items in per_task for it in items]
    random.Random(0).shuffle(order)
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
