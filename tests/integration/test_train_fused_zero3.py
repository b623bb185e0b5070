"""Fused vs unfused per-task loss under 2-rank ZeRO-3 (CPU): the same per-task losses at each
of three optimizer steps and the same parameters after them, untied and tied embeddings.

The fused side runs the trainer's real path: the batch carries ``loss_grad_scale`` (w_t / N_t,
with unequal task weights), so the kernel's hinted forward computes the gradients and the
backward uses them (``backward_path_counts["hinted"]``, checked), under ZeRO-3 with the LM
head gathered by the ``lm_loss`` child module.

Head release (a proxy for the GPU memory the gathered head holds during the backward): a
tensor hook on ``lm_loss``'s input fires right after that module's backward, i.e. after
DeepSpeed's post-backward hook of the module; it records the head weight's ``ds_status``.
With the head registered on ``lm_loss`` it is NOT_AVAILABLE there (released; untied head: no
later use in the trace); the control run registers it on the root ``MultitaskModel`` as before
and finds it still AVAILABLE (kept for the whole backward).

The file is also the worker: pytest launches it through the real `deepspeed` launcher.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fused_equals_unfused_under_zero3(tmp_path):
    out = tmp_path / "result.json"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()), str(HERE), "--out", str(out)]
    from test_train_deepspeed import run_group

    proc = run_group(cmd, 280, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for tie in ("untied", "tied"):
        r = result[tie]
        assert r["partitioned"], "parameters were not ZeRO-3 partitioned"
        assert r["fused_used"] and not r["unfused_used"]
        assert r["backward_paths"] == {"hinted": STEPS}, r["backward_paths"]  # the trainer's path, every step
        assert r["init_diff"] == 0.0
        assert r["count_equal"]
        assert r["loss_max_abs_diff"] < 1e-5 * max(1.0, r["loss_max_abs"]), r
        assert r["param_max_abs_diff"] < 1e-6, r
        assert r["param_max_update"] > 1e-4, "the step did not move the parameters"
    # the head is released right after the loss module's backward (untied: nothing reuses it)
    assert result["untied"]["head_status_after_loss_backward"] == ["NOT_AVAILABLE"] * STEPS, result["untied"]
    # control: registered on the root module (the old way) it stays gathered there
    assert result["untied_root_registered"]["head_status_after_loss_backward"] == ["AVAILABLE"] * STEPS
    assert result["untied_root_registered"]["loss_max_abs_diff"] < 1e-5 * max(1.0, result["untied"]["loss_max_abs"])


# --------------------------------------------------------------------------- worker


def worker(out_path: str) -> None:
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from packed_batches import pack_rows, random_rows

    from megamt.config import ModelConfig, MultitaskConfig, TaskConfig, TrainConfig
    from megamt.ds_config import build_ds_config
    from megamt.losses import count_targets, step_loss
    from megamt.model import MultitaskModel

    torch.set_num_threads(1)
    deepspeed.init_distributed()
    from megamt import comm
    comm.leave_at_exit()  # gloo threads alive at exit abort a finished rank
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from megamt.trainer import release_cpu_shm_at_exit

    release_cpu_shm_at_exit(rank)
    import megamt.kernels.fused_linear_cross_entropy as flce

    vocab, T = 97, 3
    weights = torch.tensor([1.0, 0.5, 2.0])  # unequal task weights: the hint is not uniform

    def run(fused: bool, tie: bool, root_registered: bool = False):
        fc = {"model_type": "llama", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": tie}
        cfg = MultitaskConfig(tasks={n: TaskConfig() for n in "abc"},
                              model=ModelConfig(from_config=fc, fused_loss=fused, attn_implementation="sdpa"),
                              train=TrainConfig(micro_batch_size=3, lr=1e-2, grad_clip=0.0, warmup_steps=1,
                                                lr_schedule="constant"))
        ds = build_ds_config(cfg, world, hidden_size=32)
        torch.manual_seed(0)
        keep = HfDeepSpeedConfig(ds)  # noqa: F841  (zero.Init while building)
        model = MultitaskModel(cfg)
        head = model.backbone.get_output_embeddings().weight
        if root_registered:  # the control: how the head was registered before (root module)
            deepspeed.zero.register_external_parameter(model, head)
        partitioned = all(p.numel() == 0 or p.ds_numel > p.numel() for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
        statuses = []
        if fused:
            def watch(module, args):  # prepended: sees the input before DeepSpeed wraps it
                if args[0].requires_grad:
                    args[0].register_hook(lambda g: statuses.append(head.ds_status.name))

            model.lm_loss.register_forward_pre_hook(watch, prepend=True)
        flce.backward_path_counts.clear()

        def gathered():
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                return {n: p.detach().clone() for n, p in model.named_parameters()}

        init = gathered()
        losses, counts, global_counts = [], [], []
        for step in range(STEPS):  # DeepSpeed's warm-up gives the first step lr 0: take three
            batch = pack_rows(random_rows(torch.Generator().manual_seed(100 * step + rank), 3, 32, T, vocab), 32)
            count = count_targets(batch["labels"], batch["task_ids"], T)
            torch.distributed.all_reduce(count)
            batch["loss_grad_scale"] = weights / count.clamp_min(1.0)  # as MultitaskTrainer.forward_backward_step
            tl = engine(batch)
            engine.backward(step_loss(tl, count, weights, world, 1))
            engine.step()
            loss_sum, local_count = tl.loss_sum.detach().clone(), tl.count.clone()
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(local_count)
            losses.append(loss_sum)
            counts.append(local_count)
            global_counts.append(count)
        after = gathered()
        return dict(partitioned=partitioned, fused=model.fused_loss, init=init, after=after,
                    loss=torch.stack(losses), count=torch.stack(counts), global_count=torch.stack(global_counts),
                    backward_paths=dict(flce.backward_path_counts), statuses=statuses)

    def compare(f, u):
        return {
            "partitioned": f["partitioned"] and u["partitioned"],
            "fused_used": f["fused"], "unfused_used": u["fused"], "backward_paths": f["backward_paths"],
            "head_status_after_loss_backward": f["statuses"],
            "init_diff": max(float((f["init"][n] - u["init"][n]).abs().max()) for n in f["init"]),
            "count_equal": bool(torch.equal(f["count"], u["count"]) and torch.equal(f["count"], f["global_count"])),
            "loss": f["loss"].tolist(), "loss_unfused": u["loss"].tolist(),
            "loss_max_abs": float(u["loss"].abs().max()),
            "loss_max_abs_diff": float((f["loss"] - u["loss"]).abs().max()),
            "param_max_abs_diff": max(float((f["after"][n] - u["after"][n]).abs().max()) for n in f["after"]),
            "param_max_update": max(float((f["after"][n] - f["init"][n]).abs().max()) for n in f["after"]),
        }

    result = {}
    for tie in (False, True):
        u = run(False, tie)
        result["tied" if tie else "untied"] = compare(run(True, tie), u)
        if not tie:
            result["untied_root_registered"] = compare(run(True, tie, root_registered=True), u)
    if rank == 0:
        Path(out_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    worker(a.out)
