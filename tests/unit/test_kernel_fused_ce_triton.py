"""fused_linear_task_cross_entropy with backend="triton" against the unfused reference.

On a CPU the Triton kernels run under ``TRITON_INTERPRET=1``, which must be set before
``triton`` is first imported (Triton decorates its own ``tl.max``/``tl.sum`` then).
So the parent pytest process does not run the cases itself: ``test_triton_cases_under_
interpreter`` re-runs this file in a child pytest with the flag set, and the cases run
there (or directly, on a CUDA machine). Sizes stay tiny: the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_ce_cases import IGNORE, check_against_reference, check_realistic_hint_precision, make_case  # noqa: E402

import megamt.kernels.fused_linear_cross_entropy as flce  # noqa: E402
from megamt.kernels import task_cross_entropy  # noqa: E402

pytestmark = pytest.mark.triton

_INTERPRETED = type(task_cross_entropy._lse_update_kernel).__name__ == "InterpretedFunction"
_CAN_RUN = _INTERPRETED or torch.cuda.is_available()
needs_runnable_triton = pytest.mark.skipif(
    not _CAN_RUN,
    reason="runs in the TRITON_INTERPRET=1 child process of test_triton_cases_under_interpreter",
)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 2048 logits: chunk_tokens=16 → 128-wide vocabulary blocks, so V=300 spans
    three vocabulary blocks (the last one partial) and N=40..64 several token blocks."""
    monkeypatch.setitem(flce._BLOCK_ELEMENTS, "cpu", 2048)


def _device_case(case):
    if not _INTERPRETED:  # a CUDA machine
        case = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in case.items()}
    return case


@needs_runnable_triton
@pytest.mark.parametrize("label_smoothing,z_loss,bias", [(0.0, 0.0, False), (0.1, 0.0, True), (0.0, 1e-3, True),
                                                         (0.1, 1e-3, False)])
def test_fp32_grid(tiny_blocks, label_smoothing, z_loss, bias):
    case = _device_case(make_case(61, 37, 300, 5, bias=bias, seed=20))  # odd N, H, V
    check_against_reference(case, "triton", label_smoothing=label_smoothing, z_loss=z_loss, chunk_tokens=16)


@needs_runnable_triton
@pytest.mark.parametrize("num_tasks", [1, 64])
def test_number_of_tasks(tiny_blocks, num_tasks):
    case = _device_case(make_case(64, 24, 257, num_tasks, seed=21))
    check_against_reference(case, "triton", z_loss=1e-4, chunk_tokens=16)


@needs_runnable_triton
def test_bf16(tiny_blocks):
    case = _device_case(make_case(48, 40, 300, 3, dtype=torch.bfloat16, bias=True, seed=22))
    check_against_reference(case, "triton", label_smoothing=0.1, z_loss=1e-3, chunk_tokens=16)


@needs_runnable_triton
def test_empty_task_one_task_all_and_all_ignored(tiny_blocks):
    case = _device_case(make_case(40, 16, 200, 4, tasks=[0, 3], seed=23))
    loss, count, _ = check_against_reference(case, "triton", label_smoothing=0.05, chunk_tokens=16)
    assert count[1] == count[2] == 0 and loss[1] == loss[2] == 0
    case = _device_case(make_case(40, 16, 200, 3, tasks=[1], ignore_frac=0.0, seed=24))
    loss, count, _ = check_against_reference(case, "triton", chunk_tokens=16)
    assert count.tolist() == [0, 40, 0]
    case = _device_case(make_case(32, 16, 200, 3, bias=True, ignore_frac=1.1, seed=25))
    assert (case["labels"] == IGNORE).all()
    loss, count, grads = check_against_reference(case, "triton", z_loss=1e-3)
    assert count.sum() == 0 and loss.abs().sum() == 0 and all(g.abs().sum() == 0 for g in grads)


@needs_runnable_triton
def test_zero_upstream_for_a_task(tiny_blocks):
    case = _device_case(make_case(50, 20, 300, 3, seed=26))
    case["upstream"] = case["upstream"].clone()
    case["upstream"][1] = 0.0
    check_against_reference(case, "triton", label_smoothing=0.1, chunk_tokens=16)


@needs_runnable_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_hint(tiny_blocks, dtype):
    # hinted forward (whole-row blocks of 2048 // 300 = 6 tokens): g = 2.5 · hint takes the
    # kept gradients, an unrelated g the recompute path; both match the reference
    case = _device_case(make_case(45, 24, 300, 3, dtype=dtype, bias=True, seed=27))
    hint = case["upstream"].abs() + 0.1
    flce.backward_path_counts.clear()
    check_against_reference(dict(case, upstream=2.5 * hint), "triton", label_smoothing=0.1, z_loss=1e-3,
                            chunk_tokens=16, hint=hint)
    with pytest.MonkeyPatch.context() as m:  # debug mode: g unrelated to the hint is recomputed exactly
        m.setenv(flce.HINT_CHECK_ENV, "1")
        check_against_reference(case, "triton", label_smoothing=0.1, z_loss=1e-3, chunk_tokens=16, hint=hint)
    assert dict(flce.backward_path_counts) == {"hinted": 1, "hint_mismatch": 1, "recompute": 1}


@needs_runnable_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hint_at_realistic_magnitudes_in_low_precision(dtype):
    # the trainer's hint (w_t / N_t ≈ 1e-5) and a loss scale in g, against float64: the Triton
    # row kernels write D in the input dtype, so its scale must not underflow in fp16
    case = _device_case(make_case(40, 32, 1500, 3, dtype=dtype, seed=26))
    check_realistic_hint_precision(case, "triton", chunk_tokens=16)


def test_triton_cases_under_interpreter():
    """Runs this file's cases in a child process with TRITON_INTERPRET=1 (CPU machines)."""
    if _CAN_RUN:
        pytest.skip("this process runs the Triton cases directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
         "-k", "not test_triton_cases_under_interpreter"],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
    )
    tail = (proc.stdout + proc.stderr)[-5000:]
    assert proc.returncode == 0, f"Triton cases failed under the interpreter:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, f"every Triton case must run:\n{tail}"
