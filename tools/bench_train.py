"""Training throughput: megamt (packed, ZeRO-3) vs HF Trainer (padded) vs TRL SFTTrainer (packed).

All three sides run in one invocation, each through the real ``deepspeed --num_gpus 2``
launcher on the CPU, with:
  - the same tiny Llama (one initialisation, saved once and loaded by every side),
  - the same examples (megamt's shards: prompt + target token ids; the HF sides get the
    same ids with the prompt masked in ``labels``),
  - the same DeepSpeed ZeRO-3 engine settings (megamt's resolved ``zero_optimization``
    section, AdamW) and the same thread count per rank.

The metric is non-pad tokens (prompt and target) per second, summed over ranks, over the
steps after ``--warmup``; peak memory is the largest max-RSS of any rank.

    python tools/bench_train.py                      # real samples from ../shared/data
    python tools/bench_train.py --data demo          # the embedded demo corpus

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")  # the launcher of this interpreter's environment


# ----------------------------------------------------------------------------- preparation


def real_spec(data_dir: Path) -> dict:
    """A mixed-task spec over the real samples (train split only)."""
    return {
        "sst2": {"task_type": "classification",
                 "inputs": {"train": {"path": str(data_dir / "sst2/train.tsv"), "format": "tsv"}},
                 "fields": {"text": "sentence", "label": "label"}, "labels": ["0", "1"],
                 "verbalizers": {"0": "negative", "1": "positive"}},
        "rte": {"task_type": "classification",
                "inputs": {"train": {"path": str(data_dir / "rte/train.tsv"), "format": "tsv"}},
                "fields": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
                "labels": ["entailment", "not_entailment"]},
        "squad": {"task_type": "extractive_qa",
                  "inputs": {"train": {"path": str(data_dir / "squad_v1.1/dev-v1.1.json"), "format": "squad"}}},
        "conll": {"task_type": "ner",
                  "inputs": {"train": {"path": str(data_dir / "conll2003/eng.train"), "format": "conll",
                                       "max_examples": 2000}}},
        # dialogsum.train.jsonl is Python-literal lines (see ../shared/data/README.md); dev is strict JSON
        "dialogsum": {"task_type": "summarization",
                      "inputs": {"train": {"path": str(data_dir / "dialogsum/dialogsum.dev.jsonl"), "format": "jsonl"}},
                      "fields": {"document": "dialogue", "summary": "summary"}},
    }


def _strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _strings(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)


def prepare(out: Path, data: str, seq_len: int, hidden: int, layers: int, seed: int) -> dict:
    """Tokenizer, shards, the initial model and the HF dataset; returns their paths."""
    import yaml

    from megamt.config import config_from_dict
    from megamt.data.shards import build_shards, load_manifest, read_shard, split_shards
    from megamt.data.synthetic import build_tokenizer, corpus_texts, demo_spec, make_demo_assets

    out.mkdir(parents=True, exist_ok=True)
    if data == "real":
        if not SHARED.is_dir():
            raise SystemExit(f"bench_train: {SHARED} not found; use --data demo")
        tasks = real_spec(SHARED)
        tok_dir = out / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            from megamt.data.formats import read_examples

            texts = corpus_texts(out / "_none")  # the built-in templates' words
            for name, t in config_from_dict({"tasks": tasks, "model": {"name_or_path": "x"}}).tasks.items():
                for ex in read_examples(name, t, "train"):
                    texts.extend(_strings(ex.fields))
            build_tokenizer(texts, tok_dir, vocab_size=8000)
    else:
        assets = make_demo_assets(out / "demo", seed=seed, n_train=800, n_val=20, seq_len=seq_len)
        tasks = {k: v for k, v in yaml.safe_load(Path(assets.spec).read_text())["tasks"].items()}
        for t in tasks.values():
            for inp in t["inputs"].values():
                p = Path(inp["path"])
                inp["path"] = str(p if p.is_absolute() else (Path(assets.spec).parent / p).resolve())
            t["inputs"] = {"train": t["inputs"]["train"]}
        tok_dir = Path(assets.tokenizer)
    shards = out / "shards"
    raw = {"tasks": tasks, "model": {"name_or_path": str(out / "model")},
           "data": {"shards_dir": str(shards), "tokenizer": str(tok_dir), "seq_len": seq_len}}
    (out / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = config_from_dict(raw)
    if not (shards / "manifest.json").exists():
        build_shards(cfg, shards, tok_dir, workers=1, on_error="raise")
    manifest = load_manifest(shards)

    # one initialisation for every side
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(seed)
        mc = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=max(2048, seq_len),
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
        LlamaForCausalLM(mc).save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))

    # the same examples, as token ids, for the HF sides (truncated like megamt: prompt from the left)
    from datasets import Dataset

    rows = {"input_ids": [], "labels": []}
    for task in cfg.tasks:
        for path, _ in split_shards(manifest, shards, task, "train"):
            for s in read_shard(path):
                p, t = list(map(int, s["prompt_ids"])), list(map(int, s["target_ids"]))
                t = t[:seq_len - 1]
                p = p[max(0, len(p) - (seq_len - len(t))):]
                rows["input_ids"].append(p + t)
                rows["labels"].append([-100] * len(p) + t)
    ds = Dataset.from_dict(rows).shuffle(seed=seed)
    ds.save_to_disk(str(out / "hf_dataset"))
    lens = [len(x) for x in rows["input_ids"]]
    return {"spec": str(out / "spec.yaml"), "model": str(model_dir), "tokenizer": str(tok_dir),
            "hf_dataset": str(out / "hf_dataset"), "n_examples": len(lens),
            "mean_len": sum(lens) / len(lens), "tasks": list(cfg.tasks)}


def engine_zero_section(spec: str, rows: int) -> dict:
    """megamt's resolved ZeRO-3 section, reused literally by the HF sides."""
    from megamt.config import load_config
    from megamt.ds_config import load_template, resolve_ds_config

    cfg = load_config(spec, [f"train.micro_batch_size={rows}"])
    tpl, src = load_template("zero3")
    ds = resolve_ds_config(tpl, cfg, world_size=2, hidden_size=None, source=src)
    return ds["zero_optimization"]


# ----------------------------------------------------------------------------- HF / TRL workers


class _Meter:
    """Counts each batch's non-pad tokens as the collator builds it, and step end times."""

    def __init__(self, collate):
        self.collate, self.tokens, self.ends = collate, [], []

    def __call__(self, examples):
        self.tokens.append(sum(len(e["input_ids"]) for e in examples))
        return self.collate(examples)


def worker(side: str, args) -> None:
    import resource

    import torch
    import torch.distributed as dist
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    prep = json.loads(Path(args.out, "prep.json").read_text())
    tok = AutoTokenizer.from_pretrained(prep["tokenizer"])
    ds = load_from_disk(prep["hf_dataset"])
    zero = json.loads(Path(args.out, "zero.json").read_text())
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 10 ** 9,
                 "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": 1e-8,
                                                           "weight_decay": "auto"}},
                 "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                              "warmup_num_steps": "auto"}},
                 "zero_optimization": zero}
    common = dict(output_dir=str(Path(args.out, side)), max_steps=args.steps, learning_rate=args.lr,
                  lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
                  max_grad_norm=1.0, weight_decay=0.0, logging_steps=10 ** 6, save_strategy="no", report_to=[],
                  deepspeed=ds_config, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
                  use_cpu=not torch.cuda.is_available())
    model = AutoModelForCausalLM.from_pretrained(prep["model"], attn_implementation="sdpa")

    class Times(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            meter.ends.append(time.perf_counter())

    if side == "hf":
        from transformers import Trainer, TrainingArguments

        def pad_to_longest(examples):
            n = max(len(e["input_ids"]) for e in examples)
            ids = torch.full((len(examples), n), tok.pad_token_id, dtype=torch.long)
            lab = torch.full((len(examples), n), -100, dtype=torch.long)
            att = torch.zeros((len(examples), n), dtype=torch.long)
            for i, e in enumerate(examples):
                k = len(e["input_ids"])
                ids[i, :k], lab[i, :k], att[i, :k] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
            return {"input_ids": ids, "labels": lab, "attention_mask": att}

        meter = _Meter(pad_to_longest)
        targs = TrainingArguments(per_device_train_batch_size=args.hf_batch, remove_unused_columns=False, **common)
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=meter, callbacks=[Times()])
    else:
        from trl import SFTConfig, SFTTrainer

        # TRL turns activation checkpointing and bf16 on by default; megamt and the Trainer run
        # without checkpointing, in fp32 on CPUs (bf16 matmuls are emulated there: ~10x slower)
        targs = SFTConfig(per_device_train_batch_size=args.rows, packing=True, max_length=args.seq_len,
                          dataset_num_proc=None, gradient_checkpointing=False,
                          bf16=torch.cuda.is_available(), **common)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[Times()])
        meter = _Meter(trainer.data_collator)
        trainer.data_collator = meter
    trainer.train()
    w = args.warmup
    t = torch.tensor([float(sum(meter.tokens[w:args.steps])), meter.ends[-1] - meter.ends[w - 1],
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20])
    tokens = t.clone()
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    peak = t[2:].clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        res = {"side": side, "nonpad_tokens": float(tokens[0]), "seconds": float(t[1]),
               "nonpad_tokens_per_s": float(tokens[0] / t[1]), "peak_rss_gib": float(peak[0]),
               "steps_measured": args.steps - w}
        Path(args.out, f"result_{side}.json").write_text(json.dumps(res))


# ----------------------------------------------------------------------------- orchestration


def launch(cmd: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    print(f"  {' '.join(cmd[:6])} ... rc={rc} in {time.time() - t0:.0f}s (log {log})", file=sys.stderr)
    if rc != 0:
        raise SystemExit(f"bench_train: a side failed; see {log}:\n" + "".join(open(log).readlines()[-30:]))


def megamt_side(args, prep: dict) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(args.out, "megamt_run")
    ov = [f"train.run_dir={run_dir}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.rows}",
          f"train.lr={args.lr}", "train.lr_schedule=constant", "train.warmup_steps=0", "train.log_every=1",
          "train.save_every=0", "train.eval_every=0", "train.eval_batches=1", "train.progress_bar=false",
          f"train.seed={args.seed}", "mixture.strategy=proportional"]
    launch([DEEPSPEED, "--num_gpus", "2", "--module", "megamt.train", prep["spec"], *ov, "--no-resume"],
           Path(args.out, "megamt.log"), args.threads)
    tb = next(run_dir.glob("tensorboard/**/events.out.tfevents.*")).parent
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tps = {e.step: e.value for e in acc.Scalars("perf/tokens_per_s")}
    st = {e.step: e.value for e in acc.Scalars("perf/step_time_s")}
    steps = [s for s in sorted(st) if s > args.warmup]
    tokens = sum(tps[s] * st[s] for s in steps)
    secs = sum(st[s] for s in steps)
    peak = max(e.value for e in acc.Scalars("mem/peak_gib"))
    return {"side": "megamt", "nonpad_tokens": tokens, "seconds": secs, "nonpad_tokens_per_s": tokens / secs,
            "peak_rss_gib": peak, "steps_measured": len(steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["real", "demo"], default="real" if SHARED.is_dir() else "demo")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_train"))
    p.add_argument("--sides", default="megamt,hf,trl")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the rate")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=4, help="packed rows per rank per step (megamt, TRL)")
    p.add_argument("--hf-batch", type=int, default=0, help="padded examples per rank per step (0: same real tokens as a packed step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank, the same on every side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["hf", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return 0

    out = Path(args.out)
    prep = prepare(out, args.data, args.seq_len, args.hidden, args.layers, args.seed)
    (out / "prep.json").write_text(json.dumps(prep))
    (out / "zero.json").write_text(json.dumps(engine_zero_section(prep["spec"], args.rows)))
    if args.hf_batch == 0:  # as many examples as a packed step holds (~0.98 fill)
        args.hf_batch = max(1, round(args.rows * args.seq_len * 0.98 / prep["mean_len"]))
    print(f"bench_train: {prep['n_examples']} examples, mean {prep['mean_len']:.0f} tokens; "
          f"packed {args.rows}x{args.seq_len} per rank vs padded batches of {args.hf_batch}", file=sys.stderr)
    results = {}
    for side in args.sides.split(","):
        if side == "megamt":
            results[side] = megamt_side(args, prep)
        else:
            launch([DEEPSPEED, "--num_gpus", "2", str(Path(__file__).resolve()), "--worker", side,
                    *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                      if k in ("out", "steps", "warmup", "seq_len", "rows", "hf_batch", "lr", "seed")]],
                   out / f"{side}.log", args.threads)
            results[side] = json.loads((out / f"result_{side}.json").read_text())
        r = results[side]
        print(f"  {side:7s} {r['nonpad_tokens_per_s']:9.0f} non-pad tok/s   peak RSS/rank {r['peak_rss_gib']:.2f} GiB",
              file=sys.stderr)
    summary = {"bench": "train", "machine": os.environ.get("BENCH_MACHINE", "2-core CPU, 24 GiB, 2 DeepSpeed CPU ranks"),
               "data": args.data, "n_examples": prep["n_examples"], "mean_example_tokens": round(prep["mean_len"], 1),
               "seq_len": args.seq_len, "rows": args.rows, "hf_batch": args.hf_batch, "threads_per_rank": args.threads,
               "model": {"hidden": args.hidden, "layers": args.layers}, "steps": args.steps, "warmup": args.warmup,
               "results": results}
    if "megamt" in results:
        for other in ("hf", "trl"):
            if other in results:
                summary[f"ratio_megamt_vs_{other}"] = round(
                    results["megamt"]["nonpad_tokens_per_s"] / results[other]["nonpad_tokens_per_s"], 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
