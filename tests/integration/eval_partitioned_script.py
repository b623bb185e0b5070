"""Run under ``deepspeed --num_gpus 2``: evaluation through the ZeRO-3 partitioned model vs
evaluation of a plain copy of its weights (``gather_plain_copy``, the path megamt used
before), for a causal LM (rank classification + generation), an encoder with heads and an
encoder-decoder (T5: decoder scores + beam search, the whole ``generate`` inside one forward of
the partitioned root, ``synced_gpus`` over the ranks).

For each family: a training engine like the trainer's (``zero.Init`` through
``HfDeepSpeedConfig``, AdamW); evaluate (a) a plain copy, (b) ``engine.module`` itself,
(c) the model ``megamt eval`` builds from a checkpoint of that engine
(``load_partitioned_model``: optimizer-free ZeRO-3 engine, weights copied in by rank 0).
5 examples per task over 2 ranks and batches of 2: the ranks hold 3 and 2 examples, so the
lockstep's stand-in rounds run. Rank 0 writes every prediction file's lines and the
metrics as JSON to ``argv[2]``. argv[1]: the demo assets' root.
"""

import json
import sys
from pathlib import Path

import torch

from megamt import comm
from megamt.config import load_config
from megamt.trainer import setup_distributed

EVAL = {"max_examples": 5, "max_new_tokens": 4, "batch_size": 2, "progress": False}


def family_config(root: Path, family: str):
    spec = root / "spec.yaml"
    if family == "causal":
        return load_config(spec, ["model.fused_loss=false"])
    from megamt.data.tokenize import load_tokenizer, special_ids

    tok = load_tokenizer(root / "tokenizer")
    vocab = len(tok)
    if family == "seq2seq":  # a tiny T5; generation by beam search (synced over the ranks)
        ids = special_ids(tok)
        t5 = {"model_type": "t5", "vocab_size": vocab, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
              "num_heads": 4, "relative_attention_num_buckets": 8, "dropout_rate": 0.0,
              "decoder_start_token_id": ids["pad"], "pad_token_id": ids["pad"], "eos_token_id": ids["eos"]}
        return load_config(spec, ["model.family=auto", "model.from_config=" + json.dumps(t5), "eval.num_beams=2"])
    cfg = load_config(spec, [
        "model.family=encoder", "model.from_config={model_type: bert, vocab_size: %d, hidden_size: 32, "
        "num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 128}" % vocab])
    for t in ("summ", "instruct"):
        del cfg.tasks[t]
    return cfg


def training_engine(cfg):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from megamt.ds_config import build_ds_config, hidden_size_of
    from megamt.model import MultitaskModel, hf_config

    ds = build_ds_config(cfg, comm.world_size(), hidden_size=hidden_size_of(hf_config(cfg.model)))
    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    torch.manual_seed(0)
    model = MultitaskModel(cfg)
    unset_hf_deepspeed_config()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
    return engine


def predictions(folder: Path) -> dict:
    return {f.stem: f.read_text().splitlines() for f in sorted((folder / "predictions").glob("*.jsonl"))}


def main(root: Path, out_json: Path) -> None:
    from megamt.eval.api import evaluate, gather_plain_copy
    from megamt.eval.evaluate import load_partitioned_model

    setup_distributed(600)
    work = out_json.parent
    report = {}
    for family in ("causal", "encoder", "seq2seq"):
        cfg = family_config(root, family)
        engine = training_engine(cfg)
        runs = {}
        plain = gather_plain_copy(engine.module, cfg)
        assert not any(hasattr(p, "ds_id") for p in plain.parameters())
        runs["plain"] = evaluate(plain, config=cfg, out_dir=work / family / "plain", **EVAL)
        del plain
        runs["partitioned"] = evaluate(engine.module, config=cfg, out_dir=work / family / "partitioned", **EVAL)
        # a megamt checkpoint of this engine, evaluated the way `megamt eval` loads it
        ckpt = work / family / "checkpoints"
        engine.save_checkpoint(str(ckpt), tag="step_00000000")
        if comm.rank() == 0:
            (ckpt / "step_00000000" / "megamt_config.yaml").write_text(cfg.to_yaml())
        comm.barrier()
        loaded = load_partitioned_model(ckpt)
        assert all(hasattr(p, "ds_id") for p in loaded.parameters())
        runs["checkpoint"] = evaluate(loaded, config=cfg, out_dir=work / family / "checkpoint", **EVAL)
        report[family] = {name: {"metrics": {t: e["metrics"] for t, e in r["tasks"].items()},
                                 "predictions": predictions(work / family / name)} for name, r in runs.items()}
    if comm.rank() == 0:
        out_json.write_text(json.dumps(report, indent=1))
    comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    main(Path(args[0]), Path(args[1]))
