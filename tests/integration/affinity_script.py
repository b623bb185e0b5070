"""Run under ``deepspeed --num_gpus 2 affinity_script.py CONFIG OUT_DIR``: the TAG lookahead
affinity of the trainer's measuring steps on 2 ZeRO-3 ranks vs a single-process reference.

Run A trains ``STEPS`` steps with ``gradients.affinity_every=1``. Around every lookahead
(``LookaheadAffinity.measure``, inside ``surgery.finish()``) the script records the full
weights theta (gathered), each rank's task micro-batches, and whether every parameter
partition (``ds_tensor``) is bit-identical afterwards. Run B trains the same steps from the
same seeds with the same measuring steps (``gradients.monitor_every=1``) and no affinity:
its final weights must equal run A's to the bit (the lookahead leaves no trace).

Rank 0 then recomputes, in one process with full gradients, for every step
``Z[i->j] = 1 - L_j(theta - lr g_i) / L_j(theta)`` over the global (both ranks') task batches,
and the first-order ``lr <g_i, g_j> / L_j``, and writes the largest differences from what the
trainer logged (``affinity/<i>/<j>``, ``affinity_first_order/<i>/<j>`` in train_log.jsonl)
to ``OUT_DIR/results.json``.
"""

import copy
import json
import sys
from pathlib import Path

import torch

STEPS = 3  # DeepSpeed warms up over >= 2 steps from lr 0: the third step is the first to move the weights
LR = 0.05  # gradients.affinity_lr: large enough that Z is far from 0 on a tiny model


def gathered_state(trainer, cfg):
    from megamt.eval.api import gather_plain_copy

    with torch.random.fork_rng():  # building the copy draws random init: keep the run's RNG untouched
        return {k: v.clone() for k, v in gather_plain_copy(trainer.engine.module, cfg).state_dict().items()}


def global_mean(model, batches_per_rank, j):
    """Task j's mean loss over every rank's task-j micro-batch (sum of sums / sum of counts)."""
    s = c = 0.0
    for batches in batches_per_rank:
        out = model(dict(batches[j]))
        s = s + out.loss_sum[j]
        c = c + out.count[j]
    return s / c


def reference(cfg, theta, batches_per_rank, tasks, lr):
    from megamt.model import MultitaskModel

    with torch.random.fork_rng():
        model = MultitaskModel(copy.deepcopy(cfg))
    model.load_state_dict(theta, strict=False)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        base = {j: float(global_mean(model, batches_per_rank, j)) for j in tasks}
    grads = {}
    for i in tasks:
        model.zero_grad()
        global_mean(model, batches_per_rank, i).backward()
        grads[i] = [p.grad.detach().clone() for p in params]
    Z, Z1 = {}, {}
    for i in tasks:
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip([p for p in shifted.parameters() if p.requires_grad], grads[i]):
                p -= lr * g
            for j in tasks:
                Z[i, j] = 1.0 - float(global_mean(shifted, batches_per_rank, j)) / base[j]
                dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(grads[i], grads[j]))
                Z1[i, j] = lr * dot / base[j]
    return Z, Z1


def main():
    config_path, out_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir = Path(out_dir)
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from megamt import comm
    from megamt.config import load_config
    from megamt.trainer import MultitaskTrainer

    common = [f"train.max_steps={STEPS}", "train.prefetch=false", "train.eval_at_start=false",
              "train.log_every=1", "train.progress_bar=false", "train.warmup_steps=0", "train.eval_batches=1"]
    cfg_a = load_config(config_path, common + ["gradients.affinity_every=1", f"gradients.affinity_lr={LR}",
                                               f"train.run_dir={out_dir / 'a'}"])
    trainer = MultitaskTrainer(None, cfg_a, resume=False)
    la = trainer.affinity.lookahead
    captured = []
    measure = la.measure

    def recording_measure(partitions, rows, scale, lr, batches, forward):
        theta = gathered_state(trainer, cfg_a)
        before = [p.ds_tensor.detach().clone() for p in la.params]
        Z, base = measure(partitions, rows, scale, lr, batches, forward)
        restored = all(torch.equal(b, p.ds_tensor) for b, p in zip(before, la.params))
        released = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in la.params)
        captured.append({"theta": theta, "batches": {j: {k: v for k, v in b.items()} for j, b in batches.items()},
                         "restored": restored, "released": released, "lr": lr, "scale": scale, "rows": list(rows)})
        return Z, base

    la.measure = recording_measure
    trainer.train()
    final_a = gathered_state(trainer, cfg_a)
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in la.params)

    cfg_b = load_config(config_path, common + ["gradients.monitor_every=1", f"train.run_dir={out_dir / 'b'}"])
    trainer_b = MultitaskTrainer(None, cfg_b, resume=False)
    trainer_b.train()
    final_b = gathered_state(trainer_b, cfg_b)

    batches_all = comm.all_gather_objects([c["batches"] for c in captured])  # [rank][step]{task: batch}
    restored_all = comm.all_gather_objects([c["restored"] and c["released"] for c in captured])
    if comm.rank() != 0:
        return
    names = list(cfg_a.tasks)
    log = [json.loads(line) for line in (out_dir / "a" / "train_log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in log if "train/loss" in r}
    err = {"lookahead": 0.0, "first_order": 0.0}
    zmax = 0.0
    for s, c in enumerate(captured):
        tasks = c["rows"]
        per_rank = [batches_all[r][s] for r in range(len(batches_all))]
        Z, Z1 = reference(cfg_a, c["theta"], per_rank, tasks, c["lr"])
        rec = steps[s + 1]
        for i in tasks:
            for j in tasks:
                if i == j:
                    continue
                got = rec[f"affinity/{names[i]}/{names[j]}"]
                got1 = rec[f"affinity_first_order/{names[i]}/{names[j]}"]
                err["lookahead"] = max(err["lookahead"], abs(got - Z[i, j]))
                err["first_order"] = max(err["first_order"], abs(got1 - Z1[i, j]))
                zmax = max(zmax, abs(Z[i, j]))
    summary = json.loads((out_dir / "a" / "affinity.json").read_text())
    result = {
        "steps_measured": len(captured), "errors": err, "max_abs_z": zmax, "scale": [c["scale"] for c in captured],
        "restored_every_rank": [all(x) for x in restored_all],
        "final_weights_identical": sorted(final_a) == sorted(final_b) and all(
            torch.equal(final_a[k], final_b[k]) for k in final_a),
        "weights_changed": any(not torch.equal(final_a[k], c) for k, c in captured[0]["theta"].items()),
        "persistent_params": persistent, "params": len(la.params),
        "summary_steps": summary["lookahead"]["steps"],
        "logged_tags": sorted(k for k in steps[1] if k.startswith("affinity")),
        "tasks": names,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
