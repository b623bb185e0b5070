"""Packed attention on the CPU: megamt's per-segment path vs transformers' own packing.

One process, one thread by default. A Llama (``--layers`` x ``--hidden``), micro-batches of
``--rows`` packed rows of ``--seq-len`` tokens from megamt's packer (examples of 8..60
tokens); forward + backward of the per-task loss, median of ``--rounds`` after one warm-up,
for each ``model.attn_implementation`` megamt runs on a CPU:

- ``megamt``: megamt's packed attention (``cu_seqlens``; sdpa/eager once per segment);
- ``transformers``: the same weights with transformers' implementation and restarting
  position ids (a dense ``[B, 1, L, L]`` mask per row -- correct on sdpa/eager, but O(L^2)).

Both sides' losses must agree (checked). Prints a markdown table and one JSON line last.

    python tools/bench_attention.py [--rows 4] [--seq-len 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from megamt.config import ModelConfig, MultitaskConfig, TaskConfig
    from megamt.data.packing import PackItem, Packer, collate_rows
    from megamt.model import MultitaskModel

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    packer = Packer(args.seq_len, buffer_size=512)
    for _ in range(args.rows * args.seq_len // 20):
        n = rng.randint(8, 60)
        packer.add(PackItem(np.array([rng.randrange(3, 1000) for _ in range(n)]), rng.randrange(3), n_prompt=n // 2))
    batch = collate_rows([packer.pop_row() for _ in range(args.rows)], args.seq_len, 0)
    fc = {"model_type": "llama", "vocab_size": 1000, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
          "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 32,
          "num_key_value_heads": args.hidden // 64, "max_position_embeddings": args.seq_len}
    rows = []
    for impl in ("sdpa", "eager"):
        cfg = MultitaskConfig(tasks={n: TaskConfig() for n in "abc"},
                              model=ModelConfig(from_config=fc, fused_loss=False, attn_implementation=impl))
        torch.manual_seed(0)
        model = MultitaskModel(cfg).eval()
        losses = {}
        for side in ("megamt", "transformers"):
            if side == "transformers":
                model.backbone.set_attn_implementation(impl)
            times = []
            for r in range(args.rounds + 1):
                t0 = time.perf_counter()
                out = model(batch)
                out.loss_sum.sum().backward()
                times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
            losses[side] = out.loss_sum.detach()
            rows.append({"impl": impl, "side": side, "median_s": statistics.median(times[1:])})
        if not torch.allclose(losses["megamt"], losses["transformers"], rtol=1e-4, atol=1e-4):
            raise SystemExit(f"{impl}: the two sides disagree: {losses}")
    segments = len(batch["cu_seqlens"]) - 1
    print(f"{args.rows} rows x {args.seq_len} tokens, {segments} segments; Llama {args.layers} x {args.hidden}; "
          f"{args.threads} thread(s)")
    print("| implementation | side | fwd+bwd median s | ratio to transformers |")
    print("|---|---|---|---|")
    base = {r["impl"]: r["median_s"] for r in rows if r["side"] == "transformers"}
    for r in rows:
        print(f"| {r['impl']} | {r['side']} | {r['median_s']:.3f} | {r['median_s'] / base[r['impl']]:.2f} |")
    print(json.dumps({"rows": args.rows, "seq_len": args.seq_len, "segments": segments, "results": rows}))


if __name__ == "__main__":
    main()
