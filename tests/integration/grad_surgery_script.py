"""Run under ``deepspeed --num_gpus 2``: gradient surgery on ZeRO-3 (and ZeRO-1/2)
partitions vs a single-process float64 reference with full per-task gradients.

For every method, a fresh engine trains 2 optimizer steps with one task-homogeneous
micro-batch per task (gradient_accumulation_steps = T). Before each ``engine.step()``
the combined gradient is gathered from the partitions (``safe_get_full_grad``) and
compared to the reference direction (naive vector methods on full gradients, in
DeepSpeed's scale 1/GAS); after each step the gathered parameters are compared to the
reference SGD step (with DeepSpeed's gradient clipping where the case sets it). Rank 0 writes the largest errors as JSON to ``argv[1]``.
"""

import copy
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

import deepspeed
from deepspeed.utils import safe_get_full_grad

from megamt.config import GradientConfig
from megamt.gradients import methods as M
from megamt.gradients.surgery import GradientSurgery

T = 3  # tasks
MB = 4  # rows per micro-batch per rank
LR = 0.1
STEPS = 2
SEED = 7


class TinyMLP(nn.Module):
    """Odd sizes so that ZeRO-3 partitions need padding."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 13)
        self.fc2 = nn.Linear(13, 7)

    def forward(self, x, y):
        dt = self.fc1.weight.dtype  # bf16 under a bf16 engine
        return ((self.fc2(torch.tanh(self.fc1(x.to(dt)))) - y.to(dt)) ** 2).float().mean()


def task_batch(task, rank, step):
    gen = torch.Generator().manual_seed(1000 * step + 10 * task + rank)
    x = torch.randn(MB, 6, generator=gen)
    mix = torch.Generator().manual_seed(99)
    A = torch.randn(6, 7, generator=mix)
    # task 1 wants the opposite map of task 0 (conflict); task 2 is unrelated
    A_t = {0: A, 1: -0.8 * A + 0.3 * torch.randn(6, 7, generator=mix), 2: torch.randn(6, 7, generator=mix)}[task]
    return x, x @ A_t


def ds_config(offload, persistent=False, stage=3, bf16=False, clip=0.0, contiguous=True, overlap=True,
              accum_dtype=None):
    # threshold 0: every parameter is partitioned; the default (1e5) keeps these tiny ones
    # whole on every rank ("persistent"), while their gradients are still partitioned.
    # A 64-element bucket: several reductions per backward, parameters split across ranks.
    zero = {"stage": stage, "overlap_comm": overlap, "reduce_bucket_size": 64, "contiguous_gradients": contiguous}
    if stage == 3 and not persistent:
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": T,
           "zero_optimization": zero, "gradient_clipping": clip, "steps_per_print": 10**9,
           "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if accum_dtype:  # what megamt.ds_config sets for surgery in bf16 under ZeRO-3: "fp32"
        cfg["data_types"] = {"grad_accum_dtype": accum_dtype}
    return cfg


def reference_direction(method, grads, step, rho):
    if method in ("sum", "none"):  # none: a monitoring step, the plain sum is trained on
        return grads.sum(0), rho
    if method == "pcgrad":
        return M.reference_pcgrad(grads, M.projection_orders(T, SEED, step)), rho
    if method == "cagrad":
        return M.reference_cagrad(grads, c=0.5), rho
    if method == "mgda":
        return M.reference_mgda(grads), rho
    if method == "aligned_mtl":
        return M.reference_aligned_mtl(grads), rho
    if method == "gradvac":
        return M.reference_gradvac(grads, M.projection_orders(T, SEED, step), rho, beta=0.5)
    raise ValueError(method)


def run(method, world, rank, offload=False, flat=True, persistent=False, stage=3, bf16=False, clip=0.0,
        contiguous=True, overlap=True, accum_dtype=None, task_scales=(1.0,) * T, sketch_dim=0):
    """``task_scales``: each task's loss is multiplied by its scale (engine and reference), to
    give the tasks gradients of very different norms."""
    torch.manual_seed(0)
    model = TinyMLP()
    ref = copy.deepcopy(model).double()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=ds_config(offload, persistent, stage, bf16, clip, contiguous, overlap,
                                                       accum_dtype))
    gcfg = GradientConfig(method=method, seed=SEED, cagrad_c=0.5, gradvac_beta=0.5, monitor_sketch_dim=sketch_dim)
    surgery = GradientSurgery(engine, gcfg, [f"task{t}" for t in range(T)], flat_fast_path=flat)
    rho = np.zeros((T, T))
    errs = {"grad": 0.0, "param": 0.0, "gram": 0.0, "grad_scale": 0.0, "clipped": False,
            "gram_rel_to_norms": 0.0, "task_norm_rel": [0.0] * T, "gram_sigma_ratio": 0.0}
    conflicts = []
    for step in range(STEPS):
        # reference: full per-task gradients of the rank-averaged task losses
        grads = []
        for t in range(T):
            ref.zero_grad()
            loss = sum(ref(*[v.double() for v in task_batch(t, r, step)]) for r in range(world)) / world
            (loss * task_scales[t]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in ref.parameters()]))
        grads = torch.stack(grads)
        d_ref, rho = reference_direction(method, grads, step, rho)
        expected = d_ref / T  # DeepSpeed's scale: loss / gradient_accumulation_steps

        surgery.begin_step()
        for t in range(T):
            x, y = task_batch(t, rank, step)
            loss = engine(x, y) * task_scales[t]
            surgery.before_backward()  # ZeRO-1/2: every task's backward is reduced on its own
            engine.backward(loss)
            surgery.after_backward(t)
            if t == T - 1:
                stats = surgery.finish()
                got = torch.cat([safe_get_full_grad(p).reshape(-1).double() for p in engine.module.parameters()])
            engine.step()
        scale = float(expected.abs().max())
        errs["grad_scale"] = max(errs["grad_scale"], scale)
        errs["grad"] = max(errs["grad"], float((got - expected).abs().max()) / scale)
        G_ref = grads @ grads.T
        errs["gram"] = max(errs["gram"], float((stats.gram - G_ref).abs().max() / G_ref.abs().max()))
        # each entry against its own tasks' norms: what a small task's gradient keeps of itself
        norms = G_ref.diagonal().sqrt()
        errs["gram_rel_to_norms"] = max(errs["gram_rel_to_norms"],
                                        float(((stats.gram - G_ref).abs() / torch.outer(norms, norms)).max()))
        errs["task_norm_rel"] = [max(a, float(abs(got_n - want_n) / want_n)) for a, got_n, want_n in
                                 zip(errs["task_norm_rel"], stats.norms, norms)]
        if sketch_dim:  # the sketch's error in units of its standard deviation bound
            sigma = ((torch.outer(G_ref.diagonal(), G_ref.diagonal()) + G_ref**2) / sketch_dim).sqrt()
            errs["gram_sigma_ratio"] = max(errs["gram_sigma_ratio"], float(((stats.gram - G_ref).abs() / sigma).max()))
        conflicts.append(stats.conflicts)

        update = expected
        if clip > 0:  # DeepSpeed: g *= clip / (||g|| + 1e-6) when that is < 1
            factor = clip / (float(expected.norm()) + 1e-6)
            if factor < 1:
                update = expected * factor
                errs["clipped"] = True
        with torch.no_grad():  # reference SGD step
            offset = 0
            for p in ref.parameters():
                p -= LR * update[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            got_p = torch.cat([p.detach().reshape(-1).double() for p in engine.module.parameters()])
        want_p = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        errs["param"] = max(errs["param"], float((got_p - want_p).abs().max()))
    errs["conflicts"] = conflicts
    errs["applied"] = bool(stats.applied)
    errs["timings"] = {k: round(v, 6) for k, v in stats.timings.items()}
    errs["flat_fast_path"] = surgery.flat is not None
    errs["buffer_bytes"] = stats.buffer_bytes
    errs["buffer_kept"] = surgery.buffer is not None
    engine.destroy() if hasattr(engine, "destroy") else None
    return errs


def main():
    out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # the launcher adds --local_rank
    deepspeed.init_distributed(dist_backend="gloo")
    from megamt import comm
    comm.leave_at_exit()  # gloo threads alive at exit abort a finished rank
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    from megamt.trainer import release_cpu_shm_at_exit

    release_cpu_shm_at_exit(rank)  # DeepSpeed's CPU all-reduce buffer in /dev/shm
    results = {}
    for method in ["sum", "pcgrad", "cagrad", "mgda", "aligned_mtl", "gradvac"]:
        results[method] = run(method, world, rank)
    results["pcgrad_per_param"] = run("pcgrad", world, rank, flat=False)
    results["mgda_persistent"] = run("mgda", world, rank, persistent=True)
    cases = {"pcgrad_offload": dict(method="pcgrad", offload=True),
             # ZeRO-1/2: every task's backward is its own accumulation boundary
             "z2_sum": dict(method="sum", stage=2), "z2_pcgrad": dict(method="pcgrad", stage=2),
             "z2_mgda": dict(method="mgda", stage=2), "z2_cagrad_clip": dict(method="cagrad", stage=2, clip=0.05),
             "z1_pcgrad": dict(method="pcgrad", stage=1), "z1_aligned_mtl": dict(method="aligned_mtl", stage=1),
             "z2_pcgrad_offload_clip": dict(method="pcgrad", stage=2, offload=True, clip=0.05),
             "z1_gradvac_offload": dict(method="gradvac", stage=1, offload=True),
             "z2_pcgrad_bf16": dict(method="pcgrad", stage=2, bf16=True),
             # bf16 ZeRO-3: running sums differenced; task 1's gradient is ~300x smaller than
             # task 0's, so its snapshot difference needs fp32 accumulation (megamt.ds_config
             # sets it); the control keeps DeepSpeed's bf16 default and must lose precision
             "z3_pcgrad_bf16_scales": dict(method="pcgrad", bf16=True, accum_dtype="fp32",
                                           task_scales=(1.0, 0.003, 0.3)),
             "z3_pcgrad_bf16_scales_bf16_accum": dict(method="pcgrad", bf16=True, task_scales=(1.0, 0.003, 0.3)),
             # monitoring-only steps: exact Gram (buffer freed after the step) and the sketch
             "z3_monitor_exact": dict(method="none"),
             "z3_monitor_sketch": dict(method="none", sketch_dim=32, task_scales=(1.0, 0.01, 0.3)),
             "z2_monitor_sketch": dict(method="none", stage=2, sketch_dim=32, task_scales=(1.0, 0.01, 0.3)),
             # the other reduction modes of ZeRO-1/2
             "z2_mgda_nocontig": dict(method="mgda", stage=2, contiguous=False),
             "z2_pcgrad_nooverlap": dict(method="pcgrad", stage=2, overlap=False),
             "z1_cagrad_nocontig_nooverlap": dict(method="cagrad", stage=1, contiguous=False, overlap=False)}
    for name, kw in cases.items():
        try:
            results[name] = run(kw.pop("method"), world, rank, **kw)
        except Exception as e:  # reported, and the test says what failed
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
