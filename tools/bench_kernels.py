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

``--memory-bf16``: peak extra memory of the hinted path (the trainer's) in bf16 on the CPU
against the floor of what it must hold (see ``memory_bf16_section``). ``--precision``: its
fp16/bf16 gradient errors against float64 at the trainer's hint magnitudes, hinted vs exact
recompute.

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
               ignore_frac: float, dtype: str = "fp32") -> dict:
    """One measurement in this (fresh) process: peak extra RSS and fwd+bwd time."""
    import resource

    import torch

    torch.set_num_threads(threads)
    import megamt.kernels.fused_linear_cross_entropy as flce
    from megamt.kernels import fused_linear_task_cross_entropy, reference_linear_task_cross_entropy

    gen = torch.Generator().manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hidden = torch.randn(n, h, generator=gen).to(dt).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(dt).requires_grad_()
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
    return dict(variant=variant, dtype=dtype, peak_extra_bytes=peak - rss_before, seconds=min(first, second),
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


def memory_bf16_section(args) -> dict:
    """Peak extra memory of the hinted path (the trainer's) in bf16, on the CPU.

    The floor is what the hinted path must hold at once: in the forward the kept fp32
    gradients (``[V, H]`` + ``[N, H]``) and one token block (``[nt, V]`` bf16 logits + the
    torch path's fp32 working copy), in the backward the kept fp32 gradients and the bf16
    gradients returned from them (``[V, H]`` + ``[N, H]``). Anything above it is temporaries.

    The child runs with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then maps every allocation of
    128 KiB or more on its own and unmaps it on free (by default the threshold grows to 32 MiB
    and freed chunks below it stay in the heap), so the peak RSS follows the peak of live
    tensors as a GPU caching allocator's ``max_memory_allocated`` would.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               MALLOC_MMAP_THRESHOLD_="131072")
    n, h, v, t = args.n, args.h, args.v, args.t
    nt = min(args.chunk_tokens or 2048, n)
    cmd = [sys.executable, __file__, "--child", "fused_hinted", "--dtype", "bf16", "--n", str(n), "--h", str(h),
           "--v", str(v), "--t", str(t), "--threads", str(args.threads), "--ignore-frac", "0",
           "--chunk-tokens", str(nt)]
    runs = []
    for _ in range(args.rounds):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench child fused_hinted (bf16) failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 2**20
    forward_floor = 4 * v * h + 4 * n * h + (2 + 4) * nt * v
    backward_floor = (4 + 2) * v * h + (4 + 2) * n * h
    floor = max(forward_floor, backward_floor)
    peak = min(r["peak_extra_bytes"] for r in runs)
    out = dict(shape=dict(N=n, H=h, V=v, T=t, dtype="bf16", chunk_tokens=nt), threads=args.threads,
               peak_extra_MiB=[r["peak_extra_bytes"] / mib for r in runs], floor_MiB=floor / mib,
               fp32_VH_MiB=4 * v * h / mib, peak_over_floor_MiB=(peak - floor) / mib,
               seconds=min(r["seconds"] for r in runs), backward_paths=runs[0]["backward_paths"])
    print(f"CPU bf16 hinted N={n} H={h} V={v} chunk_tokens={nt}: peak extra "
          f"{', '.join(f'{x:.0f}' for x in out['peak_extra_MiB'])} MiB; floor {out['floor_MiB']:.0f} MiB "
          f"(one fp32 [V, H] = {out['fp32_VH_MiB']:.0f} MiB); above the floor "
          f"{out['peak_over_floor_MiB']:.0f} MiB", flush=True)
    return out


def precision_section(args) -> dict:
    """Gradient error against float64 at the trainer's hint magnitudes (w_t / N_t ~ 1e-5, loss
    scale x world x accumulation in g), hinted path vs exact recompute, fp16 and bf16, torch
    backend on the CPU. The measuring code is the unit tests' (tests/unit/kernel_ce_cases.py)."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "unit"))
    from kernel_ce_cases import make_case, realistic_hint_errors

    torch.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        case = make_case(args.n, args.h, args.v, 3, dtype=dtype, ignore_frac=0.3, seed=5)
        errs = realistic_hint_errors(case, "torch", chunk_tokens=args.chunk_tokens)
        for path in ("hinted", "recompute"):
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), path=path, grad_hidden_rel_err=errs[path][0],
                             grad_weight_rel_err=errs[path][1]))
            print("  " + json.dumps(rows[-1]), flush=True)
    return dict(shape=dict(N=args.n, H=args.h, V=args.v, T=3, ignored_fraction=0.3), rows=rows)


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
    p.add_argument("--memory-bf16", action="store_true",
                   help="only the peak memory of the hinted path in bf16 on the CPU (chunk_tokens default 2048)")
    p.add_argument("--precision", action="store_true",
                   help="only the fp16/bf16 gradient errors of the hinted path vs float64 (CPU, torch backend)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_cpu_child(args.child, args.n, args.h, args.v, args.t, args.threads, args.chunk_tokens,
                                    args.ignore_frac, args.dtype)))
        return
    if args.precision:
        print(json.dumps({"bench": "fused_linear_task_cross_entropy", "precision": precision_section(args)}))
        return
    if args.memory_bf16:
        if args.quick:
            args.n, args.h, args.v, args.rounds = 2048, 256, 8000, 1
        print(json.dumps({"bench": "fused_linear_task_cross_entropy", "memory_bf16": memory_bf16_section(args)}))
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
