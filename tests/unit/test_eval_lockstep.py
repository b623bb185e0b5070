"""Generation and rank classification keep two ranks in lockstep on a partitioned model.

A stand-in for ZeRO-3 (proof on the CPU by design): two real gloo processes, the same tiny
Llama on each, declared partitioned, with a forward pre-hook that runs a collective on every
forward -- as ZeRO-3's parameter all-gather does. The ranks hold different numbers of
prompts of different lengths; out of step, the hook's collective would pair forwards of
different calls and the process group's 30 s timeout would fail the test. Each rank's
results must equal the same prompts generated alone (no lockstep).
"""

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROMPTS = {0: [[1, 5, 9, 11, 4], [1, 7], [1, 3, 3, 8, 20, 6, 12], [1, 30], [1, 4, 4, 4]], 1: [[1, 8, 2, 6]]}
CHOICES = {0: [[[5, 2], [6, 7, 2]], [[9, 2], [3, 2]], [[4, 2], [11, 2]]], 1: [[[5, 2], [6, 7, 2]]]}


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _run(model, rank):
    from megamt.eval.generation import choice_log_likelihoods, greedy_generate

    gens = greedy_generate(model, PROMPTS[rank], eos_id=2, pad_id=0, max_new_tokens=6, batch_size=2)
    scores = choice_log_likelihoods(model, PROMPTS[rank][:len(CHOICES[rank])], CHOICES[rank], pad_id=0, batch_size=2)
    return [list(g) for g in gens], scores


def _worker(rank: int, port: int, out: dict) -> None:
    from megamt import comm
    from megamt.eval import generation

    os.environ[comm.STRICT_ENV] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        model = _model()
        alone = _run(model, rank)  # not partitioned: no lockstep, no collective
        generation.zero3_partitioned = lambda m: True  # the stand-in: every forward is a collective
        forwards = []
        model.register_forward_pre_hook(lambda m, a: forwards.append(comm.reduce_values([1.0])[0]))
        synced = _run(model, rank)
        out[rank] = {"alone": alone, "synced": synced, "forwards": len(forwards),
                     "paired": all(v == 2.0 for v in forwards)}
        comm.barrier()
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uneven_ranks_run_the_same_forwards_and_the_same_results():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_port(), out), nprocs=2, join=True)
    assert out[0]["forwards"] == out[1]["forwards"] > 0
    assert out[0]["paired"] and out[1]["paired"]  # every forward met its partner forward on the other rank
    for rank in (0, 1):
        (gens_a, scores_a), (gens_s, scores_s) = out[rank]["alone"], out[rank]["synced"]
        assert gens_s == gens_a
        torch.testing.assert_close(torch.tensor(scores_s), torch.tensor(scores_a))
