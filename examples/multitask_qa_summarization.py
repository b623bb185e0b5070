"""Extractive QA and summarization in one model, from the same spec the CLI reads.

    python examples/multitask_qa_summarization.py                    # one process
    deepspeed --num_gpus 2 examples/multitask_qa_summarization.py    # 2 ranks, ZeRO-3
    python examples/multitask_qa_summarization.py --print-spec       # the YAML, and the CLI commands

The script writes OUT/spec.yaml and then does, in Python, exactly what these commands do:

    megamt build-shards OUT/spec.yaml
    deepspeed --num_gpus 2 --module megamt.train OUT/spec.yaml
    megamt export OUT/run OUT/export
    megamt eval OUT/export OUT/eval.yaml      # eval.yaml: the spec's eval section

Tasks: SQuAD v1.1 (extractive QA, scored by SQuAD exact match / F1 on the source's answers)
and DialogSum (dialogue summarization, ROUGE) from the real samples when present, else the
demo corpus' qa and summ tasks. Both are text-to-text for a causal LM: the answer or the
summary is the target after a prompt template, predicted at evaluation by greedy generation.

Why the long-document task gets a cap: summaries' inputs are several times longer than QA
contexts, so with proportional sampling (by examples) the packed token budget would still
favour summarization; `capped` (T5's examples-proportional mixing with a cap K) keeps a large
task from drowning the other one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def split_squad(src: Path, out: Path) -> tuple[Path, Path]:
    """The samples hold SQuAD's dev file only (two articles): the first article trains, the
    second evaluates, so no evaluated question's paragraph was seen in training."""
    import json

    doc = json.loads(src.read_text(encoding="utf-8"))
    paths = out / "squad_train.json", out / "squad_validation.json"
    if not all(p.is_file() for p in paths):
        out.mkdir(parents=True, exist_ok=True)
        for path, articles in zip(paths, (doc["data"][:1], doc["data"][1:])):
            path.write_text(json.dumps({"data": articles, "version": doc.get("version", "1.1")}), encoding="utf-8")
    return paths


def qa_summarization_tasks(args, rank: int = 0) -> dict:
    """The ``tasks:`` section of the spec (plain dicts: what the YAML holds)."""
    n, n_eval = args.train_examples, args.eval_examples
    if _common.use_real_data(args.data, ["squad_v1.1", "dialogsum"]):
        d = _common.SHARED
        out = Path(args.out).resolve() / "data"
        if rank == 0:
            split_squad(d / "squad_v1.1/dev-v1.1.json", out)
        return {
            "squad": {"task_type": "extractive_qa", "inputs": {
                "train": {"path": str(out / "squad_train.json"), "format": "squad", "max_examples": n},
                "validation": {"path": str(out / "squad_validation.json"), "format": "squad",
                               "max_examples": n_eval}}},
            "dialogsum": {"task_type": "summarization", "fields": {"document": "dialogue", "summary": "summary"},
                          "inputs": {"train": {"path": str(d / "dialogsum/dialogsum.train.jsonl"), "max_examples": n},
                                     "validation": {"path": str(d / "dialogsum/dialogsum.dev.jsonl"),
                                                    "max_examples": n_eval}}},
        }
    return _common.demo_tasks(Path(args.out), ["qa", "summ"], n, n_eval, write=rank == 0)


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(__doc__.split("\n\n")[0], "runs/examples/qa_summarization", steps=40)
    ap.add_argument("--print-spec", action="store_true", help="print the spec YAML and the CLI commands, then exit")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    rank, world = (0, 1) if args.print_spec else _common.start()
    tasks = qa_summarization_tasks(args, rank)   # rank 0 writes data files; the tokenizer's barrier orders them
    spec = {
        "tasks": tasks,
        "data": {"shards_dir": str(out / "shards"), "tokenizer": str(out / "tokenizer"), "seq_len": args.seq_len,
                 "overlong": "truncate"},
        "mixture": {"strategy": "capped", "cap": max(1, args.train_examples // 2)},
        "train": {"run_dir": str(out / "run"), "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                  "lr": 3e-3 if not args.model else 2e-5, "warmup_steps": min(5, args.steps // 4),
                  "log_every": max(1, args.steps // 4), "eval_at_start": False, "progress_bar": False,
                  "ds_config": args.ds_config},
        "eval": {"max_new_tokens": 48, "max_examples": args.eval_examples},
    }
    if args.print_spec:
        print(yaml.safe_dump(spec, sort_keys=False))
        print("\n\n".join(__doc__.split("\n\n")[2:4]))
        return 0

    from megamt.config import config_from_dict

    tok = _common.tokenizer_dir(tasks, args, rank)
    spec["data"]["tokenizer"] = str(tok)
    spec["model"] = _common.model_section(args, tok, args.seq_len)
    if rank == 0:
        (out / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))   # what `megamt train` would read
        (out / "eval.yaml").write_text(yaml.safe_dump(spec["eval"]))            # what `megamt eval` would read
    config = config_from_dict(spec)
    _common.build_shards_once(config, rank)                                   # megamt build-shards

    from megamt import MultitaskTrainer

    summary = MultitaskTrainer(None, config, resume=False).train()            # megamt train
    model = _common.export_and_load(out / "run", out / "export", rank)        # megamt export
    _common.say(rank, f"validation after {summary['step']} steps on {world} rank(s) "
                      f"(greedy generation; SQuAD exact match / F1, ROUGE):")
    model.evaluate(out_dir=out / "eval", progress=False)                    # megamt eval
    if rank == 0:
        print(f"\nspec: {out / 'spec.yaml'}; report: {out / 'eval' / 'eval.md'}; predictions: {out / 'eval' / 'predictions'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
