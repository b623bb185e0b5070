"""Worker of test_train_seq2seq.py::test_seq2seq_zero3_gathers_each_parameter_once: a tiny T5
or BART (tied embeddings: one matrix for the encoder's and decoder's embeddings and the LM head)
built under ``zero.Init``, one packed forward + backward through a ZeRO-3 engine (one CPU
rank), every ZeRO all-gather recorded per parameter. Writes JSON: per parameter name the
number of gathers in the forward and in the backward, and how often the encoder ran."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


MODELS = {
    "t5": {"model_type": "t5", "vocab_size": 61, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
           "num_heads": 4, "dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1},
    "bart": {"model_type": "bart", "vocab_size": 61, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48,
             "decoder_ffn_dim": 48, "max_position_embeddings": 64, "dropout": 0.0, "decoder_start_token_id": 1,
             "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "forced_eos_token_id": None},
}


def main(kind: str, out: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    import deepspeed
    import numpy as np
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from megamt.config import ModelConfig, MultitaskConfig, TaskConfig, TrainConfig
    from megamt.data.packing import PackItem, Seq2SeqPacker, collate_seq2seq_rows
    from megamt.ds_config import build_ds_config
    from megamt.losses import count_targets, step_loss
    from megamt.model import MultitaskModel
    from megamt.trainer import release_cpu_shm_at_exit

    torch.set_num_threads(1)
    deepspeed.init_distributed()
    from megamt import comm
    comm.leave_at_exit()  # gloo threads alive at exit abort a finished rank
    release_cpu_shm_at_exit(0)
    fc = MODELS[kind]
    cfg = MultitaskConfig(tasks={n: TaskConfig() for n in "ab"}, model=ModelConfig(from_config=fc),
                          train=TrainConfig(micro_batch_size=2, warmup_steps=0))
    ds = build_ds_config(cfg, 1, hidden_size=32)
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (zero.Init while building)
    model = MultitaskModel(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    names = {id(p): n for n, p in model.named_parameters()}
    phase = {"now": "forward"}
    counts: dict[str, dict[str, int]] = {n: {"forward": 0, "backward": 0} for n in names.values()}
    for p in model.parameters():
        original = p.all_gather_coalesced

        def counted(params, *a, _original=original, **kw):
            for q in params:
                counts[names[id(q)]][phase["now"]] += 1
            return _original(params, *a, **kw)

        p.all_gather_coalesced = counted
    rng = np.random.default_rng(0)
    packer = Seq2SeqPacker(24, 10, buffer_size=8)
    for i in range(8):
        packer.add(PackItem(np.append(rng.integers(3, 61, rng.integers(2, 8)), 1), i % 2,
                            dec=np.append(rng.integers(3, 61, rng.integers(0, 3)), 1)))
    batch = collate_seq2seq_rows([packer.pop_row(), packer.pop_row()], 24, 10, 0)
    n = count_targets(batch["labels"], batch["task_ids"], 2)
    encoder_calls = []
    model.backbone.get_encoder().register_forward_hook(lambda *a: encoder_calls.append(1))
    tl = engine(batch)
    phase["now"] = "backward"
    engine.backward(step_loss(tl, n, torch.ones(2), 1, 1))
    tied = [n for n, p in model.named_parameters() if p is model.backbone.get_output_embeddings().weight]
    Path(out).write_text(json.dumps({"counts": counts, "tied": tied, "encoder_calls": len(encoder_calls),
                                     "loss_finite": bool(torch.isfinite(tl.loss_sum).all()),
                                     "tied_modules": sum(m.weight is model.backbone.get_input_embeddings().weight
                                                         for m in model.modules() if hasattr(m, "weight"))}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
