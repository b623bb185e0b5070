"""Benchmark of gradient surgery: per-optimizer-step cost of each method vs plain training.

CPU part (runs anywhere): launches ``deepspeed --num_gpus 2`` on this script (ZeRO-3 or,
with ``--stage 1|2``, ZeRO-1/2; 2 ranks, gloo) with a tiny Llama and, for T = 2, 4, 8 tasks, times per optimizer step:

- ``plain_1mb``: plain training, one mixed micro-batch of T x MB rows (GAS = 1);
- ``plain_gasT``: plain training, T micro-batches of MB rows (GAS = T), no surgery;
- each method: the same T task-homogeneous micro-batches + GradientSurgery,
  split into forward+backward, snapshot, Gram, all-reduce, method (coefficients),
  combine (+ write-back), and the optimizer step. Extra memory = the ``[T, n_local]``
  fp32 snapshot buffer (exact; allocated once).

GPU part (CUDA only, else prints ``skipped: no CUDA``): Triton Gram and combine kernels
vs the measured device-to-device copy bandwidth, T up to 16, 1e8 to 1e9 elements.
``--cpu-bandwidth``: the same measurement for the torch path on this CPU (1e7 and 3e7
elements, at 1 thread and at all cores), each case also checked against float64.

``--sketch``: monitoring-only steps with ``gradients.monitor_sketch_dim = k`` (one process):
the CountSketch estimate of the T x T Gram matrix against the exact one on synthetic task
gradients of very different norms (n elements, fp32), over several hashes: error of every
entry relative to its tasks' norms (and in units of its standard-deviation bound
sqrt((G_ii G_jj + G_ij^2) / k)), cosine error, time per task, and the memory held between
backwards (exact: the ``[T, n]`` fp32 buffer; sketch: ``T x k`` float64) and per chunk.

``--repnorm``: GradNorm's per-task norms at the shared representation
(``megamt.gradients.representation``) on plain mixed steps: forward + backward of one packed
micro-batch of the same tiny Llama (one process, one thread) with the collector on vs off,
interleaved, median of ``--repnorm-reps`` each.

Usage: ``python tools/bench_gradients.py [--steps 3] [--tasks 2 4 8] [--stage 3]``. The last line
printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["sum", "pcgrad", "cagrad", "mgda", "aligned_mtl", "gradvac"]
MB = 2  # rows per micro-batch per rank
SEQ = 64  # tokens per row
MODEL = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)


# --------------------------------------------------------------------------- CPU worker (under deepspeed)


def _worker(args) -> None:
    import torch
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from megamt.config import GradientConfig
    from megamt.gradients.surgery import GradientSurgery

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    from megamt.trainer import release_cpu_shm_at_exit

    release_cpu_shm_at_exit(rank)
    from megamt import comm

    comm.leave_at_exit()  # gloo threads alive at exit abort a finished rank
    torch.manual_seed(0)

    def engine_for(gas, rows):
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**MODEL)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        ds = {"train_micro_batch_size_per_gpu": rows, "gradient_accumulation_steps": gas,
              "zero_optimization": {"stage": args.stage, "overlap_comm": True, "contiguous_gradients": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "gradient_clipping": 1.0, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        return engine, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    def batch(task, step, rows):
        gen = torch.Generator().manual_seed(10_000 * step + 100 * task + rank)
        ids = torch.randint(0, MODEL["vocab_size"], (rows, SEQ), generator=gen)
        return {"input_ids": ids, "labels": ids, "use_cache": False}

    results = {}
    for T in args.tasks:
        res = {}
        # plain, one mixed micro-batch
        engine, n_params = engine_for(1, T * MB)
        times = []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = engine(**batch(0, step, T * MB)).loss
            engine.backward(loss)
            t1 = time.perf_counter()
            engine.step()
            t2 = time.perf_counter()
            times.append({"fwd_bwd": t1 - t0, "optimizer": t2 - t1, "total": t2 - t0})
        res["plain_1mb"] = _median(times[1:])
        del engine

        engine, _ = engine_for(T, MB)
        for variant in ["plain_gasT"] + METHODS:
            surgery = None
            if variant != "plain_gasT":
                surgery = GradientSurgery(engine, GradientConfig(method=variant), [f"t{i}" for i in range(T)])
            times = []
            for step in range(args.steps + 1):
                rec = {"fwd_bwd": 0.0}
                start = time.perf_counter()
                if surgery:
                    surgery.begin_step()
                for t in range(T):
                    t0 = time.perf_counter()
                    loss = engine(**batch(t, step, MB)).loss
                    if surgery:
                        surgery.before_backward()  # ZeRO-1/2: one reduction per task
                    engine.backward(loss)
                    rec["fwd_bwd"] += time.perf_counter() - t0
                    if surgery:
                        surgery.after_backward(t)
                    if t == T - 1:
                        if surgery:
                            stats = surgery.finish()
                            for k, v in stats.timings.items():
                                rec[k] = v
                        t0 = time.perf_counter()
                        engine.step()
                        rec["optimizer"] = time.perf_counter() - t0
                    else:
                        engine.step()
                rec["total"] = time.perf_counter() - start
                times.append(rec)
            res[variant] = _median(times[1:])
            if surgery:
                res[variant]["extra_memory_MiB_per_rank"] = round(stats.buffer_bytes / 2**20, 3)
                res[variant]["conflicts"] = stats.conflicts
                res[variant]["extra_vs_plain_gasT_s"] = round(res[variant]["total"] - res["plain_gasT"]["total"], 5)
                res[variant]["extra_vs_plain_1mb_s"] = round(res[variant]["total"] - res["plain_1mb"]["total"], 5)
                del surgery
        results[f"T={T}"] = res
        del engine
    if rank == 0:
        Path(args.out).write_text(json.dumps({"params": n_params, "results": results}))


def _median(records):
    keys = records[0].keys()
    return {k: round(statistics.median(r[k] for r in records), 5) for k in keys}


# --------------------------------------------------------------------------- GPU part


def gpu_bench(max_elems: float) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA", flush=True)
        return {"skipped": "no CUDA"}
    return bandwidth_bench("cuda", [int(min(n, max_elems)) for n in (1e8, 3e8, 1e9)], copy_elems=int(1e9))


def bandwidth_bench(device: str, sizes: list[int], copy_elems: int, tasks=(2, 4, 8, 16), reps: int = 5) -> dict:
    """Gram (reads T x n fp32) and combine (reads T x n, writes n) against the measured copy
    bandwidth of ``device`` (read + write of a ``copy_elems`` fp32 buffer): best of ``reps``.
    On CUDA the Triton kernels and the torch path; on the CPU the torch path (the one the
    surgery uses there), at the current ``torch.get_num_threads()``."""
    import torch

    from megamt.kernels.task_gram import torch_task_combine, torch_task_gram, triton_task_combine, triton_task_gram

    cuda = device == "cuda"

    def timed(fn):
        fn()
        best = float("inf")
        for _ in range(reps):
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                best = min(best, s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
        return best

    a = torch.empty(copy_elems, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 4 / timed(lambda: b.copy_(a))
    read_bw = a.numel() * 4 / timed(lambda: a.sum())
    del a, b
    out = {"device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} thread(s)",
           "copy_GBps": float(f"{bw / 1e9:.3g}"), "read_GBps": float(f"{read_bw / 1e9:.3g}"), "cases": []}
    free = torch.cuda.mem_get_info()[0] if cuda else _available_ram()
    variants = [("gram", "triton"), ("gram", "torch"), ("combine", "triton"), ("combine", "torch")]
    if not cuda:
        variants = [v for v in variants if v[1] == "torch"]
    for n in sizes:
        for T in tasks:
            if (T + 1) * n * 4 > 0.85 * free:
                out["cases"].append({"T": T, "n": n, "skipped": "does not fit"})
                continue
            g = torch.randn(T, n, device=device)
            c = torch.randn(T, device=device)
            o = torch.empty(n, device=device)
            fns = {("gram", "triton"): lambda: triton_task_gram(g), ("gram", "torch"): lambda: torch_task_gram(g),
                   ("combine", "triton"): lambda: triton_task_combine(g, c, out=o),
                   ("combine", "torch"): lambda: torch_task_combine(g, c, out=o)}
            case = {"T": T, "n": n}
            for kind, impl in variants:
                nbytes = (T if kind == "gram" else T + 1) * n * 4
                t = timed(fns[kind, impl])
                case[f"{kind}_{impl}_ms"] = round(t * 1e3, 3)
                case[f"{kind}_{impl}_of_bw"] = round(nbytes / t / bw, 3)
            # correctness on the benchmark data, against float64 (relative to the largest entry);
            # the reference goes by column chunks: a float64 copy of g would not fit beside it
            gram = (triton_task_gram if cuda else torch_task_gram)(g).double()
            comb = (triton_task_combine if cuda else torch_task_combine)(g, c, out=o)
            ref = torch.zeros(T, T, dtype=torch.float64, device=device)
            comb_err = comb_max = 0.0
            for s in range(0, n, 1 << 24):
                gd = g[:, s:s + (1 << 24)].double()
                ref += gd @ gd.T
                ref_c = c.double() @ gd
                comb_err = max(comb_err, float((comb[s:s + (1 << 24)].double() - ref_c).abs().max()))
                comb_max = max(comb_max, float(ref_c.abs().max()))
            case["gram_max_rel_err"] = float((gram - ref).abs().max() / ref.abs().max())
            case["combine_max_rel_err"] = comb_err / comb_max
            del gd, ref, ref_c
            out["cases"].append(case)
            print(json.dumps(case), flush=True)
            del g, c, o
            if cuda:
                torch.cuda.empty_cache()
    return out


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


# --------------------------------------------------------------------------- representation norms


def sketch_bench(sizes: list[int], tasks: int = 8, dims=(64, 256, 1024), hashes: int = 5) -> dict:
    """CountSketch Gram (monitoring) vs the exact Gram on synthetic gradients; see the docstring."""
    import torch

    from megamt.gradients import surgery as S
    from megamt.gradients.methods import cosine_matrix
    from megamt.kernels.task_gram import task_gram

    out = {"T": tasks, "hashes": hashes, "cases": []}
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        base = torch.randn(tasks, n, generator=gen)
        grads = base.clone()
        for t in range(1, tasks):  # correlated with task 0 (some conflicting), norms over 4 decades
            grads[t] = (0.6 * (-1) ** t * base[0] + base[t]) * 10.0 ** (-4 * t / (tasks - 1))
        t0 = time.perf_counter()
        G = task_gram(grads, backend="torch").double()
        exact_s = time.perf_counter() - t0
        cos = cosine_matrix(G)
        norms = G.diagonal().sqrt()
        for k in dims:
            rel, sig, cos_err, secs = [], [], [], []
            for h in range(hashes):
                t0 = time.perf_counter()
                sk = torch.stack([S.countsketch([g], k, seed=h) for g in grads])
                secs.append((time.perf_counter() - t0) / tasks)
                Gh = sk @ sk.T
                err = (Gh - G).abs()
                rel.append(float((err / torch.outer(norms, norms)).max()))
                sig.append(float((err / ((torch.outer(norms, norms) ** 2 + G**2) / k).sqrt()).max()))
                cos_err.append(float((cosine_matrix(Gh) - cos).abs().max()))
            case = dict(n=n, k=k, max_err_rel_to_norms=max(rel), mean_err_rel_to_norms=statistics.fmean(rel),
                        bound_sqrt_2_over_k=(2 / k) ** 0.5, max_err_in_sigmas=max(sig), max_cosine_err=max(cos_err),
                        sketch_s_per_task=min(secs), exact_gram_s=exact_s,
                        exact_buffer_MiB=tasks * n * 4 / 2**20, sketch_held_KiB=tasks * k * 8 / 2**10,
                        sketch_chunk_temporaries_MiB=min(n, S.SKETCH_CHUNK) * (4 + 4 + 8) / 2**20)
            out["cases"].append(case)
            print(f"n={n:.0e} k={k:5d}: max |G_hat - G| / (|g_i||g_j|) = {case['max_err_rel_to_norms']:.3f} "
                  f"(sqrt(2/k) = {case['bound_sqrt_2_over_k']:.3f}, {case['max_err_in_sigmas']:.1f} sigma max), "
                  f"cosine error {case['max_cosine_err']:.3f}; {case['sketch_s_per_task'] * 1e3:.0f} ms/task; "
                  f"held {case['sketch_held_KiB']:.0f} KiB vs exact buffer {case['exact_buffer_MiB']:.0f} MiB",
                  flush=True)
    return out


def repnorm_bench(reps: int, rows: int = 4, seq: int = 512, tasks: int = 6) -> dict:
    import torch

    from megamt.config import ModelConfig, MultitaskConfig, TaskConfig
    from megamt.gradients.representation import RepresentationGradNorms
    from megamt.model import MultitaskModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    fc = {k: v for k, v in MODEL.items()}
    fc["max_position_embeddings"] = seq
    cfg = MultitaskConfig(tasks={f"t{i}": TaskConfig() for i in range(tasks)},
                          model=ModelConfig(from_config=fc, attn_implementation="sdpa"))
    model = MultitaskModel(cfg).train()
    collector = RepresentationGradNorms(tasks)
    model.track_representation_grad_norms(collector)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fc["vocab_size"], (rows, seq), generator=gen)
    # examples of 64 tokens, task ids round robin, positions restarting per example
    pos = torch.arange(seq).remainder(64).repeat(rows, 1)
    task_ids = (torch.arange(rows * seq).view(rows, seq) // 64).remainder(tasks)
    labels = ids.roll(-1, 1)
    labels[pos == 63] = -100
    from megamt.attention import cu_seqlens_from_segment_ids

    cu, max_len = cu_seqlens_from_segment_ids(torch.arange(rows * seq).view(rows, seq) // 64)
    batch = {"input_ids": ids, "position_ids": pos, "task_ids": task_ids, "labels": labels,
             "cu_seqlens": cu, "max_seqlen": max_len}

    def step(on: bool) -> float:
        collector.enabled = on
        t0 = time.perf_counter()
        out = model(batch)
        (out.loss_sum / out.count.clamp_min(1)).sum().backward()
        if on:
            collector.take(1)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(True), step(False)  # warm-up
    on, off = [], []
    for _ in range(reps):
        on.append(step(True))
        off.append(step(False))
    res = {"rows": rows, "seq_len": seq, "tasks": tasks, "fused_loss": bool(model.fused_loss),
           "off_s": round(statistics.median(off), 4), "on_s": round(statistics.median(on), 4)}
    res["ratio"] = round(res["on_s"] / res["off_s"], 4)
    print("repnorm " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    return res


# --------------------------------------------------------------------------- driver


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help="measured optimizer steps per variant (after 1 warm-up)")
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--stage", type=int, choices=[1, 2, 3], default=3, help="DeepSpeed ZeRO stage of the CPU part")
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU kernel part")
    ap.add_argument("--gpu-max-elems", type=float, default=1e9)
    ap.add_argument("--repnorm", action="store_true", help="only the representation-norm overhead (one process)")
    ap.add_argument("--repnorm-reps", type=int, default=15)
    ap.add_argument("--sketch", action="store_true", help="only the monitoring sketch's error and memory (one process)")
    ap.add_argument("--sketch-n", type=float, nargs="+", default=[1e6, 1e7])
    ap.add_argument("--cpu-bandwidth", action="store_true",
                    help="only the torch Gram/combine path against this CPU's copy bandwidth, at 1 and all threads")
    args = ap.parse_args()
    if args.worker:
        return _worker(args)

    report = {"machine": os.environ.get("BENCH_MACHINE", "2-core CPU, 24 GiB"), "omp_num_threads_per_rank": 1}
    if args.repnorm:
        report["repnorm"] = repnorm_bench(args.repnorm_reps)
        print(json.dumps(report))
        return
    if args.sketch:
        report["sketch"] = sketch_bench([int(n) for n in args.sketch_n])
        print(json.dumps(report))
        return
    if args.cpu_bandwidth:
        import torch

        report.pop("omp_num_threads_per_rank")
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            report[f"cpu_{threads}_threads"] = bandwidth_bench("cpu", [int(1e7), int(3e7)], copy_elems=int(2.5e8))
        print(json.dumps(report))
        return
    if not args.skip_cpu:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cpu.json"
            launcher = Path(sys.executable).with_name("deepspeed")
            cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(29500 + random.randrange(2000)),
                   __file__, "--worker", "--out", str(out), "--steps", str(args.steps), "--stage", str(args.stage), "--tasks",
                   *map(str, args.tasks)]
            env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"the 2-rank CPU benchmark failed (exit {proc.returncode})")
            key = f"cpu_zero{args.stage}_2ranks"
            report[key] = json.loads(out.read_text())
            report["cpu_wall_s"] = round(time.perf_counter() - t0, 1)
            for T, res in report[key]["results"].items():
                for name, r in res.items():
                    print(f"{T:5s} {name:12s} " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    report["gpu"] = gpu_bench(args.gpu_max_elems)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
    from megamt import comm

    comm.exit_process(0)  # a worker rank: see comm.exit_process
