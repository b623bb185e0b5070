"""Benchmark the fused per-task linear cross-entropy against the unfused reference.

    .venv/bin/python tools/bench_kernels.py            # CPU section (+ GPU section when CUDA exists)
    .venv/bin/python tools/bench_kernels.py --quick    # smaller CPU shape, for a smoke run

CPU section (fp32, N=8192, H=1024, V=32000 by default): forward + backward of
``fused_linear_task_cross_entropy(backend="torch")`` and of
``reference_linear_task_cross_entropy`` (F.linear + F.cross_entropy + scatter_add), and
of the fused path with ``grad_scale_hint`` (as the trainer calls it: the hint is the
upstream gradient up to a scalar, so its backward takes the kept-gradient path; the
child reports which backward path ran), each in a fresh subprocess with the same thread settings (``torch.set_num_threads`` and
OMP_NUM_THREADS = --threads). Variants alternate (ref, fused, hinted, ref, fused, hinted, ...) so that
load from other processes on a shared machine hits both; the best time per variant counts.

Memory method: tracemalloc does not see torch's CPU allocations, so each subprocess
measures its resident set. After building the inputs (hidden, weight, labels, task ids)
it resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets
VmHWM, Linux >= 4.0), records the current VmRSS, runs forward + backward once, and
reads VmHWM: peak extra = VmHWM - VmRSS before. Gradients (grad_hidden, grad_weight)
count as extra for both variants alike. Without /proc (non-Linux) it falls back to
``resource.getrusage(...).ru_maxrss`` minus the RSS before (a lower bound of the extra
when imports peaked higher).

GPU section (only with CUDA; bf16, H=4096, V=128256, N in 4096..32768): time and peak
memory (torch.cuda.max_memory_allocated above the inputs) of the reference, the fused
Triton path and the same with ``grad_scale_hint`` and
Liger-Kernel's LigerFusedLinearCrossEntropyLoss (if installed), with
TFLOP/s = 6·N·H·V / time (the forward + backward matmul flops of the unfused path; the
fused path executes 8·N·H·V since it recomputes the logits; the hinted one 6·N·H·V) against the card's measured
bf16 matmul rate. Prints "skipped: no CUDA" otherwise.

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


VARIANTS = ("reference", "fused_torch", "fused_hinted")


def _read_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB → bytes
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_child(variant: str, n: int, h: int, v: int, t: int, threads: int, chunk_tokens: int | None,
               ignore_frac: float) -> dict:
    """One measurement in this (fresh) process: peak extra RSS and fwd+bwd time."""
    import resource

    import torch

    torch.set_num_threads(threads)
    import megamt.kernels.fused_linear_cross_entropy as flce
    from megamt.kernels import fused_linear_task_cross_entropy, reference_linear_task_cross_entropy

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100  # prompt tokens carry no loss
    task_ids = torch.randint(0, t, (n,), generator=gen)
    upstream = torch.rand(t, generator=gen) + 0.5  # a different loss weight per task

    def step():
        if variant == "reference":
            loss, count = reference_linear_task_cross_entropy(hidden, weight, labels, task_ids, t)
        elif variant == "fused_hinted":  # the trainer knows g up to a scalar before the forward
            loss, count = fused_linear_task_cross_entropy(hidden, weight, labels, task_ids, t, backend="torch",
                                                          chunk_tokens=chunk_tokens, grad_scale_hint=upstream)
        else:
            loss, count = fused_linear_task_cross_entropy(hidden, weight, labels, task_ids, t, backend="torch",
                                                          chunk_tokens=chunk_tokens)
        (loss * upstream).sum().backward()
        return loss

    have_proc = _reset_peak_rss()
    rss_before = _read_status("VmRSS") if have_proc else None
    if rss_before is None:
        import psutil  # noqa: F401  (only off Linux)

        rss_before = psutil.Process().memory_info().rss
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _read_status("VmHWM") if have_proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hidden.grad = weight.grad = None
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    second, second_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return dict(variant=variant, peak_extra_bytes=peak - rss_before, seconds=min(first, second),
                first_seconds=first, cpu_seconds=min(first_cpu, second_cpu), loss_total=float(loss.sum()),
                backward_paths=dict(flce.backward_path_counts))


def cpu_section(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results: dict[str, list] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--n", str(args.n), "--h", str(args.h),
                   "--v", str(args.v), "--t", str(args.t), "--threads", str(args.threads),
                   "--ignore-frac", str(args.ignore_frac)]
            if args.chunk_tokens:
                cmd += ["--chunk-tokens", str(args.chunk_tokens)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"bench child {variant} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant].append(res)
            print(f"  {variant:12s} fwd+bwd {res['seconds']:.2f} s wall, {res['cpu_seconds']:.2f} s CPU "
                  f"(first call {res['first_seconds']:.2f} s), "
                  f"peak extra RSS {res['peak_extra_bytes'] / 2**20:.0f} MiB, backward paths {res['backward_paths']}",
                  flush=True)
    ref, fused, hinted = results["reference"], results["fused_torch"], results["fused_hinted"]
    best = lambda rs, key="seconds": min(r[key] for r in rs)  # noqa: E731
    mem = lambda rs: max(r["peak_extra_bytes"] for r in rs)  # noqa: E731
    rel = abs(ref[0]["loss_total"] - fused[0]["loss_total"]) / abs(ref[0]["loss_total"])
    out = dict(
        shape=dict(N=args.n, H=args.h, V=args.v, T=args.t, dtype="fp32", ignored_fraction=args.ignore_frac),
        threads=args.threads,
        machine=args.machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        reference_seconds=best(ref), fused_seconds=best(fused), time_ratio=best(fused) / best(ref),
        reference_cpu_seconds=best(ref, "cpu_seconds"), fused_cpu_seconds=best(fused, "cpu_seconds"),
        cpu_time_ratio=best(fused, "cpu_seconds") / best(ref, "cpu_seconds"),
        reference_peak_extra_MiB=mem(ref) / 2**20, fused_peak_extra_MiB=mem(fused) / 2**20,
        memory_ratio=mem(fused) / mem(ref), loss_rel_diff=rel,
        hinted_seconds=best(hinted), hinted_time_ratio=best(hinted) / best(ref),
        hinted_cpu_seconds=best(hinted, "cpu_seconds"),
        hinted_cpu_time_ratio=best(hinted, "cpu_seconds") / best(ref, "cpu_seconds"),
        hinted_peak_extra_MiB=mem(hinted) / 2**20, hinted_memory_ratio=mem(hinted) / mem(ref),
        hinted_loss_rel_diff=abs(ref[0]["loss_total"] - hinted[0]["loss_total"]) / abs(ref[0]["loss_total"]),
        hinted_backward_paths=hinted[0]["backward_paths"],
        targets=dict(time_ratio_max=1.2, memory_ratio_max=0.25),
    )
    print(f"CPU fp32 N={args.n} H={args.h} V={args.v} T={args.t}, {args.threads} threads: "
          f"time fused/ref = {out['time_ratio']:.2f} wall, {out['cpu_time_ratio']:.2f} CPU (target <= 1.2), "
          f"peak extra memory fused/ref = {out['memory_ratio']:.3f} (target <= 0.25); hinted/ref: time "
          f"{out['hinted_time_ratio']:.2f} wall, {out['hinted_cpu_time_ratio']:.2f} CPU, memory "
          f"{out['hinted_memory_ratio']:.3f}", flush=True)
    return out


def gpu_section(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA", flush=True)
        return {"skipped": "no CUDA"}
    from megamt.kernels import fused_linear_task_cross_entropy, reference_linear_task_cross_entropy

    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        LigerFusedLinearCrossEntropyLoss = None
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    h, v, t = 4096, 128256, 4

    def timed(fn, reps=3):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_seconds = timed(lambda: a @ a, reps=10)
    matmul_tflops = 2 * 8192**3 / mm_seconds / 1e12
    del a
    print(f"GPU {card}: measured bf16 matmul rate {matmul_tflops:.0f} TFLOP/s (8192^3)", flush=True)

    rows = []
    for n in args.gpu_tokens:
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(n, h, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
        weight = (torch.randn(v, h, device=dev, dtype=torch.bfloat16, generator=gen) * h**-0.5).requires_grad_()
        labels = torch.randint(0, v, (n,), device=dev, generator=gen)
        task_ids = torch.randint(0, t, (n,), device=dev, generator=gen)
        upstream = torch.rand(t, device=dev, generator=gen) + 0.5

        variants = {
            "reference": lambda: (reference_linear_task_cross_entropy(hidden, weight, labels, task_ids, t)[0]
                                  * upstream).sum().backward(),
            "fused_triton": lambda: (fused_linear_task_cross_entropy(hidden, weight, labels, task_ids, t,
                                                                     backend="triton")[0] * upstream).sum().backward(),
            "fused_triton_hinted": lambda: (fused_linear_task_cross_entropy(
                hidden, weight, labels, task_ids, t, backend="triton", grad_scale_hint=upstream)[0]
                * upstream).sum().backward(),
        }
        if LigerFusedLinearCrossEntropyLoss is not None:
            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")  # one scalar: no per-task reduction
            variants["liger"] = lambda: liger(weight, hidden, labels).backward()
        for name, fn in variants.items():
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                seconds = timed(fn)
                peak = torch.cuda.max_memory_allocated() - base
                row = dict(card=card, N=n, variant=name, seconds=seconds, peak_extra_GiB=peak / 2**30,
                           tflops=6 * n * h * v / seconds / 1e12)
                row["fraction_of_matmul_rate"] = row["tflops"] / matmul_tflops
            except torch.cuda.OutOfMemoryError:
                row = dict(card=card, N=n, variant=name, error="out of memory")
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
        del hidden, weight
    return dict(card=card, matmul_tflops=matmul_tflops, H=h, V=v, dtype="bf16", rows=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--t", type=int, default=8, help="number of tasks")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=2, help="alternating subprocess rounds per variant")
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--ignore-frac", type=float, default=0.0,
                   help="fraction of tokens with label -100 (the fused path skips them; 0 = its worst case)")
    p.add_argument("--machine", default="", help="how to name this machine in the report")
    p.add_argument("--quick", action="store_true", help="N=2048, H=256, V=8000, one round")
    p.add_argument("--gpu-tokens", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_cpu_child(args.child, args.n, args.h, args.v, args.t, args.threads, args.chunk_tokens,
                                    args.ignore_frac)))
        return
    if args.quick:
        args.n, args.h, args.v, args.rounds = 2048, 256, 8000, 1
    report = {"bench": "fused_linear_task_cross_entropy"}
    if not args.skip_cpu:
        report["cpu"] = cpu_section(args)
    report["gpu"] = gpu_section(args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
