"""Run under ``deepspeed --num_gpus 2``: Reptile and first-order MAML on ZeRO-1, 2 and 3 partitions
(megamt.gradients.meta.MetaPartitions) vs a single-process float64 reference of the same
algorithm on the full parameter vector.

Per case a fresh engine (ZeRO stage 1, 2 or 3, gradient_accumulation_steps=1, torch SGD as the
outer optimizer) runs 2 outer steps of K inner steps, one micro-batch per rank per inner step
(FOMAML: one more, the query). After every outer step the gathered parameters are compared
to the reference (relative max error). Rank 0 writes the errors as JSON to ``argv[1]`` (``argv[2]``: a comma-separated subset of the cases).
"""

import copy
import json
import os
import sys

import torch
import torch.nn as nn

import deepspeed

from megamt.gradients.meta import MetaPartitions

MB = 4  # rows per micro-batch per rank
K = 3  # inner steps
OUTER = 2  # outer steps
INNER_LR = 0.05
OUTER_LR = 0.3  # the outer optimizer's (FOMAML); Reptile's epsilon below
EPS = [0.5, 0.25]  # Reptile's epsilon per outer step (an annealed schedule)
BETAS = (0.5, 0.9)


class TinyMLP(nn.Module):
    """Odd sizes (189 parameters) so that ZeRO partitions need padding and split parameters."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 13)
        self.fc2 = nn.Linear(13, 7)

    def forward(self, x, y):
        dt = self.fc1.weight.dtype
        return ((self.fc2(torch.tanh(self.fc1(x.to(dt)))) - y.to(dt)) ** 2).float().mean()


def batch(outer, inner, rank):
    """The micro-batch of (outer step, inner step, rank); the task changes with the outer step."""
    gen = torch.Generator().manual_seed(10_000 * outer + 100 * inner + rank)
    task = torch.Generator().manual_seed(500 + 10 * outer + inner // 10)  # inner // 10: the task of a batched step
    x = torch.randn(MB, 6, generator=gen)
    return x, x @ torch.randn(6, 7, generator=task)


def ds_config(offload, persistent, stage=3):
    # ZeRO-1 without overlap_comm (reduced at the boundary by the engine), ZeRO-2/3 with it (in backward hooks)
    zero = {"stage": stage, "overlap_comm": stage > 1, "reduce_bucket_size": 64, "contiguous_gradients": True}
    if stage == 3 and not persistent:
        zero["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}


class RefAdam:
    def __init__(self, n):
        self.m = torch.zeros(n, dtype=torch.float64)
        self.v = torch.zeros(n, dtype=torch.float64)
        self.t = 0

    def update(self, g, lr):
        b1, b2 = BETAS
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        return lr / (1 - b1 ** self.t) * self.m / ((self.v / (1 - b2 ** self.t)).sqrt() + 1e-8)


def ref_grad(ref, theta, outer, inner, world):
    torch.nn.utils.vector_to_parameters(theta, ref.parameters())
    ref.zero_grad()
    loss = sum(ref(*[v.double() for v in batch(outer, inner, r)]) for r in range(world)) / world
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in ref.parameters()])


def run(method, inner_optimizer, world, rank, offload=False, persistent=False, tasks=1, stage=3, skip=False):
    """``skip``: the query loss is NaN, so DeepSpeed skips the outer step: the weights must be theta0."""
    torch.manual_seed(0)
    model = TinyMLP()
    ref = copy.deepcopy(model).double()
    theta = torch.nn.utils.parameters_to_vector(ref.parameters()).detach().clone()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=OUTER_LR),
                                      config=ds_config(offload, persistent, stage))
    meta = MetaPartitions(engine, inner_optimizer, betas=BETAS)
    adam = RefAdam(theta.numel())
    errs = {"param": 0.0, "disp": 0.0, "moved": 0.0}
    for outer in range(OUTER):
        # reference
        theta0 = theta.clone()
        disp = torch.zeros_like(theta)
        for j in range(tasks):  # batched Reptile: each task from theta0, displacements averaged
            theta = theta0.clone()
            for i in range(K):
                g = ref_grad(ref, theta, outer, 10 * j + i, world)
                theta = theta - (INNER_LR * g if inner_optimizer == "sgd" else adam.update(g, INNER_LR))
            disp += theta - theta0
        disp_ref = float((disp / tasks).norm())
        if method == "reptile":
            theta = theta0 + EPS[outer] * disp / tasks
        else:
            theta = theta0 - (0 if skip else OUTER_LR) * ref_grad(ref, theta, outer, K, world)
        # ZeRO partitions, driven as megamt.trainer.meta_train_step does
        meta.begin_outer()
        for j in range(tasks):
            for i in range(K + (method == "fomaml")):
                query = i == K
                engine.set_gradient_accumulation_boundary(query or meta.inner_boundary)
                x, y = batch(outer, 10 * j + i, rank)
                engine.backward(engine(x * float("nan") if query and skip else x, y))
                if not query:
                    meta.inner_step(INNER_LR)
            if tasks > 1:
                meta.end_task()
        disp_sq = meta.displacement_sq()
        torch.distributed.all_reduce(disp_sq)  # the trainer folds this into its step all-reduce
        if method == "reptile":
            meta.reptile_outer(EPS[outer])
        else:
            meta.restore(publish=False)
            engine.step()
            assert engine.was_step_applied() != skip
            if skip:
                meta.publish()  # as the trainer does after a skipped step
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            got = torch.cat([p.detach().reshape(-1).double() for p in engine.module.parameters()])
        errs["param"] = max(errs["param"], float((got - theta).abs().max() / theta.abs().max()))
        errs["disp"] = max(errs["disp"], abs(float(disp_sq) ** 0.5 - disp_ref) / disp_ref)
        # the outer steps moved the weights (a skipped one: the inner steps did, and restore undid it)
        errs["moved"] = max(errs["moved"], disp_ref if skip else float((theta - theta0).abs().max()))
    engine.destroy() if hasattr(engine, "destroy") else None
    return errs


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_path, only = args[0], set(args[1].split(",")) if len(args) > 1 else None  # argv[2]: some cases, to debug
    deepspeed.init_distributed(dist_backend="gloo")
    from megamt import comm
    comm.leave_at_exit()  # gloo threads alive at exit abort a finished rank
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    from megamt.trainer import release_cpu_shm_at_exit

    release_cpu_shm_at_exit(rank)
    cases = {"reptile_sgd": ("reptile", "sgd", {}), "reptile_adam": ("reptile", "adam", {}),
             "fomaml_sgd": ("fomaml", "sgd", {}), "fomaml_adam": ("fomaml", "adam", {}),
             "reptile_offload": ("reptile", "sgd", {"offload": True}),
             "fomaml_offload": ("fomaml", "adam", {"offload": True}),
             "reptile_persistent": ("reptile", "adam", {"persistent": True}),
             "fomaml_persistent": ("fomaml", "sgd", {"persistent": True}),
             "reptile_batched": ("reptile", "adam", {"tasks": 2}),
             "reptile_batched_offload": ("reptile", "sgd", {"tasks": 3, "offload": True}),
             "z1_reptile_sgd": ("reptile", "sgd", {"stage": 1}), "z1_fomaml_adam": ("fomaml", "adam", {"stage": 1}),
             "z1_fomaml_offload": ("fomaml", "sgd", {"stage": 1, "offload": True}),
             "z2_reptile_adam": ("reptile", "adam", {"stage": 2}), "z2_fomaml_sgd": ("fomaml", "sgd", {"stage": 2}),
             "z2_reptile_offload": ("reptile", "sgd", {"stage": 2, "offload": True}),
             "z2_fomaml_offload": ("fomaml", "adam", {"stage": 2, "offload": True}),
             "z2_reptile_batched_offload": ("reptile", "adam", {"stage": 2, "tasks": 2, "offload": True}),
             "fomaml_skipped": ("fomaml", "sgd", {"skip": True}),
             "z2_fomaml_skipped": ("fomaml", "sgd", {"stage": 2, "skip": True})}
    results = {}
    for name, (method, inner, kw) in cases.items():
        if only and name not in only:
            continue
        try:
            results[name] = run(method, inner, world, rank, **kw)
        except Exception as e:  # reported; the test names the failing case
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
