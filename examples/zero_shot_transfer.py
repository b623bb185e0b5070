"""Zero-shot transfer: train on some tasks, export, reload, evaluate on a task never trained on.

    python examples/zero_shot_transfer.py                    # one process
    deepspeed --num_gpus 2 examples/zero_shot_transfer.py    # 2 ranks, ZeRO-3
    python examples/zero_shot_transfer.py --model /models/Llama-3.2-1B --steps 2000 --train-examples 5000

1. a multitask model learns sentiment, QA and NER (SST-2, SQuAD, CoNLL-2003 from the real
   samples when present; else the demo corpus' sentiment, qa and ner) but never sees NLI;
2. rank 0 exports it to a Hugging Face folder (``megamt export``) and every rank reloads it
   with ``MultitaskModel.from_pretrained``;
3. ``evaluate_zero_shot`` scores it on RTE (demo: nli) given only the task's records, its
   labels and how to say them ("yes" / "no"): rank classification over the verbalised labels,
   with every fitting prompt template (mean ± std: a zero-shot score that moves by 20 points
   between paraphrased prompts is a property of the prompt, not of the model);
4. a supervised reference: the same model size trained on NLI alone for the same steps; the
   ratio zero-shot / supervised is the T0/FLAN way to report transfer.

With the tiny default model the zero-shot score sits near chance: zero-shot transfer needs a
model that already reads instructions (a pretrained LM, ``--model``). The script shows the
procedure and measures it honestly at any size.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def tasks_and_held_out(args, rank: int) -> tuple[dict, str, dict]:
    """(training tasks as config dicts, the held-out task's name, its evaluation arguments)."""
    n, n_eval = args.train_examples, args.eval_examples
    if _common.use_real_data(args.data, ["sst2", "rte", "squad_v1.1", "conll2003"]):
        d = _common.SHARED
        train = {
            "sst2": {"task_type": "classification", "fields": {"text": "sentence", "label": "label"},
                     "labels": ["0", "1"], "verbalizers": {"0": "negative", "1": "positive"},
                     "inputs": {"train": {"path": str(d / "sst2/train.tsv"), "format": "tsv", "max_examples": n}}},
            "squad": {"task_type": "extractive_qa",
                      "inputs": {"train": {"path": str(d / "squad_v1.1/dev-v1.1.json"), "max_examples": n}}},
            "conll": {"task_type": "ner",
                      "inputs": {"train": {"path": str(d / "conll2003/eng.train"), "format": "conll",
                                           "max_examples": n}}},
        }
        held = {"path": str(d / "rte/dev.tsv"), "format": "tsv",
                "fields": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
                "supervised_train": {"path": str(d / "rte/train.tsv"), "format": "tsv", "max_examples": n}}
        return train, "rte", held
    demo = _common.demo_tasks(Path(args.out), ["sentiment", "qa", "ner", "nli"], n, n_eval, write=rank == 0)
    nli = demo.pop("nli")
    held = {**nli["inputs"]["validation"], "fields": nli["fields"], "supervised_train": nli["inputs"]["train"]}
    for t in demo.values():
        t["inputs"] = {"train": t["inputs"]["train"]}
    return demo, "nli", held


def train_and_export(config, out: Path, rank: int):
    from megamt import MultitaskTrainer

    _common.build_shards_once(config, rank)
    MultitaskTrainer(None, config, resume=False).train()
    return _common.export_and_load(Path(config.train.run_dir), out, rank)


def main(argv: list[str] | None = None) -> int:
    ap = _common.parser(__doc__.split("\n\n")[0], "runs/examples/zero_shot", steps=40)
    ap.add_argument("--no-supervised", action="store_true", help="skip the supervised reference model")
    args = ap.parse_args(argv)
    from megamt.config import config_from_dict

    rank, world = _common.start()
    out = Path(args.out).resolve()
    train_tasks, held_name, held = tasks_and_held_out(args, rank)
    labels, verbalizers = ["entailment", "not_entailment"], {"entailment": "yes", "not_entailment": "no"}
    test = {k: v for k, v in held.items() if k not in ("fields", "supervised_train")}   # an InputConfig
    supervised_task = {"task_type": "classification", "fields": held["fields"], "labels": labels,
                       "verbalizers": verbalizers, "inputs": {"train": held["supervised_train"], "validation": test}}
    # one tokenizer for both models, so the supervised reference differs only in its data
    tok = _common.tokenizer_dir({**train_tasks, held_name: supervised_task}, args, rank)

    def spec(tasks: dict, name: str) -> dict:
        return {"tasks": tasks, "model": _common.model_section(args, tok, args.seq_len),
                "data": {"shards_dir": str(out / name / "shards"), "tokenizer": str(tok), "seq_len": args.seq_len},
                "train": {"run_dir": str(out / name / "run"), "max_steps": args.steps,
                          "micro_batch_size": args.micro_batch, "lr": 3e-3 if not args.model else 2e-5,
                          "warmup_steps": min(5, args.steps // 4), "log_every": max(1, args.steps // 4),
                          "eval_at_start": False, "progress_bar": False, "ds_config": args.ds_config}}

    model = train_and_export(config_from_dict(spec(train_tasks, "multitask")), out / "multitask" / "export", rank)

    supervised = None
    if not args.no_supervised:
        reference = train_and_export(config_from_dict(spec({held_name: supervised_task}, "supervised")),
                                     out / "supervised" / "export", rank)
        sup = reference.evaluate(split="validation", max_examples=args.eval_examples, progress=False,
                                 out_dir=out / "supervised" / "eval")
        supervised = {held_name: sup["tasks"][held_name]["metrics"]}

    from megamt.config import InputConfig

    _common.say(rank, f"zero-shot: {held_name} never trained on ({world} rank(s), every fitting template):")
    results = model.evaluate_zero_shot(
        task_name=held_name, test_dataset=InputConfig(**test),
        task_type="classification", labels=labels, verbalizers=verbalizers, fields=held["fields"],
        max_examples=args.eval_examples, all_templates=True, supervised=supervised, progress=False,
        out_dir=out / "multitask" / "eval")
    if rank == 0:
        entry = results["tasks"][held_name]
        for metric, spread in entry.get("template_spread", {}).items():
            print(f"  {metric} over {len(entry['per_template'])} templates: {entry['metrics'][metric]:.1f} "
                  f"± {spread['std']:.1f} (min {spread['min']:.1f}, max {spread['max']:.1f})")
        for metric, ratio in entry.get("ratio", {}).items():
            print(f"  {metric} zero-shot / supervised: {ratio:.2f} (supervised {entry['supervised'][metric]:.1f})")
        print(f"\nreport: {out / 'multitask' / 'eval' / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
