"""Training throughput: megamt (packed, ZeRO-3) vs HF Trainer (padded) vs TRL SFTTrainer (packed).

All three sides run in one invocation, each through the real ``deepspeed --num_gpus 2``
launcher on the CPU, with:
  - the same tiny Llama (one initialisation, saved once and loaded by every side),
  - the same examples (megamt's shards: prompt + target token ids; the HF sides get the
    same ids with the prompt masked in ``labels``),
  - literally the same DeepSpeed ZeRO-3 engine: megamt's resolved ``zero_optimization`` and
    ``optimizer`` sections (resolved with the model's hidden size, as megamt's trainer does)
    are written into the HF sides' ds_config, and every rank of every side reports the
    sections its engine ran with and its basic optimizer's class (in the JSON; the run
    fails if they differ), and the same thread count per rank.

The metric is non-pad tokens (prompt and target) per second, summed over ranks, over the
steps after ``--warmup``; peak memory is the largest of the ranks' peaks (max-RSS on CPUs,
``torch.cuda.max_memory_allocated`` on GPUs), measured the same way on every side.

Not the same on every side, by design: megamt computes the LM head (the ``[tokens, H] x
[H, V]`` matmul, its softmax and both gradient matmuls) only on target positions (labels
!= -100; ``lm_head_token_fraction`` in the JSON), the HF sides on every position.

    python tools/bench_train.py                      # real samples from ../shared/data
    python tools/bench_train.py --data demo          # the embedded demo corpus
    python tools/bench_train.py --family seq2seq     # a tiny T5: megamt vs Seq2SeqTrainer

``--family seq2seq``: the same examples as prompt + EOS (encoder) and target (decoder, ending
with EOS); megamt packs both sides (``data.seq_len`` / ``data.target_len``), Hugging Face's
``Seq2SeqTrainer`` gets padded batches from ``DataCollatorForSeq2Seq``; the same tiny T5 (one
initialisation), the same engine sections (checked per rank as above); non-pad tokens counted
on both sides of the model (encoder + decoder). Its LM head runs on decoder positions only on
both sides (the padded side also on decoder padding).

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    n_target = 0
    for task in cfg.tasks:
        for path, _ in split_shards(manifest, shards, task, "train"):
            for s in read_shard(path):
                p, t = list(map(int, s["prompt_ids"])), list(map(int, s["target_ids"]))
                t = t[:seq_len - 1]
                p = p[max(0, len(p) - (seq_len - len(t))):]
                rows["input_ids"].append(p + t)
                rows["labels"].append([-100] * len(p) + t)
                n_target += len(t)
    ds = Dataset.from_dict(rows).shuffle(seed=seed)
    ds.save_to_disk(str(out / "hf_dataset"))
    lens = [len(x) for x in rows["input_ids"]]
    return {"spec": str(out / "spec.yaml"), "model": str(model_dir), "tokenizer": str(tok_dir),
            "hf_dataset": str(out / "hf_dataset"), "n_examples": len(lens),
            "mean_len": sum(lens) / len(lens), "tasks": list(cfg.tasks),
            # positions whose LM head megamt computes (targets) among all non-pad positions
            "target_fraction": n_target / sum(lens)}


def prepare_seq2seq(out: Path, data: str, seq_len: int, target_len: int, hidden: int, layers: int, seed: int) -> dict:
    """:func:`prepare`'s tokenizer and shards, plus one tiny T5 initialisation, a seq2seq spec
    for megamt and the same examples as (prompt + EOS, target) for the Hugging Face side, cut
    as megamt's packer cuts them (prompts keep their first token and end, targets their start)."""
    import torch
    import yaml
    from datasets import Dataset
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from megamt.config import load_config
    from megamt.data.packing import cut_prompt
    from megamt.data.shards import load_manifest, read_shard, split_shards

    base = prepare(out, data, seq_len, hidden, layers, seed)
    tok = AutoTokenizer.from_pretrained(base["tokenizer"])
    model_dir = out / "t5"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(seed)
        heads = max(1, hidden // 64)
        mc = T5Config(vocab_size=len(tok), d_model=hidden, d_kv=hidden // heads, d_ff=hidden * 8 // 3 // 8 * 8,
                      num_layers=layers, num_heads=heads, dropout_rate=0.0, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
        T5ForConditionalGeneration(mc).save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
    raw = yaml.safe_load(Path(base["spec"]).read_text())
    raw["model"] = {"name_or_path": str(model_dir)}
    raw["data"]["target_len"] = target_len
    spec = out / "spec_seq2seq.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(spec)
    manifest = load_manifest(cfg.data.shards_dir)
    rows = {"input_ids": [], "labels": []}
    for task in cfg.tasks:
        for path, _ in split_shards(manifest, cfg.data.shards_dir, task, "train"):
            for s in read_shard(path):
                p = [int(x) for x in s["prompt_ids"]] + [tok.eos_token_id]
                rows["input_ids"].append([int(x) for x in cut_prompt(p, seq_len)])
                rows["labels"].append([int(x) for x in s["target_ids"]][:target_len])
    Dataset.from_dict(rows).shuffle(seed=seed).save_to_disk(str(out / "hf_dataset_seq2seq"))
    enc, dec = sum(map(len, rows["input_ids"])), sum(map(len, rows["labels"]))
    n = len(rows["input_ids"])
    return {**base, "spec": str(spec), "model": str(model_dir), "hf_dataset": str(out / "hf_dataset_seq2seq"),
            "mean_len": (enc + dec) / n, "mean_encoder_len": enc / n, "mean_decoder_len": dec / n,
            # the LM head runs on decoder positions: their share of the non-pad tokens
            "target_fraction": dec / (enc + dec)}


def engine_sections(spec: str, rows: int, hidden: int) -> dict:
    """The engine sections of megamt's resolved ds_config (what its trainer builds for this
    model: ``hidden_size`` sizes the ZeRO buckets), given literally to the HF sides."""
    from megamt.config import load_config
    from megamt.ds_config import build_ds_config
    from megamt.model import resolve_dtype

    cfg = load_config(spec, [f"train.micro_batch_size={rows}"])
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(resolve_dtype(cfg.model))]
    ds = build_ds_config(cfg, world_size=2, hidden_size=hidden, dtype=dtype)
    return {k: ds[k] for k in ("zero_optimization", "optimizer", "gradient_clipping")}


def peak_gib() -> float:
    """This rank's peak memory: device memory on CUDA, max resident set on the CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_rank_report(out: str, side: str, engine) -> None:
    """Each rank: its peak memory and what its DeepSpeed engine ran with."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the basic optimizer
    params = engine._config._param_dict
    rank = int(os.environ.get("RANK", "0"))
    Path(out, f"rank_{side}_{rank}.json").write_text(json.dumps({
        "peak_gib": peak_gib(), "zero_optimization": params.get("zero_optimization"),
        "optimizer": params.get("optimizer"), "gradient_clipping": params.get("gradient_clipping"),
        "optimizer_class": f"{type(inner).__module__}.{type(inner).__name__}"}, default=str))


def rank_reports(out: Path, side: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"rank_{side}_*.json"))]


# ----------------------------------------------------------------------------- HF / TRL workers


class _Meter:
    """Counts each batch's non-pad tokens as the collator builds it (``count``: one example's
    tokens), and step end times."""

    def __init__(self, collate, count=lambda e: len(e["input_ids"])):
        self.collate, self.count, self.tokens, self.ends = collate, count, [], []

    def __call__(self, examples):
        self.tokens.append(sum(self.count(e) for e in examples))
        return self.collate(examples)


def hf_setup(side: str, args) -> tuple[dict, Any, Any, dict]:
    """What every Hugging Face side shares: (prep, tokenizer, dataset, the training-arguments
    keywords with a ds_config around megamt's engine sections, literally)."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    prep = json.loads(Path(args.out, "prep.json").read_text())
    tok = AutoTokenizer.from_pretrained(prep["tokenizer"])
    ds = load_from_disk(prep["hf_dataset"])
    engine = json.loads(Path(args.out, "engine.json").read_text())
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto", "steps_per_print": 10 ** 9,
                 "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                              "warmup_num_steps": "auto"}},
                 **engine}  # megamt's zero_optimization, optimizer and gradient_clipping, literally
    # the Trainer checks that literal ds_config values agree with its arguments: derive them
    opt = engine["optimizer"]["params"]
    common = dict(output_dir=str(Path(args.out, side)), max_steps=args.steps, learning_rate=opt["lr"],
                  lr_scheduler_type="constant", warmup_steps=0, adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1],
                  adam_epsilon=opt["eps"], max_grad_norm=engine["gradient_clipping"], weight_decay=opt["weight_decay"],
                  logging_steps=10 ** 6, save_strategy="no", report_to=[],
                  deepspeed=ds_config, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
                  use_cpu=not torch.cuda.is_available())
    return prep, tok, ds, common


def step_times(meter: _Meter) -> Any:
    """A callback that records the end time of every optimizer step into ``meter.ends``."""
    from transformers import TrainerCallback

    class Times(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            meter.ends.append(time.perf_counter())

    return Times()


def train_and_report(side: str, trainer, meter: _Meter, args) -> None:
    """Train; every rank writes its report; rank 0 writes the non-pad tokens/s over the steps
    after ``--warmup`` (summed over ranks) to ``result_<side>.json``."""
    import torch
    import torch.distributed as dist

    trainer.train()
    write_rank_report(args.out, side, trainer.model_wrapped)  # the DeepSpeed engine after train()
    w = args.warmup
    t = torch.tensor([float(sum(meter.tokens[w:args.steps])), meter.ends[-1] - meter.ends[w - 1]])
    tokens = t.clone()
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    if dist.get_rank() == 0:
        res = {"side": side, "nonpad_tokens": float(tokens[0]), "seconds": float(t[1]),
               "nonpad_tokens_per_s": float(tokens[0] / t[1]), "steps_measured": args.steps - w}
        Path(args.out, f"result_{side}.json").write_text(json.dumps(res))


def worker(side: str, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    prep, tok, ds, common = hf_setup(side, args)
    model = AutoModelForCausalLM.from_pretrained(prep["model"], attn_implementation="sdpa")

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
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=meter, callbacks=[step_times(meter)])
    else:
        from trl import SFTConfig, SFTTrainer

        # TRL turns activation checkpointing and bf16 on by default; megamt and the Trainer run
        # without checkpointing, in fp32 on CPUs (bf16 matmuls are emulated there: ~10x slower)
        targs = SFTConfig(per_device_train_batch_size=args.rows, packing=True, max_length=args.seq_len,
                          dataset_num_proc=None, gradient_checkpointing=False,
                          bf16=torch.cuda.is_available(), **common)
        meter = _Meter(None)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok,
                             callbacks=[step_times(meter)])
        meter.collate = trainer.data_collator
        trainer.data_collator = meter
    train_and_report(side, trainer, meter, args)


def worker_seq2seq(args) -> None:
    """Hugging Face ``Seq2SeqTrainer`` + ``DataCollatorForSeq2Seq`` (padded batches) + megamt's engine."""
    from transformers import (AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments)

    prep, tok, ds, common = hf_setup("hf_seq2seq", args)
    model = AutoModelForSeq2SeqLM.from_pretrained(prep["model"])
    meter = _Meter(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100),
                   count=lambda e: len(e["input_ids"]) + len(e["labels"]))  # both sides of the model
    targs = Seq2SeqTrainingArguments(per_device_train_batch_size=args.hf_batch, remove_unused_columns=False, **common)
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=ds, data_collator=meter,
                             callbacks=[step_times(meter)])
    train_and_report("hf_seq2seq", trainer, meter, args)


def megamt_worker(args) -> None:
    """megamt's trainer, as `megamt.train` runs it, plus the rank report."""
    from megamt.config import load_config
    from megamt.trainer import MultitaskTrainer

    prep = json.loads(Path(args.out, "prep.json").read_text())
    trainer = MultitaskTrainer(None, load_config(prep["spec"], megamt_overrides(args)), resume=False)
    trainer.train()
    write_rank_report(args.out, "megamt", trainer.engine)


# ----------------------------------------------------------------------------- orchestration


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    print(f"  {' '.join(cmd[:6])} ... rc={rc} in {time.time() - t0:.0f}s (log {log})", file=sys.stderr)
    if rc != 0:
        raise SystemExit(f"bench_train: a side failed; see {log}:\n" + "".join(open(log).readlines()[-30:]))


def megamt_overrides(args) -> list[str]:
    return [f"train.run_dir={Path(args.out, 'megamt_run')}", f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.rows}", f"train.lr={args.lr}", "train.lr_schedule=constant",
            "train.warmup_steps=0", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
            "train.eval_at_start=false", "train.eval_batches=1", "train.progress_bar=false", f"train.seed={args.seed}",
            "mixture.strategy=proportional"]


def megamt_side(args) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(args.out, "megamt_run")
    tb = next(run_dir.glob("tensorboard/**/events.out.tfevents.*")).parent
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tps = {e.step: e.value for e in acc.Scalars("perf/tokens_per_s")}
    st = {e.step: e.value for e in acc.Scalars("perf/step_time_s")}
    steps = [s for s in sorted(st) if s > args.warmup]
    tokens = sum(tps[s] * st[s] for s in steps)
    secs = sum(st[s] for s in steps)
    return {"side": "megamt", "nonpad_tokens": tokens, "seconds": secs, "nonpad_tokens_per_s": tokens / secs,
            "steps_measured": len(steps)}


def check_same_engine(out: Path, sides: list[str], engine: dict) -> dict:
    """Every rank of every side ran literally megamt's engine sections and the same optimizer
    class; returns that class. Raises naming the side, rank and section otherwise."""
    classes = set()
    for side in sides:
        reports = rank_reports(out, side)
        if len(reports) != 2:
            raise SystemExit(f"bench_train: {side}: {len(reports)} rank reports in {out}, expected 2")
        for rank, rep in enumerate(reports):
            for key, want in engine.items():
                if rep[key] != want:
                    raise SystemExit(f"bench_train: {side} rank {rank} ran {key}={rep[key]!r}, not megamt's {want!r}")
            classes.add(rep["optimizer_class"])
    if len(classes) != 1:
        raise SystemExit(f"bench_train: the sides ran different optimizers: {sorted(classes)}")
    return {"optimizer_class": classes.pop()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["real", "demo"], default="real" if SHARED.is_dir() else "demo")
    p.add_argument("--family", choices=["causal_lm", "seq2seq"], default="causal_lm",
                   help="causal_lm: a tiny Llama vs Trainer / SFTTrainer; seq2seq: a tiny T5 vs Seq2SeqTrainer")
    p.add_argument("--out", default=None, help="default runs/bench_train (seq2seq: runs/bench_train_seq2seq)")
    p.add_argument("--sides", default=None, help="default megamt,hf,trl (seq2seq: megamt,hf_seq2seq)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the rate")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row (seq2seq: the encoder's)")
    p.add_argument("--target-len", type=int, default=128, help="seq2seq: decoder tokens per packed row")
    p.add_argument("--rows", type=int, default=4, help="packed rows per rank per step (megamt, TRL)")
    p.add_argument("--hf-batch", type=int, default=0, help="padded examples per rank per step (0: same real tokens as a packed step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank, the same on every side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["megamt", "hf", "trl", "hf_seq2seq"], help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    seq2seq = args.family == "seq2seq"
    args.out = args.out or str(REPO / "runs" / ("bench_train_seq2seq" if seq2seq else "bench_train"))
    args.sides = args.sides or ("megamt,hf_seq2seq" if seq2seq else "megamt,hf,trl")
    if args.worker == "megamt":
        megamt_worker(args)
    elif args.worker == "hf_seq2seq":
        worker_seq2seq(args)
    elif args.worker:
        worker(args.worker, args)
    if args.worker:
        from megamt import comm

        comm.leave_at_exit()  # every side exits through comm.exit_process
        comm.leave()  # every side: gloo threads alive at exit abort a finished rank
        return 0

    out = Path(args.out)
    if seq2seq:
        prep = prepare_seq2seq(out, args.data, args.seq_len, args.target_len, args.hidden, args.layers, args.seed)
    else:
        prep = prepare(out, args.data, args.seq_len, args.hidden, args.layers, args.seed)
    (out / "prep.json").write_text(json.dumps(prep))
    engine = engine_sections(prep["spec"], args.rows, args.hidden)
    (out / "engine.json").write_text(json.dumps(engine))
    for old in out.glob("rank_*.json"):
        old.unlink()
    if args.hf_batch == 0:  # as many examples as a packed step holds (~0.98 fill; seq2seq: of the encoder rows)
        args.hf_batch = max(1, round(args.rows * args.seq_len * 0.98 / prep.get("mean_encoder_len", prep["mean_len"])))
    print(f"bench_train: {prep['n_examples']} examples, mean {prep['mean_len']:.0f} tokens; "
          f"packed {args.rows}x{args.seq_len}{f'+{args.target_len}' if seq2seq else ''} per rank vs padded batches of {args.hf_batch}", file=sys.stderr)
    results = {}
    sides = args.sides.split(",")
    shutil.rmtree(out / "megamt_run", ignore_errors=True)  # a fresh run: its TensorBoard file is read back
    for side in sides:
        launch([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(Path(__file__).resolve()),
                "--worker", side, *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                    if k in ("out", "steps", "warmup", "seq_len", "rows", "hf_batch", "lr", "seed", "family")]],
               out / f"{side}.log", args.threads)
        results[side] = megamt_side(args) if side == "megamt" else json.loads((out / f"result_{side}.json").read_text())
        r = results[side]
        r["peak_gib_max_over_ranks"] = max(rep["peak_gib"] for rep in rank_reports(out, side))
        print(f"  {side:7s} {r['nonpad_tokens_per_s']:9.0f} non-pad tok/s   peak/rank (max) {r['peak_gib_max_over_ranks']:.2f} GiB",
              file=sys.stderr)
    same = check_same_engine(out, sides, engine)
    summary = {"bench": "train", "machine": os.environ.get("BENCH_MACHINE", "2-core CPU, 24 GiB, 2 DeepSpeed CPU ranks"),
               "family": args.family, "data": args.data, "n_examples": prep["n_examples"], "mean_example_tokens": round(prep["mean_len"], 1),
               "seq_len": args.seq_len, **({"target_len": args.target_len} if seq2seq else {}), "rows": args.rows, "hf_batch": args.hf_batch, "threads_per_rank": args.threads,
               "model": {"hidden": args.hidden, "layers": args.layers}, "steps": args.steps, "warmup": args.warmup,
               "lm_head_token_fraction": round(prep["target_fraction"], 4),
               "engine": {**engine, **same, "same_on_every_side_and_rank": True},
               "peak_memory": "max over ranks of max-RSS (CPU) / torch.cuda.max_memory_allocated (GPU)",
               "results": results}
    if "megamt" in results:
        for other in ("hf", "trl", "hf_seq2seq"):
            if other in results:
                summary[f"ratio_megamt_vs_{other}"] = round(
                    results["megamt"]["nonpad_tokens_per_s"] / results[other]["nonpad_tokens_per_s"], 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from megamt import comm

    comm.exit_process(main())  # a worker rank: see comm.exit_process
