"""The benchmark scripts' measuring code runs (tiny sizes): the numbers in BENCHMARKS.md come
from code that executes, and the correctness check inside the bandwidth bench is real."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gram_combine_bandwidth_bench_on_cpu():
    bench = _load("bench_gradients")
    out = bench.bandwidth_bench("cpu", [1000, 4099], copy_elems=1 << 16, tasks=(2, 3), reps=1)
    assert out["copy_GBps"] > 0 and out["read_GBps"] > 0
    assert [(c["T"], c["n"]) for c in out["cases"]] == [(2, 1000), (3, 1000), (2, 4099), (3, 4099)]
    for c in out["cases"]:
        assert c["gram_torch_of_bw"] > 0 and c["combine_torch_of_bw"] > 0
        assert "gram_triton_ms" not in c  # the Triton kernels are timed on CUDA only
        assert c["gram_max_rel_err"] < 1e-5 and c["combine_max_rel_err"] < 1e-5, c
