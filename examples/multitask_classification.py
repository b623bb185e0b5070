"""Several classification tasks, a sentence-pair task among them, trained as one model (Python API).

    python examples/multitask_classification.py                    # one process
    deepspeed --num_gpus 2 examples/multitask_classification.py    # 2 ranks, ZeRO-3
    python examples/multitask_classification.py --model /models/Llama-3.2-1B --steps 500   # a real model

Tasks: SST-2 (sentiment, one sentence) and RTE (entailment, a sentence pair) from the real
samples when present (../shared/data or $MEGAMT_DATA), else the embedded demo corpus' sentiment
and NLI tasks. A causal LM learns each label's verbalisation ("positive", "yes" ...) after a
prompt template; evaluation is rank classification: the label whose verbalisation the model
finds most likely wins (so the model can never answer outside the label set).

Why temperature sampling: SST-2 has twice RTE's examples here (67k vs 2.5k in full GLUE);
sampling proportionally to size would starve RTE, uniform sampling would repeat it many times.
Rates proportional to size^(1/T), T=2, sit in between (printed at start-up).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def classification_tasks(args, rank: int) -> dict:
    """{name: TaskConfig}: the real GLUE samples, else the demo corpus' equivalents."""
    from megamt import InputConfig, TaskConfig

    n, n_eval = args.train_examples, args.eval_examples
    if _common.use_real_data(args.data, ["sst2", "rte"]):
        d = _common.SHARED
        return {
            "sst2": TaskConfig(task_type="classification", fields={"text": "sentence", "label": "label"},
                               inputs={"train": InputConfig(path=str(d / "sst2/train.tsv"), format="tsv", max_examples=n),
                                       "validation": InputConfig(path=str(d / "sst2/dev.tsv"), format="tsv",
                                                                 max_examples=n_eval)},
                               labels=["0", "1"], verbalizers={"0": "negative", "1": "positive"}),
            # RTE's sentences hold literal quotes: GLUE reads it with quoting off (the tsv default)
            "rte": TaskConfig(task_type="classification",
                              fields={"text": "sentence1", "text_pair": "sentence2", "label": "label"},
                              inputs={"train": InputConfig(path=str(d / "rte/train.tsv"), format="tsv", max_examples=n),
                                      "validation": InputConfig(path=str(d / "rte/dev.tsv"), format="tsv",
                                                                max_examples=n_eval)},
                              labels=["entailment", "not_entailment"],
                              verbalizers={"entailment": "yes", "not_entailment": "no"}),
        }
    from megamt.config import config_from_dict

    demo = _common.demo_tasks(Path(args.out), ["sentiment", "nli"], n, n_eval, write=rank == 0)
    return config_from_dict({"tasks": demo, "model": {"from_config": {"model_type": "llama"}}}).tasks


def main(argv: list[str] | None = None) -> int:
    args = _common.parser(__doc__.split("\n\n")[0], "runs/examples/classification", steps=40).parse_args(argv)
    from megamt import MultitaskConfig, MultitaskTrainer
    from megamt.config import DataConfig, ModelConfig, TrainConfig

    rank, world = _common.start()
    out = Path(args.out).resolve()
    tasks = classification_tasks(args, rank)
    tok = _common.tokenizer_dir(tasks, args, rank)
    config = MultitaskConfig(
        tasks=tasks,
        model=ModelConfig(**_common.model_section(args, tok, args.seq_len)),
        data=DataConfig(shards_dir=str(out / "shards"), tokenizer=str(tok), seq_len=args.seq_len),
        train=TrainConfig(run_dir=str(out / "run"), max_steps=args.steps, micro_batch_size=args.micro_batch,
                          lr=3e-3 if not args.model else 2e-5, warmup_steps=min(5, args.steps // 4),
                          log_every=max(1, args.steps // 4), eval_at_start=False, progress_bar=False,
                          ds_config=args.ds_config),
        task_sampling_strategy="temperature",   # alias of mixture.strategy
        loss_weighting_strategy="equal",        # alias of gradients.loss_weighting
    )
    _common.build_shards_once(config, rank)
    summary = MultitaskTrainer(None, config, resume=False).train()  # model=None: built under ZeRO-3's zero.Init
    model = _common.export_and_load(out / "run", out / "export", rank)
    _common.say(rank, f"validation after {summary['step']} steps on {world} rank(s) "
                      f"(rank classification over the verbalised labels):")
    model.evaluate(split="validation", max_examples=args.eval_examples, out_dir=out / "eval", progress=False)
    if rank == 0:
        print(f"\nreport: {out / 'eval' / 'eval.md'}; TensorBoard: tensorboard --logdir {out / 'run' / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
